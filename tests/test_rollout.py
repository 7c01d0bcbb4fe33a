"""``worldloop rollout`` and app/rollout.py: exact frame count and rate, determinism by seed, interrupted runs
that stay playable, one-line errors for bad input. The model is the ``tiny`` preset with random weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from worldloop.app.cli import main
from worldloop.app.commands.world import read_key_script
from worldloop.app.rollout import (
    PromptSchedule,
    RolloutPlan,
    build_schedule,
    explorer_keys,
    parse_prompt_at,
    rollout,
    scripted_keys,
    sidecar_path,
)
from worldloop.models.config import preset
from worldloop.models.keys import parse_keys
from worldloop.models.text import PromptEncoder
from worldloop.models.world_model import WorldModel

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("single_thread")]
REPO = Path(__file__).resolve().parent.parent


def decode(path: Path) -> tuple[list[np.ndarray], Fraction | None]:
    """All frames of a video and its frame rate, from the frames' timestamps (None for < 2 frames)."""
    with av.open(str(path)) as container:
        decoded = list(container.decode(container.streams.video[0]))
    steps = {b.pts - a.pts for a, b in zip(decoded, decoded[1:], strict=False)}
    assert len(steps) <= 1, f"frames are not evenly spaced: {sorted(steps)}"
    rate = 1 / (steps.pop() * decoded[0].time_base) if steps else None
    return [f.to_ndarray(format="rgb24") for f in decoded], rate


class FrameList:
    """A FrameWriter that keeps the frames (tests only: a real rollout streams them to the encoder)."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []

    def write(self, rgb: np.ndarray) -> None:
        self.frames.append(rgb.copy())

    def close(self) -> None:
        pass


# ---- prompt schedules and key policies ------------------------------------------------------------------

def test_prompt_at_takes_frames_or_seconds() -> None:
    assert parse_prompt_at('600:"neon city"', fps=30) == (600, "neon city")
    assert parse_prompt_at("2.5s: an ice cave", fps=30) == (75, "an ice cave")
    for bad in ("neon city", "x:neon city", "1.5:neon city", "10:", "-3:ice"):
        with pytest.raises(ValueError):
            parse_prompt_at(bad, fps=30)


def test_schedule_merges_sources_and_rejects_switches_past_the_end(tmp_path: Path) -> None:
    file = tmp_path / "prompts.json"
    file.write_text(json.dumps([{"frame": 0, "prompt": "a dungeon"}, {"frame": 50, "prompt": "an ice cave"}]))
    schedule = build_schedule(None, ["20:a neon city"], file, fps=30, frames=100)
    assert schedule.entries == ((0, "a dungeon"), (20, "a neon city"), (50, "an ice cave"))
    assert schedule.switches() == {20: "a neon city", 50: "an ice cave"}
    with pytest.raises(ValueError, match="past the last frame"):
        build_schedule("a dungeon", ["100:ice"], None, fps=30, frames=100)
    with pytest.raises(ValueError, match="frame 0"):
        PromptSchedule(((5, "late start"),))
    with pytest.raises(ValueError, match="no prompt"):
        build_schedule(None, [], None, fps=30, frames=10)


def test_explorer_is_seeded_sticky_and_mostly_forward() -> None:
    take = lambda seed: [next(keys) for keys in [explorer_keys(seed, fps=30)] for _ in range(3000)]
    a, b, c = take(1), take(1), take(2)
    assert a == b and a != c
    forward = parse_keys("forward")
    assert sum(k & forward != 0 for k in a) > len(a) / 2
    changes = sum(x != y for x, y in zip(a, a[1:], strict=False))
    assert changes < len(a) / 9  # held ≥ 0.3 s (9 frames at 30 FPS) at a time


def test_scripted_keys_expand_runs_and_must_cover_the_rollout() -> None:
    assert list(scripted_keys([(2, 1), (3, 17)], frames=5)) == [1, 1, 17, 17, 17]
    with pytest.raises(ValueError, match="has 5 frames"):
        scripted_keys([(2, 1), (3, 17)], frames=8)


# ---- the command ----------------------------------------------------------------------------------------

def test_rollout_writes_exactly_the_requested_frames_and_is_deterministic(
        tmp_path: Path, prompt_encoder: PromptEncoder) -> None:
    out, script = tmp_path / "walk.mp4", tmp_path / "walk.txt"
    script.write_text("# walk, turn, walk diagonally\n3*w\n2*q\nw+a\n-\n10*e\n")
    argv = ["rollout", "--preset", "tiny", "--seed", "5", "--prompt", "an ice cave", "--prompt-at",
            "6:a neon city", "--keys", str(script), "--frames", "14", "--fps", "12", "--scale", "2",
            "--quiet", "--start", "prompt", "--out", str(out)]  # world starts: tests/test_starts.py
    assert main(argv) == 0
    frames, rate = decode(out)
    assert len(frames) == 14 and rate == 12 and frames[0].shape == (64, 64, 3)
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["completed"] and meta["frames"] == 14
    assert meta["keys"] == [1, 1, 1, 16, 16, 5, 0] + [32] * 7 and meta["key_source"] == f"script {script}"
    assert meta["prompts"] == [{"frame": 0, "prompt": "an ice cave"}, {"frame": 6, "prompt": "a neon city"}]
    assert meta["model"] == {"name": "tiny", "source": "preset tiny (random weights)", "trained": False,
                             "steps": 1, "height": 32, "width": 32, "scale": 2}
    assert (meta["fps"], meta["seed"], meta["video"]) == (12, 5, "walk.mp4")

    # The same seed, schedule and keys give the same frames in another process, batch and writer.
    model = WorldModel.from_config(preset("tiny"), seed=0, prompt_encoder=prompt_encoder, max_sessions=1)
    schedule = build_schedule("an ice cave", ["6:a neon city"], None, fps=12, frames=14)
    keys = lambda: scripted_keys(read_key_script(script), 14)
    again = rollout(model, RolloutPlan(5, 14, 12, schedule, "script"), keys(), FrameList())
    assert again.digest.hexdigest() == meta["frames_sha256"] and again.keys == meta["keys"]
    other = rollout(model, RolloutPlan(6, 14, 12, schedule, "script"), keys(), FrameList())
    assert other.digest.hexdigest() != meta["frames_sha256"]


def test_an_existing_video_is_replaced_only_with_force(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "old.mp4"
    argv = ["rollout", "--preset", "tiny", "--prompt", "a dungeon", "--frames", "2", "--quiet",
            "--out", str(out)]
    assert main(argv) == 0
    video, meta = out.read_bytes(), sidecar_path(out).read_text()
    capsys.readouterr()
    assert main([*argv, "--seed", "7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"worldloop rollout: error: {out} exists; pass --force to replace it"
    assert out.read_bytes() == video and sidecar_path(out).read_text() == meta  # untouched
    out.unlink()  # a sidecar left alone is somebody's rollout too
    assert main([*argv, "--seed", "7"]) == 2
    assert main([*argv, "--seed", "7", "--force"]) == 0
    assert json.loads(sidecar_path(out).read_text())["seed"] == 7


def _start_long_rollout(out: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "worldloop.app.cli", "rollout", "--preset", "tiny", "--prompt", "a dungeon",
            "--frames", "100000", "--fps", "4", "--quiet", "--out", str(out)]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for_a_fragment(process: subprocess.Popen[bytes], out: Path, timeout: float = 80) -> None:
    """Wait until the video holds at least one complete fragment (one second of video: 4 frames here)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        try:
            if len(decode(out)[0]) >= 4:
                return
        except (av.error.FFmpegError, FileNotFoundError, IndexError):
            pass
        time.sleep(0.3)
    process.kill()
    pytest.fail("the rollout wrote no fragment in time")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_an_interrupted_rollout_leaves_a_playable_video(tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "long.mp4"
    process = _start_long_rollout(out)
    try:
        _wait_for_a_fragment(process, out)
        process.send_signal(sig)
        code = process.wait(timeout=30)
    finally:
        process.kill()
    frames, rate = decode(out)
    assert len(frames) >= 4 and rate == 4
    meta = json.loads(sidecar_path(out).read_text())
    assert not meta["completed"]
    if sig == signal.SIGTERM:  # closed cleanly: every frame generated is in the file and the sidecar
        assert code == 130 and meta["frames"] == len(frames) == len(meta["keys"])
        assert b"interrupted after" in process.stderr.read()


# ---- the engine beside the model ---------------------------------------------------------------------------

def _engine_reference(prompt: str, seed: int, masks: list[int], switches: dict[int, str]) -> list[np.ndarray]:
    """The engine's frames after a world start, rendered here without the rollout: the world of the start,
    stepped by ``masks``; at a switch whose prompt names a theme, the same maze at the same pose in that
    theme (``retheme``), at 2× the tiny preset's 32×32 and area-downsampled."""
    import torch

    from worldloop.app.starts import WorldStart, context_frames, prompt_theme
    from worldloop.distill.data.clips import downsample
    from worldloop.distill.world.engine import World
    from worldloop.distill.world.themes import retheme

    _, world = WorldStart(32, 32, context_frames(preset("tiny"))).begin(prompt, seed)
    frames = []
    for index, mask in enumerate(masks):
        theme = prompt_theme(switches.get(index, ""))
        if theme is not None:
            poses = world.poses
            world = World([retheme(world.params[0], theme)], 64, 64)
            world.set_poses(poses)
        frames.append(downsample(world.next_frame(torch.tensor([mask])), 2)[0].numpy())
    return frames


def test_beside_engine_shows_the_engine_under_the_same_keys_left_of_the_model(
        tmp_path: Path, prompt_encoder: PromptEncoder) -> None:
    out, plain, script = tmp_path / "beside.mp4", tmp_path / "plain.mp4", tmp_path / "tour.keys"
    script.write_text("4*w\n3*e\n2*a\nw+q\n4*w\n")
    argv = ["rollout", "--preset", "tiny", "--seed", "4", "--prompt", "an ice cave", "--prompt-at",
            "8:a neon city", "--prompt-at", "11:somewhere else", "--keys", str(script), "--frames", "14",
            "--scale", "2", "--crf", "0", "--quiet"]
    assert main([*argv, "--beside-engine", "--out", str(out)]) == 0
    assert main([*argv, "--out", str(plain)]) == 0
    frames, _ = decode(out)
    meta = json.loads(sidecar_path(out).read_text())
    assert len(frames) == 14 and frames[0].shape == (64, 2 * 64 + 4, 3)
    assert meta["layout"] == {"panels": ["engine", "model"], "panel_width": 64, "separator": 4}
    assert json.loads(sidecar_path(plain).read_text())["layout"] == {"panels": ["model"], "panel_width": 64}
    # the model's frames are those of the same rollout without the engine
    assert meta["frames_sha256"] == json.loads(sidecar_path(plain).read_text())["frames_sha256"]
    masks = meta["keys"]
    switched = _engine_reference("an ice cave", 4, masks, {8: "a neon city", 11: "somewhere else"})
    unswitched = _engine_reference("an ice cave", 4, masks, {})
    left = [f[:, :64].astype(np.float32) for f in frames]
    half = lambda f: f.repeat(2, 0).repeat(2, 1).astype(np.float32)  # the video's --scale 2
    error = [float(np.abs(a - half(b)).mean()) for a, b in zip(left, switched, strict=True)]
    assert max(error) < 2.5, error  # lossless H.264 (--crf 0) up to the RGB ↔ YUV rounding
    assert all(np.abs(f[:, 64:68].astype(int) - 255).max() < 8 for f in frames)  # the separator
    # the engine moved, and from frame 8 on shows the same maze in the neon city; "somewhere else" names no
    # theme, so the look stays
    assert float(np.abs(left[0] - left[7]).mean()) > 5
    assert all(float(np.abs(a - half(b)).mean()) > 10 for a, b in zip(left[8:], unswitched[8:], strict=True))


# ---- bad input: one line, exit 2, before any model work --------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--prompt-at", "soon:neon city"], "bad --prompt-at"),
    (["--prompt-at", "50:neon city"], "past the last frame"),
    (["--prompt", "x" * 301], "too long"),
    (["--schedule", "{schedule}"], "not valid JSON"),
    (["--keys", "{keys}"], "bad-keys.txt:2: unknown key 'jump'"),
    (["--keys", "{short}"], "has 3 frames"),
    (["--out", "{tmp}/missing/dir/x.mp4"], "does not exist"),
    (["--out", "{tmp}"], "must end in .mp4"),
    (["--out", "{tmp}/dir.mp4"], "is a directory"),
    (["--model", "{tmp}/no-model"], "no model directory"),
    (["--steps", "0"], "--steps must be in"),
    (["--beside-engine", "--start", "prompt"], "--beside-engine needs a world start: drop --start prompt"),
    (["--beside-engine", "--first-frame", "{picture}"], "--beside-engine needs a world start: a picture"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          extra: list[str], message: str) -> None:
    (tmp_path / "bad.json").write_text("[{frame: 0}")
    (tmp_path / "bad-keys.txt").write_text("w\njump\n")
    (tmp_path / "short.txt").write_text("3*w\n")
    (tmp_path / "dir.mp4").mkdir()
    ok, png = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "start.png").write_bytes(png.tobytes())
    files = dict(schedule=tmp_path / "bad.json", keys=tmp_path / "bad-keys.txt", short=tmp_path / "short.txt",
                 picture=tmp_path / "start.png")
    extra = [a.format(tmp=tmp_path, **files) for a in extra]
    argv = ["rollout", "--prompt", "a dungeon", "--frames", "10", "--out", str(tmp_path / "ok.mp4"), *extra]
    if "--model" not in extra:
        argv += ["--preset", "tiny"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("worldloop rollout: error:") and message in err and "\n" not in err
