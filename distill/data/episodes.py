"""Episodes: one on-disk format for every source of play (the built-in world, recorded play, later others).

An episode is a folder:

    video.mp4      H.264, yuv420p, playable anywhere; frame i is the i-th video frame
    keys.json      {"keys": KEYS, "masks": [...]}: the key bitmask held for each frame (models.keys)
    prompts.json   the prompt schedule, [{"frame": 0, "prompt": ...}, ...], starting at frame 0
    meta.json      format, version, width, height, n_frames, fps, source, seed, params (the world's
                   theme parameters), poses (per frame [x, y, angle] or null), lossless, extra
    frames.npy     optional: the exact RGB frames (T, H, W, 3) uint8, for training without codec loss

Frame i shows the world after keys[i] were applied (the ``WorldModel.next_frame`` convention).
Writing goes to a hidden sibling folder that is renamed into place only when complete, so an error or
Ctrl-C never leaves a half-written episode behind. ``read_episode`` checks every part and names the file
when one is missing or corrupt; frames are decoded lazily (``iter_frames``) or at once (``load_frames``).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worldloop.models.keys import ALL_KEYS_MASK, KEYS
from worldloop.models.media import VideoWriter, import_av

FORMAT, VERSION = "worldloop-episode", 1
VIDEO, KEYS_FILE, PROMPTS_FILE, META_FILE, FRAMES_FILE = (
    "video.mp4", "keys.json", "prompts.json", "meta.json", "frames.npy")


class EpisodeError(ValueError):
    """An episode folder that cannot be read (missing, corrupt or inconsistent file): one line naming it."""


@dataclass(frozen=True)
class PromptChange:
    frame: int  # the first frame the prompt applies to
    prompt: str


@dataclass(frozen=True)
class EpisodeMeta:
    """What the writer is told about an episode beyond its frames and keys."""

    fps: int = 30
    source: str = "world"  # "world" (built-in engine), "play" (a recorded session), ...
    seed: int | None = None
    params: dict[str, Any] | None = None  # e.g. WorldParams.to_dict()
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Episode:
    path: Path
    width: int
    height: int
    n_frames: int
    keys: np.ndarray  # (T,) int64 bitmasks
    prompts: tuple[PromptChange, ...]
    meta: EpisodeMeta
    poses: np.ndarray | None  # (T, 3) float64 x, y, angle
    lossless: bool  # frames.npy is present

    @property
    def fps(self) -> int:
        return self.meta.fps

    def prompt_at(self, frame: int) -> str:
        """The prompt in force at ``frame``."""
        current = self.prompts[0].prompt
        for change in self.prompts:
            if change.frame > frame:
                break
            current = change.prompt
        return current

    def iter_frames(self, lossless: bool = True) -> Iterator[np.ndarray]:
        """Frames (H, W, 3) uint8 one by one: from frames.npy if present and ``lossless``, else the video."""
        if lossless and self.lossless:
            yield from np.load(self.path / FRAMES_FILE, mmap_mode="r")
            return
        video, count = self.path / VIDEO, 0
        av = import_av()
        try:
            with av.open(str(video)) as container:
                for frame in container.decode(video=0):
                    count += 1
                    yield frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as err:
            raise EpisodeError(f"{video}: cannot decode: {err}") from None
        if count != self.n_frames:
            raise EpisodeError(f"{video}: decoded {count} frames, meta.json says {self.n_frames}")

    def load_frames(self, lossless: bool = True) -> np.ndarray:
        """All frames: (T, H, W, 3) uint8."""
        return np.stack(list(self.iter_frames(lossless)))


class EpisodeWriter:
    """Streams frames into an episode folder; ``close()`` commits it, an exception or ``abort()`` erases it.

        with EpisodeWriter(path, EpisodeMeta(fps=30, seed=3), prompt="a dim dungeon ...") as w:
            for frame, key, pose in ...:
                w.append(frame, key, pose)
    """

    def __init__(self, path: str | Path, meta: EpisodeMeta, prompt: str, *, lossless: bool = False,
                 overwrite: bool = False, crf: int = 18) -> None:
        self.path, self.meta, self.lossless, self.crf = Path(path), meta, lossless, crf
        if not isinstance(meta.fps, int) or not 1 <= meta.fps <= 240:
            raise ValueError(f"fps must be an integer from 1 to 240, got {meta.fps!r}")
        if self.path.exists() and not overwrite:
            raise ValueError(f"{self.path} already exists (choose another folder or overwrite it)")
        self._made = _make_parents(self.path.parent)
        self.tmp = self.path.parent / f".{self.path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.tmp.mkdir()
        except OSError as err:
            self._remove_made()
            raise ValueError(f"cannot write into {self.path.parent}: {err.strerror}") from None
        self.extra = dict(meta.extra)  # may be added to until close()
        self.keys: list[int] = []
        self.poses: list[list[float]] = []
        self.prompts = [PromptChange(0, prompt)]
        self._frames: list[np.ndarray] = []
        self._video: VideoWriter | None = None
        self.size: tuple[int, int] | None = None  # (height, width), from the first frame

    def __enter__(self) -> EpisodeWriter:
        return self

    def __exit__(self, kind: type | None, *_: Any) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    @property
    def n_frames(self) -> int:
        return len(self.keys)

    def set_prompt(self, prompt: str) -> None:
        """Switch the prompt from the next appended frame on."""
        if self.prompts[-1].frame == self.n_frames:
            self.prompts[-1] = PromptChange(self.n_frames, prompt)
        elif prompt != self.prompts[-1].prompt:
            self.prompts.append(PromptChange(self.n_frames, prompt))

    def append(self, frame: np.ndarray, keys: int, pose: Sequence[float] | None = None) -> None:
        frame = np.ascontiguousarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"frames must be uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
        if self.size is None:
            self._open(frame.shape[0], frame.shape[1])
        if frame.shape[:2] != self.size:
            raise ValueError(f"frame {self.n_frames} is {frame.shape[:2]}, earlier frames are {self.size}")
        keys = int(keys)
        if not 0 <= keys <= ALL_KEYS_MASK:
            raise ValueError(f"frame {self.n_frames}: key bitmask {keys} out of range 0..{ALL_KEYS_MASK}")
        if self.n_frames > 0 and (pose is None) != (not self.poses):
            raise ValueError(f"frame {self.n_frames}: give a pose for every frame or for none")
        self._video.write(frame)
        if self.lossless:
            self._frames.append(frame)
        self.keys.append(keys)
        if pose is not None:
            self.poses.append([float(v) for v in pose])

    def _open(self, height: int, width: int) -> None:
        if height % 2 or width % 2:
            raise ValueError(f"frame size {width}x{height} must be even for H.264 (yuv420p)")
        self.size = (height, width)
        self._video = VideoWriter(self.tmp / VIDEO, width, height, self.meta.fps, crf=self.crf)

    def close(self) -> Path:
        """Finish the video, write the side files and move the folder into place."""
        try:
            if self.n_frames == 0:
                raise ValueError(f"{self.path}: an episode needs at least one frame")
            self._video.close()
            self._write_side_files()
            _commit(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def _write_side_files(self) -> None:
        height, width = self.size
        _write_json(self.tmp / KEYS_FILE, {"keys": list(KEYS), "masks": self.keys})
        _write_json(self.tmp / PROMPTS_FILE, [{"frame": p.frame, "prompt": p.prompt} for p in self.prompts])
        if self.lossless:
            np.save(self.tmp / FRAMES_FILE, np.stack(self._frames))
        _write_json(self.tmp / META_FILE, {
            "format": FORMAT, "version": VERSION, "width": width, "height": height,
            "n_frames": self.n_frames, "fps": self.meta.fps, "source": self.meta.source,
            "seed": self.meta.seed, "params": self.meta.params, "poses": self.poses or None,
            "lossless": self.lossless, "extra": self.extra,
        })

    def abort(self) -> None:
        """Drop everything written so far."""
        if self._video is not None:
            self._video.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._remove_made()

    def _remove_made(self) -> None:
        for folder in reversed(self._made):
            try:
                folder.rmdir()
            except OSError:
                break


def write_episode(path: str | Path, frames: np.ndarray | Iterable[np.ndarray],
                  keys: Sequence[int] | np.ndarray, prompts: str | Sequence[PromptChange],
                  meta: EpisodeMeta, *,
                  poses: Sequence[Sequence[float]] | np.ndarray | None = None, lossless: bool = False,
                  overwrite: bool = False) -> Path:
    """Write a whole episode: frames (T, H, W, 3) uint8 or an iterable of (H, W, 3), keys (T,), the prompt or
    prompt schedule, meta, optional poses (T, 3). Frames are encoded as they arrive."""
    schedule = [PromptChange(0, prompts)] if isinstance(prompts, str) else list(prompts)
    _check_schedule(schedule, None, Path(path))
    keys = [int(k) for k in keys]
    with EpisodeWriter(path, meta, schedule[0].prompt, lossless=lossless, overwrite=overwrite) as writer:
        changes = {p.frame: p.prompt for p in schedule[1:]}
        for i, frame in enumerate(frames):
            if i >= len(keys):
                raise ValueError(f"more frames than keys ({len(keys)})")
            if i in changes:
                writer.set_prompt(changes[i])
            writer.append(frame, keys[i], None if poses is None else poses[i])
        if writer.n_frames != len(keys):
            raise ValueError(f"{writer.n_frames} frames but {len(keys)} keys")
        _check_schedule(schedule, writer.n_frames, Path(path))
    return Path(path)


def read_episode(path: str | Path) -> Episode:
    """Open an episode folder and check its parts; frames are decoded on demand."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such episode folder")
    meta = _read_json(path / META_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise EpisodeError(f"{path / META_FILE}: not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise EpisodeError(f"{path / META_FILE}: version {meta.get('version')!r} is not {VERSION}")
    try:
        width, height, n, fps = (int(meta[k]) for k in ("width", "height", "n_frames", "fps"))
        info = EpisodeMeta(fps=fps, source=str(meta["source"]), seed=meta.get("seed"),
                           params=meta.get("params"), extra=dict(meta.get("extra") or {}))
    except (KeyError, TypeError, ValueError) as err:
        raise EpisodeError(f"{path / META_FILE}: missing or bad field {err}") from None
    keys = _read_keys(path / KEYS_FILE, n)
    prompts = _read_prompts(path / PROMPTS_FILE, n)
    poses = None
    if meta.get("poses") is not None:
        poses = np.asarray(meta["poses"], dtype=np.float64)
        if poses.shape != (n, 3):
            raise EpisodeError(f"{path / META_FILE}: poses must be {n}×3, got shape {poses.shape}")
    _check_video(path / VIDEO, width, height, n)
    lossless = bool(meta.get("lossless"))
    if lossless:
        _check_frames(path / FRAMES_FILE, (n, height, width, 3))
    return Episode(path, width, height, n, keys, tuple(prompts), info, poses, lossless)


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise EpisodeError(f"{file}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EpisodeError(f"{file}: corrupt JSON ({err})") from None


def _write_json(file: Path, data: dict[str, Any] | list[Any]) -> None:
    """One top-level entry per line, each written compactly: readable, and small for long episodes."""
    items = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in data.items()] if isinstance(data, dict) \
        else [json.dumps(v) for v in data]
    brackets = "{}" if isinstance(data, dict) else "[]"
    file.write_text(brackets[0] + "\n " + ",\n ".join(items) + "\n" + brackets[1] + "\n")


def _read_keys(file: Path, n: int) -> np.ndarray:
    data = _read_json(file)
    if not isinstance(data, dict) or data.get("keys") != list(KEYS):
        raise EpisodeError(f"{file}: expected the key set {list(KEYS)}")
    masks = data.get("masks")
    if not isinstance(masks, list) or len(masks) != n:
        got = len(masks) if isinstance(masks, list) else repr(masks)
        raise EpisodeError(f"{file}: expected {n} key masks, got {got}")
    if not all(isinstance(m, int) and 0 <= m <= ALL_KEYS_MASK for m in masks):
        raise EpisodeError(f"{file}: key masks must be integers 0..{ALL_KEYS_MASK}")
    return np.asarray(masks, dtype=np.int64)


def _read_prompts(file: Path, n: int) -> list[PromptChange]:
    data = _read_json(file)
    try:
        schedule = [PromptChange(int(p["frame"]), str(p["prompt"])) for p in data]
    except (KeyError, TypeError, ValueError):
        raise EpisodeError(f"{file}: expected a list of {{frame, prompt}} objects") from None
    _check_schedule(schedule, n, file)
    return schedule


def _check_schedule(schedule: list[PromptChange], n: int | None, where: Path) -> None:
    frames = [p.frame for p in schedule]
    if not frames or frames[0] != 0:
        raise EpisodeError(f"{where}: the prompt schedule must start at frame 0")
    if any(b <= a for a, b in zip(frames, frames[1:], strict=False)):
        raise EpisodeError(f"{where}: prompt frames must increase")
    if n is not None and frames[-1] >= n:
        raise EpisodeError(f"{where}: prompt at frame {frames[-1]} but the episode has {n} frames")


def _check_video(file: Path, width: int, height: int, n: int) -> None:
    if not file.is_file():
        raise EpisodeError(f"{file}: missing")
    av = import_av()
    try:
        with av.open(str(file)) as container:
            if not container.streams.video:
                raise EpisodeError(f"{file}: no video stream")
            stream = container.streams.video[0]
            size = (stream.codec_context.width, stream.codec_context.height)
            if size != (width, height):
                raise EpisodeError(f"{file}: video is {size[0]}x{size[1]}, meta.json says {width}x{height}")
            if stream.frames and stream.frames != n:
                raise EpisodeError(f"{file}: video has {stream.frames} frames, meta.json says {n}")
    except av.error.FFmpegError as err:
        raise EpisodeError(f"{file}: corrupt video ({err})") from None


def _check_frames(file: Path, shape: tuple[int, ...]) -> None:
    try:
        frames = np.load(file, mmap_mode="r")
    except FileNotFoundError:
        raise EpisodeError(f"{file}: missing (meta.json says the episode is lossless)") from None
    except ValueError as err:
        raise EpisodeError(f"{file}: corrupt ({err})") from None
    if frames.shape != shape or frames.dtype != np.uint8:
        raise EpisodeError(f"{file}: expected uint8 {shape}, got {frames.dtype} {frames.shape}")


def _make_parents(folder: Path) -> list[Path]:
    """Create missing parent folders; return the ones made (outermost first) so an abort can remove them."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    made = []
    for f in reversed(missing):
        try:
            f.mkdir()
        except OSError as err:
            for m in reversed(made):
                m.rmdir()
            raise EpisodeError(f"cannot create {f}: {err.strerror}") from None
        made.append(f)
    return made


def _commit(tmp: Path, path: Path) -> None:
    """Rename the finished folder into place, replacing an existing one only after the new one is complete."""
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        path.rename(old)
        tmp.rename(path)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        tmp.rename(path)
