"""Recordings: the fragmented-MP4 writer, `record` over the websocket, downloads, SIGTERM finishing them."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import av
import numpy as np
import pytest

from tests.fakes import RawClient, serve_fake
from worldloop.streaming.client import SyncClient
from worldloop.streaming.recording import Mp4Recorder, is_recording_name, new_recording_name, recording_path

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parent.parent


def decoded_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_the_recorder_writes_fragments_a_crash_cannot_lose(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    recorder = Mp4Recorder(path, 32, 32, fps=10)
    rng = np.random.default_rng(0)
    for _ in range(25):
        recorder.write(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    shutil.copy(path, tmp_path / "crashed.mp4")  # what a crash right now would leave behind
    info = recorder.close()
    assert (info.name, info.frames, info.fps) == ("clip.mp4", 25, 10)
    assert recorder.close() == info  # closing twice is harmless
    assert decoded_frames(path) == 25
    assert 10 <= decoded_frames(tmp_path / "crashed.mp4") < 25  # finished 1-s fragments survive
    with pytest.raises(ValueError):
        Mp4Recorder(tmp_path / "odd.mp4", 31, 32, fps=10)


def test_recording_names_are_strict(tmp_path: Path) -> None:
    name = new_recording_name(3)
    assert is_recording_name(name) and name.endswith(".mp4") and "-s3-" in name
    for bad in ("../x.mp4", ".hidden.mp4", "a/b.mp4", "x.mp4/", "x.MP4", "x.mp4.part", "a b.mp4", "",
                "x" * 200 + ".mp4"):
        assert not is_recording_name(bad), bad
        with pytest.raises(ValueError):
            recording_path(tmp_path, bad)


def test_record_over_the_websocket_and_download(tmp_path: Path) -> None:
    def get(url: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, b""

    async def scenario() -> None:
        async with serve_fake(record_dir=tmp_path) as server, RawClient.connect(server) as client:
            base = f"http://127.0.0.1:{server.port}"
            await client.start(fps=30)
            await client.send({"type": "record", "action": "stop"})
            assert (await client.reply())["code"] == "bad_field"
            await client.send({"type": "record", "action": "start"})
            started = await client.reply()
            assert started["state"] == "started" and is_recording_name(started["name"])
            assert (await asyncio.to_thread(get, base + started["url"]))[0] == 404  # still being written
            assert server.metrics.recordings.value() == 1
            await client.frames_from(client.frames[-1].header.frame_seq + 1 if client.frames else 0, 20)
            await client.send({"type": "record", "action": "stop"})
            stopped = await client.reply()
            assert stopped["name"] == started["name"] and stopped["frames"] >= 20 - 3  # 3 were already made
            status, body = await asyncio.to_thread(get, base + stopped["url"])
            assert status == 200 and body == (tmp_path / stopped["name"]).read_bytes()
            assert decoded_frames(tmp_path / stopped["name"]) == stopped["frames"]
            for bad in ("/recordings/..%2Fsecret.mp4", "/recordings/nothing.mp4", "/recordings/"):
                assert (await asyncio.to_thread(get, base + bad))[0] == 404
    asyncio.run(scenario())


@pytest.mark.timeout(90)
def test_sigterm_finishes_an_open_recording(tmp_path: Path) -> None:
    """`worldloop serve --preset tiny` in a subprocess: record, SIGTERM, the MP4 is complete and plays."""
    command = [sys.executable, "-m", "worldloop.app.cli", "serve", "--preset", "tiny", "--port", "0",
               "--record-dir", str(tmp_path), "--max-sessions", "1"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        url = None
        deadline = time.monotonic() + 60
        assert server.stdout is not None
        while url is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            assert line, "the server exited before it was ready"
            found = re.search(r"websocket (ws://\S+/ws)", line)
            url = found.group(1) if found else None
        assert url is not None
        client = SyncClient(url)
        try:
            ready = client.start("a dark stone dungeon", seed=1, fps=10)
            assert (ready.model, ready.width) == ("tiny", 32)
            recording = client.record("start")
            for _ in range(12):
                client.next_frame(timeout=20)
            server.send_signal(signal.SIGTERM)
            assert server.wait(30) == 0
            assert client.client.bye is not None and client.client.bye.reason == "shutdown"
        finally:
            client.close()
        # All but the frames already made when `record` arrived (≤ 2 in flight and 1 waiting).
        assert decoded_frames(tmp_path / recording.name) >= 12 - 3
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
