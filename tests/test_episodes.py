"""Episodes: round trips through the writer and reader, atomic writes, and clear errors for broken parts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest

from worldloop.distill.data.episodes import (
    EpisodeMeta,
    EpisodeWriter,
    PromptChange,
    read_episode,
    write_episode,
)
from worldloop.distill.world import rollout

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def clip() -> dict:
    c = rollout([4], n_frames=12, height=64, width=96)
    return {"frames": c.frames[0].numpy(), "keys": c.keys[0].tolist(), "poses": c.poses[0].numpy(),
            "prompt": c.prompts[0], "params": c.params[0]}


def _write(path: Path, clip: dict, **kwargs) -> Path:
    meta = EpisodeMeta(fps=24, source="world", seed=4, params=clip["params"].to_dict())
    return write_episode(path, clip["frames"], clip["keys"], clip["prompt"], meta, poses=clip["poses"],
                         **kwargs)


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_round_trip(tmp_path: Path, clip: dict) -> None:
    path = _write(tmp_path / "ep", clip, lossless=True)
    ep = read_episode(path)
    assert (ep.n_frames, ep.height, ep.width, ep.fps) == (12, 64, 96, 24)
    assert ep.keys.tolist() == clip["keys"]
    assert ep.prompts == (PromptChange(0, clip["prompt"]),)
    assert ep.meta.seed == 4 and ep.meta.params["theme"] == clip["params"].theme
    np.testing.assert_allclose(ep.poses, clip["poses"], atol=1e-6)
    # The MP4 is plain H.264 in yuv420p that PyAV decodes to every frame.
    with av.open(str(path / "video.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert sum(1 for _ in container.decode(video=0)) == 12
    decoded = ep.load_frames(lossless=False)
    assert decoded.shape == (12, 64, 96, 3)
    assert np.abs(decoded.astype(int) - clip["frames"]).mean() < 12  # lossy, but the same pictures
    assert np.array_equal(ep.load_frames(), clip["frames"])  # frames.npy is exact
    assert _siblings(tmp_path) == ["ep"]


def test_prompt_schedule_and_streamed_frames(tmp_path: Path, clip: dict) -> None:
    schedule = [PromptChange(0, "a dim dungeon"), PromptChange(5, "a bright desert ruins")]
    meta = EpisodeMeta(source="play")
    path = write_episode(tmp_path / "ep", iter(clip["frames"]), clip["keys"], schedule, meta)
    ep = read_episode(path)
    assert ep.prompts == tuple(schedule) and ep.poses is None and not ep.lossless
    assert [ep.prompt_at(f) for f in (0, 4, 5, 11)] == ["a dim dungeon"] * 2 + ["a bright desert ruins"] * 2
    assert sum(1 for _ in ep.iter_frames()) == 12


def test_failures_leave_nothing_behind(tmp_path: Path, clip: dict) -> None:
    def broken() -> Iterator[np.ndarray]:
        yield from clip["frames"][:5]
        raise RuntimeError("renderer crashed")

    meta = EpisodeMeta()
    with pytest.raises(RuntimeError):
        write_episode(tmp_path / "a", broken(), clip["keys"], "p", meta)
    with pytest.raises(KeyboardInterrupt):
        with EpisodeWriter(tmp_path / "b", meta, "p") as writer:
            writer.append(clip["frames"][0], 0)
            raise KeyboardInterrupt
    with pytest.raises(ValueError, match="frames but"):
        write_episode(tmp_path / "c", clip["frames"][:3], clip["keys"], "p", meta)
    with pytest.raises(ValueError, match="schedule"):
        write_episode(tmp_path / "d", clip["frames"], clip["keys"], [PromptChange(2, "late")], meta)
    with pytest.raises(ValueError, match="at frame 40"):
        late = [PromptChange(0, "a"), PromptChange(40, "b")]
        write_episode(tmp_path / "e", clip["frames"], clip["keys"], late, meta)
    with pytest.raises(ValueError, match="even"):
        write_episode(tmp_path / "f", clip["frames"][:, :63], clip["keys"], "p", meta)
    with pytest.raises(ValueError, match="cannot write into"):
        (tmp_path / "file").write_text("x")
        write_episode(tmp_path / "file" / "g", clip["frames"], clip["keys"], "p", meta)
    with pytest.raises(ValueError, match="fps"):
        write_episode(tmp_path / "h", clip["frames"], clip["keys"], "p", EpisodeMeta(fps=0))
    assert _siblings(tmp_path) == ["file"]
    write_episode(tmp_path / "new" / "deeper" / "ep", clip["frames"][:2], clip["keys"][:2], "p", meta)
    assert read_episode(tmp_path / "new" / "deeper" / "ep").n_frames == 2


def test_existing_episode_is_kept_unless_overwritten(tmp_path: Path, clip: dict) -> None:
    path = _write(tmp_path / "ep", clip)
    with pytest.raises(ValueError, match="already exists"):
        _write(path, clip)
    write_episode(path, clip["frames"][:3], clip["keys"][:3], "short", EpisodeMeta(), overwrite=True)
    assert read_episode(path).n_frames == 3
    assert _siblings(tmp_path) == ["ep"]


@pytest.mark.parametrize("part", ["meta.json", "keys.json", "prompts.json", "video.mp4"])
def test_missing_or_corrupt_parts_are_named(tmp_path: Path, clip: dict, part: str) -> None:
    path = _write(tmp_path / "ep", clip)
    (path / part).unlink()
    with pytest.raises(ValueError, match=part.replace(".", r"\.") + ": missing"):
        read_episode(path)
    path = _write(tmp_path / "ep2", clip)
    data = (path / part).read_bytes()
    (path / part).write_bytes(data[: len(data) // 3])  # truncated
    with pytest.raises(ValueError, match=part.replace(".", r"\.")):
        read_episode(path).load_frames(lossless=False)


def test_inconsistent_parts_are_named(tmp_path: Path, clip: dict) -> None:
    path = _write(tmp_path / "ep", clip)
    keys = json.loads((path / "keys.json").read_text())
    (path / "keys.json").write_text(json.dumps({**keys, "masks": keys["masks"][:-1]}))
    with pytest.raises(ValueError, match=r"keys\.json: expected 12 key masks"):
        read_episode(path)
    with pytest.raises(FileNotFoundError):
        read_episode(tmp_path / "nowhere")
