"""The Python client (async and blocking) and the example bot, against the fake model on loopback."""

from __future__ import annotations

import asyncio
import runpy
from pathlib import Path

import av
import numpy as np
import pytest

from tests.fakes import FakeWorldModel, serve_fake
from worldloop.streaming.client import Disconnected, RequestFailed, SyncClient, WorldloopClient

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parent.parent


def test_async_client_plays_a_session() -> None:
    async def scenario() -> None:
        async with serve_fake() as server:
            async with WorldloopClient(f"ws://127.0.0.1:{server.port}/ws") as client:
                ready = await client.start("a stone dungeon", seed=2, fps=30)
                assert ready.session and ready.width == 32
                first = await client.next_frame(10)
                assert first.seq == 0 and first.image.shape == (32, 32, 3)
                seq = await client.set_keys("w+q")
                async for frame in client.frames():
                    if frame.key_seq == seq:
                        break
                snapshot = await client.snapshot()
                after = await client.restore(snapshot.id)
                assert after >= snapshot.frame
                assert await client.set_prompt("a neon city") >= after
                assert (await client.reset(seed=3)) >= after
                stats = await client.stats()
                assert stats.frames_sent >= 2 and stats.sessions == 1
                with pytest.raises(RequestFailed) as failed:
                    await client.restore(12345)
                assert failed.value.code == "unknown_snapshot"
                latest = await client.latest_frame(10)
                assert latest.seq >= first.seq
            assert client.bye is None
    asyncio.run(scenario())


def test_async_client_resumes_and_sees_refusals() -> None:
    async def scenario() -> None:
        async with serve_fake(max_sessions=1, resume_grace_s=20) as server:
            url = f"ws://127.0.0.1:{server.port}/ws"
            client = await WorldloopClient(url).connect()
            ready = await client.start("a cave")
            await client.next_frame(10)
            other = await WorldloopClient(url).connect()
            with pytest.raises(RequestFailed) as full:
                await other.start("another cave")
            assert full.value.code == "server_full"
            with pytest.raises(Disconnected):
                await other.next_frame(10)
            await other.close()
            again = await WorldloopClient(url).connect()  # takes the session over
            resumed = await again.start("a cave", resume=ready.session)
            assert resumed.resumed and (await again.next_frame(10)).seq > 0
            with pytest.raises(Disconnected, match="replaced"):
                while True:
                    await client.next_frame(10)
            await client.close()
            await again.close()
    asyncio.run(scenario())


def test_sync_client_for_game_loops() -> None:
    async def scenario() -> None:
        async with serve_fake(FakeWorldModel(height=64, width=64)) as server:
            def play() -> None:
                with SyncClient(f"ws://127.0.0.1:{server.port}/ws") as client:
                    client.start("a stone dungeon", fps=30, image_format="webp")
                    images = [client.next_frame(10).image for _ in range(3)]
                    assert all(image.shape == (64, 64, 3) for image in images)
                    client.set_keys(["forward"])
                    frame = client.latest_frame(10)
                    assert isinstance(frame.image, np.ndarray)
                    assert client.stats().frame > frame.seq - 1
            await asyncio.to_thread(play)
    asyncio.run(scenario())


def test_the_explorer_bot_saves_what_it_saw(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bot = runpy.run_path(str(REPO / "assets" / "demos" / "explorer_bot.py"))  # its functions, not __main__
    out = tmp_path / "explorer.mp4"

    async def scenario() -> None:
        async with serve_fake() as server:
            argv = ["--url", f"ws://127.0.0.1:{server.port}/ws", "--seconds", "1.5", "--fps", "20",
                    "--out", str(out)]
            assert await asyncio.to_thread(bot["main"], argv) == 0
    asyncio.run(scenario())
    assert "saw " in capsys.readouterr().out
    with av.open(str(out)) as video:
        assert sum(1 for _ in video.decode(video=0)) >= 5
