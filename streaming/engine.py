"""The engine: one world model on one device, one generation thread stepping every live session.

Transport-free; the websocket server and the Gradio app both drive it in-process. How it works:

1. ``open_session`` admits a session (or raises ``EngineFull`` before any model state exists) and returns a
   ``SessionHandle`` (streaming/session.py); the model session is created on the generation thread
   (``handle.started``).
2. The generation thread loops: create/close sessions, make one frame for every session that is due,
   batched into a single ``model.next_frame`` call, then run queued commands (prompt, reset, snapshot,
   restore, recording). Sessions are paced at their own FPS; one that runs late skips the missed deadlines
   instead of bursting to catch up. A paused session makes no frames.
   Commands are costed and scheduled: a session's commands run in a gap before the other sessions' next
   frames as long as the moving average of command time. Without a gap they run only if the session has not
   taken more than ``command_share`` (5%) of the time from the others: commands that took ``t`` s from them
   hold its next ones back for ``t / command_share`` s. The session that sent them also pays with its own
   stream: its next frame moves back by the time they took. A prompt change re-caches the whole window (tens
   of ms on a CPU), so this keeps one client's prompt changes from taking other sessions' frames.
3. Speculative frames: with time left before the next deadline, a session's next frame is made early with
   the keys held now (``next_frame(..., speculative=True)``). When it is due and the keys are unchanged it is
   committed and emitted at once. A key change discards it at once (so does any command), and the frame for
   the new keys is made early in its place if there is time: a key change then shows up at the next
   deadline rather than one model frame after it.
4. Each frame is encoded (JPEG/WebP) and written to the session's recording, if any, on a shared thread
   pool, in order per session (``SerialLane``); then the session's ``on_frame`` callback gets it.

Usage (in-process, e.g. from a UI)::

    engine = Engine(model, max_sessions=4).start()
    handle = engine.open_session(SessionOptions("a dark stone dungeon", seed=1), on_frame=callback)
    handle.started.result()            # the model session exists
    handle.set_keys(parse_keys("w"), seq=1)
    handle.snapshot().result()         # (snapshot id, next frame seq)
    handle.close().result(); engine.close()
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from worldloop.streaming.encoding import encode_image
from worldloop.streaming.metrics import Metrics
from worldloop.streaming.session import (
    EngineFull,
    Frame,
    FrameWriter,
    SessionClosed,
    SessionHandle,
    SessionOptions,
    Speculative,
    StartFrames,
    Starts,
    WorldModelLike,
    check_picture,
    start_kwargs,
)

log = logging.getLogger(__name__)


class Engine:
    """Owns the model and the generation thread; see the module docstring."""

    def __init__(self, model: WorldModelLike, *, max_sessions: int = 4, fps: int | None = None,
                 speculative: bool = True, max_snapshots: int = 8, encode_workers: int = 2,
                 metrics: Metrics | None = None, trained: bool = True, command_share: float = 0.05,
                 starts: Starts | None = None) -> None:
        if max_sessions < 1 or max_snapshots < 1 or encode_workers < 1:
            raise ValueError("max_sessions, max_snapshots and encode_workers must be ≥ 1")
        self.model = model
        self.trained = trained  # False for random weights: clients are told, and show it
        self.max_sessions = max_sessions
        self.fps = int(fps or model.config.fps)
        self.speculative = speculative
        self.max_snapshots = max_snapshots
        if not 0 < command_share <= 1:
            raise ValueError(f"command_share must be in (0, 1], got {command_share}")
        # A session's commands may take at most this share of the time of the other sessions' frames.
        self.command_share = command_share
        self.metrics = metrics or Metrics()
        self.metrics.sessions.set(0)
        self.starts = starts or Starts()  # where sessions start: the built-in world, a picture or the prompt
        if self.starts.picture is not None:
            check_picture(self.starts.picture, self.frame_shape)
        self._pool = ThreadPoolExecutor(encode_workers, thread_name_prefix="worldloop-encode")
        # World starts are rendered here, so a session starting never holds up the others' frames.
        self._starter = ThreadPoolExecutor(1, thread_name_prefix="worldloop-start")
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._incoming: list[SessionHandle] = []
        self._live: list[SessionHandle] = []  # generation thread only
        self._admitted = 0
        self._next_id = 1
        self._per_session_frame_s = 0.0  # moving average of frame time per session, for speculation
        self._command_s = 0.0  # moving average of the time one session's queued commands take
        self._thread = threading.Thread(target=self._run, name="worldloop-engine", daemon=True)

    # ---- public API ----
    @property
    def frame_shape(self) -> tuple[int, int]:
        height, width = self.model.frame_shape
        return int(height), int(width)

    @property
    def model_name(self) -> str:
        return self.model.config.name

    @property
    def device(self) -> str:
        return str(getattr(self.model, "device", "cpu"))

    @property
    def steps(self) -> int:
        return int(self.model.steps)

    @property
    def session_count(self) -> int:
        """Sessions admitted and not yet closed."""
        with self._lock:
            return self._admitted

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> Engine:
        self._thread.start()
        if self.starts.world is not None:  # the first world start pays one-off costs (imports): pay them now
            self._starter.submit(self.starts.world, "", 0)
        return self

    def __enter__(self) -> Engine:
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_session(self, options: SessionOptions, on_frame: Callable[[Frame], None] | None = None, *,
                     paused: bool = False) -> SessionHandle:
        """Admit a session or raise ``EngineFull``; the model session is created on the engine thread.

        ``paused=True`` keeps it from making frames until ``handle.paused = False`` (e.g. once its consumer
        is ready).
        """
        if options.fps is not None and not 1 <= options.fps <= 120:
            raise ValueError(f"fps must be in 1..120, got {options.fps}")
        if options.image_format not in ("jpeg", "webp", "raw") or not 1 <= options.quality <= 100:
            raise ValueError(f"bad image options: {options.image_format!r}, quality {options.quality}")
        if options.picture is not None:
            check_picture(options.picture, self.frame_shape)
        self.starts.resolve(options.start_from, options.picture)  # ValueError before anything is admitted
        with self._lock:
            if self._stopping.is_set():
                raise EngineFull("the server is shutting down")
            if self._admitted >= self.max_sessions:
                raise EngineFull(f"all {self.max_sessions} sessions are in use")
            self._admitted += 1
            handle = SessionHandle(self._next_id, options, options.fps or self.fps, model=self.model,
                                   metrics=self.metrics, pool=self._pool, wake=self._wake,
                                   max_snapshots=self.max_snapshots, on_frame=on_frame, starts=self.starts,
                                   starter=self._starter)
            handle.paused = paused
            self._next_id += 1
        self.metrics.sessions.set(self.session_count)
        # The start's frames first (a world is rendered on the starter thread), then the engine thread
        # creates the model session from them.
        prepared = handle.prepare_start(handle.start_from, options.prompt, options.seed, handle.picture)
        prepared.add_done_callback(functools.partial(self._prepared, handle))
        return handle

    def _prepared(self, handle: SessionHandle, start: Future[StartFrames | None]) -> None:
        """A session's start frames are ready (or failed): hand it to the engine thread."""
        error = start.exception()
        with self._lock:
            queued = error is None and not self._stopping.is_set()
            if queued:
                handle.start_frames = start.result()
                self._incoming.append(handle)
        if queued:
            self._wake.set()
            return
        self._release()
        handle.started.set_exception(error or SessionClosed("the engine stopped"))
        handle.closed.set_result(None)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the generation thread, close every session (finishing writers), then the encoder pool."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        elif self._thread.ident is None:
            self._close_all()
        self._starter.shutdown(wait=True)
        self._pool.shutdown(wait=True)

    # ---- generation thread: the loop and session lifetimes ----
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                self._admit()
                for handle in [h for h in self._live if h.close_requested]:
                    self._end_session(handle, None)
                self._frames_due()
                self._run_commands()
                wait = self._speculate()
                if wait > 0:
                    self._wake.wait(wait)
        except Exception:
            log.exception("the engine's generation thread failed")
        finally:
            self._close_all()

    def _admit(self) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for handle in incoming:
            if handle.close_requested:
                self._release()
                handle.started.set_exception(SessionClosed(f"session {handle.id} closed before it started"))
                handle.closed.set_result(None)
                continue
            try:
                handle.model_session = self.model.new_session(handle.options.prompt, handle.options.seed,
                                                              **start_kwargs(handle.start_frames))
                handle.start_frames = None
            except Exception as err:
                log.warning("could not start session %d: %s", handle.id, err)
                self._release()
                handle.started.set_exception(err)
                handle.closed.set_result(None)
                continue
            handle.next_due = time.monotonic()
            self._live.append(handle)
            handle.started.set_result(None)

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1
        self.metrics.sessions.set(self.session_count)

    def _end_session(self, handle: SessionHandle, error: BaseException | None) -> None:
        """Free a live session's model slot and finish its output (after its queued frames)."""
        handle.fail_commands()
        if handle in self._live:
            self._live.remove(handle)
        try:
            handle.drop_speculation()
            self.model.close_session(handle.model_session)
        except Exception:
            log.exception("closing session %d failed", handle.id)
        self._release()
        writer, handle.writer = handle.writer, None

        def finish() -> None:
            try:
                if writer is not None:
                    writer.close()
            finally:
                if handle.closed.done():
                    pass
                elif error is not None:
                    handle.closed.set_exception(error)
                else:
                    handle.closed.set_result(None)

        if not handle.lane.submit(finish):
            finish()

    def _close_all(self) -> None:
        with self._lock:
            self._stopping.set()
            incoming, self._incoming = self._incoming, []
        for handle in incoming:
            self._release()
            handle.started.set_exception(SessionClosed("the engine stopped"))
            handle.closed.set_result(None)
        for handle in list(self._live):
            self._end_session(handle, None)

    def _run_commands(self) -> None:
        """Run each session's queued commands when they fit before the other sessions' next frames, or when
        the session has not taken more than its ``command_share`` of time from the others; the session also
        pays for them with its own next frame."""
        for handle in list(self._live):
            if not handle.has_commands():
                continue
            now = time.monotonic()
            others = [h.next_due for h in self._live if h is not handle and not h.paused]
            room = min(others) - now if others else float("inf")
            if room < self._command_s and now < handle.commands_after:
                continue  # no gap now, and this session has taken its share of time from the others
            handle.run_commands()
            end = time.monotonic()
            took = end - now
            self._command_s = took if self._command_s == 0 else 0.8 * self._command_s + 0.2 * took
            handle.next_due = max(handle.next_due, end) + took
            stolen = took - max(room, 0.0)  # time taken from the other sessions' next frames
            if stolen > 0:
                handle.commands_after = end + stolen / self.command_share

    # ---- generation thread: frames ----
    def _frames_due(self) -> None:
        now = time.monotonic()
        due: list[SessionHandle] = []
        for handle in self._live:
            if handle.paused:
                handle.next_due = max(handle.next_due, now)  # no backlog builds up while paused
            elif handle.next_due <= now:
                due.append(handle)
        if not due:
            return
        fresh: list[tuple[SessionHandle, int, int]] = []
        for handle in due:
            mask, seq = handle.keys
            spec = handle.spec
            if spec is not None and spec.keys == mask:
                handle.spec = None
                self.model.commit(handle.model_session)
                handle.speculative_kept += 1
                self.metrics.speculative.inc("kept")
                self._emit(handle, spec.rgb, mask, seq, spec.started_at, speculative=True)
            else:
                handle.drop_speculation()
                fresh.append((handle, mask, seq))
        if fresh:
            self._frame_batch(fresh)
        end = time.monotonic()
        for handle in due:
            self._advance(handle, end)

    def _frame_batch(self, batch: list[tuple[SessionHandle, int, int]]) -> None:
        started = time.monotonic()
        try:
            rgb = self.model.next_frame([h.model_session for h, _, _ in batch], keys=[m for _, m, _ in batch])
        except Exception as err:
            log.exception("model frame failed; closing the %d session(s) in the batch", len(batch))
            for handle, _, _ in batch:
                self._end_session(handle, err)
            return
        self._observe_step(time.monotonic() - started, len(batch))
        for i, (handle, mask, seq) in enumerate(batch):
            self._emit(handle, rgb[i], mask, seq, started, speculative=False)

    def _observe_step(self, seconds: float, batch: int) -> None:
        self.metrics.step_seconds.observe(seconds)
        per_session, average = seconds / batch, self._per_session_frame_s
        self._per_session_frame_s = per_session if average == 0 else 0.8 * average + 0.2 * per_session

    def _advance(self, handle: SessionHandle, now: float) -> None:
        """Move a session's deadline one period on; if that has already passed, skip ahead (no bursting)."""
        period = 1.0 / handle.fps
        handle.next_due += period
        if handle.next_due < now:
            missed = int((now - handle.next_due) // period)
            if missed:
                handle.deadlines_missed += missed
                self.metrics.deadlines_missed.inc(amount=missed)
            handle.next_due = now

    def _emit(self, handle: SessionHandle, rgb: np.ndarray, mask: int, key_seq: int, started_at: float,
              speculative: bool) -> None:
        seq = handle.next_seq
        handle.next_seq += 1
        handle.generated += 1
        handle.rate.tick()
        self.metrics.frames_generated.inc()
        self.metrics.generated_rate.tick()
        frame = Frame(seq, key_seq, mask, np.ascontiguousarray(rgb), b"", handle.options.image_format,
                      started_at, time.time() * 1000.0, speculative)
        # The writer is taken now, so a recording holds exactly the frames made between its start and stop.
        handle.lane.submit(functools.partial(self._output, handle, frame, handle.writer))

    def _output(self, handle: SessionHandle, frame: Frame, writer: FrameWriter | None) -> None:
        """On the encoder pool, in order per session: encode, record, hand over."""
        options = handle.options
        if options.image_format != "raw":
            frame = dataclasses.replace(frame, payload=encode_image(frame.rgb, options.image_format,
                                                                    options.quality))
        if writer is not None:
            try:
                writer.write(frame.rgb)
            except Exception:
                log.exception("session %d: writing a frame to its recording failed", handle.id)
        consumer = handle.on_frame
        if consumer is None:
            self.metrics.frames_dropped.inc()
        else:
            consumer(frame)

    def _speculate(self) -> float:
        """Make speculative frames if there is time before the next deadline; return the time to wait."""
        active = [h for h in self._live if not h.paused]
        if not active:
            return 0.5
        for handle in active:
            if handle.spec is not None and handle.spec.keys != handle.keys[0]:
                handle.drop_speculation()  # made for keys no longer held
        earliest = min(h.next_due for h in active)
        budget = earliest - time.monotonic()
        if self.speculative and budget > 0.002:
            candidates = [h for h in active if h.spec is None and h.generated and not h.has_commands()]
            # As many as fit before the deadline. Running a little over costs nothing when the keys hold:
            # the frame is then committed the moment it is due instead of being made from scratch.
            cost = max(self._per_session_frame_s, 1e-4) * 1.1
            candidates = candidates[:int(budget / cost)]
            if candidates:
                self._speculate_batch(candidates)
        return max(0.0, earliest - time.monotonic())

    def _speculate_batch(self, batch: list[SessionHandle]) -> None:
        started = time.monotonic()
        masks = [h.keys[0] for h in batch]
        try:
            rgb = self.model.next_frame([h.model_session for h in batch], keys=masks, speculative=True)
        except Exception:
            log.exception("speculative frame failed; speculation is now off")
            self.speculative = False
            return
        self._observe_step(time.monotonic() - started, len(batch))
        for i, handle in enumerate(batch):
            handle.spec = Speculative(np.ascontiguousarray(rgb[i]), masks[i], started)

