"""A session in the engine: its options, its frames, and the handle through which it is controlled.

``SessionHandle`` has two halves. Its public methods may be called from any thread: they set the held keys,
pause the session, or queue a command and return a ``concurrent.futures.Future``. Its private ``_run_*``
methods and the state below them belong to the engine's generation thread, the only thread that touches
the model.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from worldloop.models.config import ModelConfig
from worldloop.streaming.encoding import SerialLane
from worldloop.streaming.metrics import Metrics, RateMeter
from worldloop.streaming.protocol import FrameHeader

OutputFormat = Literal["jpeg", "webp", "raw"]
StartFrom = Literal["world", "prompt", "picture"]
START_FROM: tuple[StartFrom, ...] = ("world", "prompt", "picture")


class WorldModelLike(Protocol):
    """The part of ``models.world_model.WorldModel`` the engine uses (see docs/CONTRACTS.md)."""

    config: ModelConfig
    steps: int

    @property
    def frame_shape(self) -> tuple[int, int]: ...
    def new_session(self, prompt: str, seed: int, first_frames: np.ndarray | None = None,
                    first_keys: Sequence[int] | None = None,
                    first_poses: np.ndarray | None = None) -> Any: ...
    def next_frame(self, sessions: Sequence[Any], keys: Sequence[int],
                   speculative: bool = False) -> np.ndarray: ...
    def commit(self, session: Any) -> None: ...
    def discard(self, session: Any) -> None: ...
    def set_prompt(self, session: Any, prompt: str) -> None: ...
    def reset(self, session: Any, prompt: str | None = None, seed: int | None = None,
              first_frames: np.ndarray | None = None, first_keys: Sequence[int] | None = None,
              first_poses: np.ndarray | None = None) -> None: ...
    def snapshot(self, session: Any) -> Any: ...
    def restore(self, session: Any, snapshot: Any) -> None: ...
    def close_session(self, session: Any) -> None: ...


class FrameWriter(Protocol):
    """A sink for every frame of a session in order (e.g. ``streaming.recording.Mp4Recorder``)."""

    def write(self, rgb: np.ndarray) -> None: ...
    def close(self) -> Any: ...


class EngineFull(Exception):
    """The engine is at its session limit (or shutting down)."""


class UnknownSnapshot(LookupError):
    """No snapshot with that id (never taken, or evicted)."""


class SessionClosed(Exception):
    """The session was closed before the command ran."""


@dataclass(frozen=True, eq=False)
class StartFrames:
    """The context a stream starts from: real frames uint8 (N, H, W, 3), the key bitmask each was made
    with (``keys[0]`` led to the first) and, when known, each frame's camera in the world's grid (N, 3): x, y
    in tiles and the heading in radians (a model with a surface memory needs it; all NaN: unknown, the model
    fits one)."""

    frames: np.ndarray
    keys: tuple[int, ...]
    poses: np.ndarray | None = None


# (prompt, seed) → the first frames of a fresh built-in world for the prompt's theme. The app injects it
# (``app/starts.py``): the streaming layer knows nothing of the built-in world.
WorldStart = Callable[[str, int], StartFrames]


class Starts:
    """Where sessions start: ``"world"`` (frames of a fresh built-in world from the ``world`` provider, the
    way playable world models start from a real frame), ``"picture"`` (a user's picture, already at the
    model's frame size: uint8 (H, W, 3)) or ``"prompt"`` (no context: the first frame is drawn from the
    prompt alone). ``default`` is the start of sessions that do not ask for one."""

    def __init__(self, world: WorldStart | None = None, default: StartFrom | None = None,
                 picture: np.ndarray | None = None) -> None:
        self.world, self.picture = world, picture
        self.default: StartFrom = default or ("world" if world is not None else "prompt")
        self.check(self.default, picture)

    def check(self, start_from: StartFrom, picture: np.ndarray | None) -> None:
        """ValueError for a start this engine cannot make."""
        if start_from not in START_FROM:
            raise ValueError(f"start_from must be one of {', '.join(START_FROM)}, got {start_from!r}")
        if start_from == "world" and self.world is None:
            raise ValueError("this engine has no built-in world to start sessions from")
        if start_from == "picture" and picture is None:
            raise ValueError("a start from a picture needs the picture")
        if picture is not None and (picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[2] != 3):
            raise ValueError(f"a start picture must be uint8 (H, W, 3), got {picture.dtype} {picture.shape}")

    def resolve(self, start_from: StartFrom | None, picture: np.ndarray | None
                ) -> tuple[StartFrom, np.ndarray | None]:
        """The start a session asked for (None: the default; a picture alone means "picture") and its
        picture (the engine's own when it asked for none); ValueError when it cannot be made."""
        if start_from is None:
            start_from = "picture" if picture is not None else self.default
        if start_from == "picture":
            picture = self.picture if picture is None else picture
        elif picture is not None:
            raise ValueError(f"a picture was given for a start from the {start_from}")
        self.check(start_from, picture)
        return start_from, picture

    def frames(self, start_from: StartFrom, prompt: str, seed: int, picture: np.ndarray | None
               ) -> StartFrames | None:
        """The context frames of a start (None: from the prompt alone). A picture is one frame made with no
        keys, as the first frame of every training clip, its pose unknown (NaN: a model with a surface memory
        fits one); a world start renders the world (slow: milliseconds
        to tenths of a second, so the engine calls this off its generation thread)."""
        if start_from == "prompt":
            return None
        if start_from == "picture":
            assert picture is not None
            return StartFrames(picture[None], (0,), np.full((1, 3), np.nan))  # pose unknown: fitted
        assert self.world is not None
        return self.world(prompt, seed)


@dataclass(frozen=True, eq=False)
class SessionOptions:
    prompt: str
    seed: int = 0
    fps: int | None = None  # None: the engine's FPS (the model's configured FPS by default)
    image_format: OutputFormat = "jpeg"  # "raw": no encoding, for in-process consumers
    quality: int = 80
    start_from: StartFrom | None = None  # None: the engine's default (``Starts.default``)
    picture: np.ndarray | None = None  # uint8 (H, W, 3) at the model's frame size, for "picture"


@dataclass(frozen=True)
class Frame:
    """One generated frame as delivered to a session's ``on_frame``."""

    seq: int  # per session: 0, 1, 2, … in delivery order
    key_seq: int  # seq of the keys that produced it (0: none set yet)
    keys: int  # the key bitmask that produced it
    rgb: np.ndarray  # uint8 (H, W, 3)
    payload: bytes  # the encoded image (b"" for the raw format)
    image_format: OutputFormat
    started_at: float  # time.monotonic() when the model call that made it started
    server_time_ms: float  # Unix time in ms when its generation finished
    speculative: bool

    def header(self) -> FrameHeader:
        h, w = self.rgb.shape[:2]
        return FrameHeader(self.seq, self.key_seq, w, h, self.server_time_ms)


@dataclass(frozen=True)
class SessionStats:
    frame: int  # seq of the next frame
    frames_generated: int
    deadlines_missed: int
    speculative_kept: int
    speculative_discarded: int
    fps: float  # frames generated per second over the last 2 s


@dataclass
class Speculative:
    """A frame generated ahead into the cache's slack slots, not yet committed."""

    rgb: np.ndarray
    keys: int
    started_at: float


def _settle(future: Future[Any], fn: Callable[[], Any]) -> None:
    try:
        future.set_result(fn())
    except Exception as err:
        future.set_exception(err)


def _chain(source: Future[Any], target: Future[Any]) -> None:
    """When ``source`` is done, settle ``target`` the same way."""
    def copy(done: Future[Any]) -> None:
        error = done.exception()
        if error is not None:
            target.set_exception(error)
        else:
            target.set_result(done.result())

    source.add_done_callback(copy)


def start_kwargs(start: StartFrames | None) -> dict[str, Any]:
    """``new_session``/``reset`` keyword arguments for a start (none for a start from the prompt)."""
    if start is None:
        return {}
    kwargs: dict[str, Any] = {"first_frames": start.frames, "first_keys": list(start.keys)}
    if start.poses is not None:
        kwargs["first_poses"] = start.poses
    return kwargs


class SessionHandle:
    """One session in the engine; created by ``Engine.open_session``."""

    def __init__(self, session_id: int, options: SessionOptions, fps: int, *, model: WorldModelLike,
                 metrics: Metrics, pool: Executor, wake: threading.Event, max_snapshots: int,
                 on_frame: Callable[[Frame], None] | None, starts: Starts | None = None,
                 starter: Executor | None = None) -> None:
        self.id = session_id
        self.options = options
        self.fps = fps
        self.on_frame = on_frame  # swapped by whoever consumes the frames; None drops them
        self.prompt, self.seed = options.prompt, options.seed  # now: `prompt`, `reset`, `restore` change them
        self._starts = starts or Starts()
        self._starter = starter or pool  # where world starts are rendered, off the generation thread
        # How the stream (re)starts: `reset` keeps it unless told otherwise.
        self.start_from, self.picture = self._starts.resolve(options.start_from, options.picture)
        self.start_frames: StartFrames | None = None  # the context of the first start (engine thread)
        self.started: Future[None] = Future()  # the model session exists (or the error that stopped it)
        self.closed: Future[None] = Future()  # result None, or the error that ended the session
        self._wake = wake
        self._paused = False
        self._keys = (0, 0)  # (bitmask, seq), replaced as one tuple
        self._commands: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self.commands_after = 0.0  # time.monotonic() before which its commands wait for a gap (engine)
        self._lock = threading.Lock()
        self.close_requested = False
        # Generation-thread state.
        self._model = model
        self._metrics = metrics
        self._max_snapshots = max_snapshots
        self.model_session: Any = None
        self.next_due = 0.0
        self.next_seq = 0
        self.spec: Speculative | None = None
        self.writer: FrameWriter | None = None
        self.lane = SerialLane(pool)
        self._snapshots: OrderedDict[int, tuple[Any, str, int]] = OrderedDict()  # id → (state, prompt, seed)
        self._snapshot_ids = 0
        self.rate = RateMeter()
        self.generated = self.deadlines_missed = self.speculative_kept = self.speculative_discarded = 0

    # ---- any thread ----
    @property
    def keys(self) -> tuple[int, int]:
        return self._keys

    def set_keys(self, mask: int, seq: int) -> None:
        """Hold ``mask`` from the next frame on; ``seq`` is reported in the frame headers."""
        changed = int(mask) != self._keys[0]
        self._keys = (int(mask), int(seq))
        if changed:
            self._wake.set()  # a speculative frame for the old keys can be replaced right away

    @property
    def paused(self) -> bool:
        return self._paused

    @paused.setter
    def paused(self, value: bool) -> None:
        """A paused session makes no frames (its consumer is busy or gone) and does not fall behind."""
        if value != self._paused:
            self._paused = value
            self._wake.set()

    def set_prompt(self, prompt: str) -> Future[int]:
        """Switch the prompt; resolves to the seq of the first frame made under it."""
        return self._submit(functools.partial(self._run_set_prompt, prompt))

    def reset(self, prompt: str | None = None, seed: int | None = None, start_from: StartFrom | None = None,
              picture: np.ndarray | None = None) -> Future[int]:
        """Start the stream again, the way it started unless ``start_from``/``picture`` say otherwise (a world
        start renders a fresh world for the new prompt and seed); resolves to the seq of the first frame of
        the new stream. A start that cannot be made raises ValueError here."""
        if start_from is None and picture is None:
            start_from, picture = self.start_from, self.picture
        if picture is not None:
            check_picture(picture, tuple(self._model.frame_shape))
        start_from, picture = self._starts.resolve(start_from, picture)
        prompt_now = self.prompt if prompt is None else prompt  # the world's theme comes from this prompt
        seed_now = self.seed if seed is None else seed
        result: Future[int] = Future()

        def prepared(frames: StartFrames | None) -> None:
            command = functools.partial(self._run_reset, prompt, seed, start_from, picture, frames)
            _chain(self._submit(command), result)

        self.prepare_start(start_from, prompt_now, seed_now, picture).add_done_callback(
            lambda f: _chain(f, result) if f.exception() else prepared(f.result()))
        return result

    def prepare_start(self, start_from: StartFrom, prompt: str, seed: int, picture: np.ndarray | None
                      ) -> Future[StartFrames | None]:
        """The start's context frames, rendered on the starter pool when they come from the world."""
        if start_from != "world":
            done: Future[StartFrames | None] = Future()
            _settle(done, lambda: self._starts.frames(start_from, prompt, seed, picture))
            return done
        return self._starter.submit(self._starts.frames, start_from, prompt, seed, picture)

    def snapshot(self) -> Future[tuple[int, int]]:
        """Resolves to (snapshot id, seq of the next frame); the oldest snapshots beyond the limit go."""
        return self._submit(self._run_snapshot)

    def restore(self, snapshot_id: int) -> Future[int]:
        """Rewind to a snapshot; resolves to the seq of the first frame after it, or fails UnknownSnapshot."""
        return self._submit(functools.partial(self._run_restore, snapshot_id))

    def attach_writer(self, writer: FrameWriter) -> Future[None]:
        """Every frame made from now on also goes to ``writer`` (in order, on the encoder pool)."""
        return self._submit(functools.partial(self._run_attach_writer, writer))

    def stop_writer(self) -> Future[Any]:
        """Detach the writer after the frames already made; resolves to ``writer.close()`` (None if none)."""
        closed: Future[Any] = Future()

        def detach() -> None:  # generation thread; the writer is closed on the lane, after its last frame
            writer, self.writer = self.writer, None
            task = functools.partial(_settle, closed, writer.close if writer else lambda: None)
            if not self.lane.submit(task):
                task()

        command = self._submit(detach)
        command.add_done_callback(
            lambda f: None if f.exception() is None or closed.done() else closed.set_exception(f.exception()))
        return closed

    def close(self) -> Future[None]:
        """End the session and free its model slot; an attached writer is closed after the last frame."""
        with self._lock:
            self.close_requested = True
        self._wake.set()
        return self.closed

    def stats(self) -> SessionStats:
        return SessionStats(self.next_seq, self.generated, self.deadlines_missed, self.speculative_kept,
                            self.speculative_discarded, self.rate.rate())

    def _submit(self, command: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self.close_requested:
                future.set_exception(SessionClosed(f"session {self.id} is closed"))
                return future
            self._commands.append((command, future))
        self._wake.set()
        return future

    # ---- generation thread ----
    def has_commands(self) -> bool:
        return bool(self._commands)

    def run_commands(self) -> None:
        with self._lock:
            commands = list(self._commands)
            self._commands.clear()
        for command, future in commands:
            if future.set_running_or_notify_cancel():
                _settle(future, command)

    def fail_commands(self) -> None:
        with self._lock:
            self.close_requested = True
            commands = list(self._commands)
            self._commands.clear()
        for _, future in commands:
            future.set_exception(SessionClosed(f"session {self.id} is closed"))

    def drop_speculation(self) -> None:
        if self.spec is not None:
            self.spec = None
            self._model.discard(self.model_session)
            self.speculative_discarded += 1
            self._metrics.speculative.inc("discarded")

    def _run_set_prompt(self, prompt: str) -> int:
        self.drop_speculation()
        self._model.set_prompt(self.model_session, prompt)
        self.prompt = prompt
        return self.next_seq

    def _run_reset(self, prompt: str | None, seed: int | None, start_from: StartFrom,
                   picture: np.ndarray | None, start: StartFrames | None) -> int:
        self.drop_speculation()
        self._model.reset(self.model_session, prompt=prompt, seed=seed, **start_kwargs(start))
        self.prompt = self.prompt if prompt is None else prompt
        self.seed = self.seed if seed is None else seed
        self.start_from, self.picture = start_from, picture
        return self.next_seq

    def _run_snapshot(self) -> tuple[int, int]:
        self.drop_speculation()
        self._snapshot_ids += 1
        state = self._model.snapshot(self.model_session)
        self._snapshots[self._snapshot_ids] = (state, self.prompt, self.seed)
        while len(self._snapshots) > self._max_snapshots:
            self._snapshots.popitem(last=False)
        return self._snapshot_ids, self.next_seq

    def _run_restore(self, snapshot_id: int) -> int:
        if snapshot_id not in self._snapshots:
            raise UnknownSnapshot(f"no snapshot {snapshot_id} (only the last {self._max_snapshots} are kept)")
        self.drop_speculation()
        state, self.prompt, self.seed = self._snapshots[snapshot_id]
        self._model.restore(self.model_session, state)
        return self.next_seq

    def _run_attach_writer(self, writer: FrameWriter) -> None:
        if self.writer is not None:
            raise RuntimeError(f"session {self.id} is already being recorded")
        self.writer = writer


def check_picture(picture: np.ndarray, frame_shape: tuple[int, int]) -> None:
    """A start picture is uint8 RGB at the model's frame size (``models.images.read_picture`` makes one)."""
    if picture.dtype != np.uint8 or picture.shape != (*frame_shape, 3):
        h, w = frame_shape
        raise ValueError(f"a start picture must be uint8 ({h}, {w}, 3), got {picture.dtype} {picture.shape}")
