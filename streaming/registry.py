"""The server's live sessions: resume ids, reattachment within a grace period, recordings.

A session outlives its websocket: when a connection drops without a clean close, its session is detached
(paused, frames dropped) and kept for ``grace_s`` seconds under its resume id, an unguessable token sent
in `ready`. A `start` carrying that id reattaches it, to a new connection, and takes it from a connection
that still holds it (a half-open socket after a network change). Runs on the event loop only.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from worldloop.streaming.engine import Engine
from worldloop.streaming.metrics import Metrics
from worldloop.streaming.protocol import ProtocolError
from worldloop.streaming.recording import Mp4Recorder, RecordingInfo, new_recording_name, recording_path
from worldloop.streaming.session import SessionHandle, SessionOptions

log = logging.getLogger(__name__)


class SessionOwner(Protocol):
    """The connection a session is attached to."""

    def session_replaced(self) -> None:
        """Another connection resumed the session."""

    def session_lost(self, error: BaseException) -> None:
        """The engine ended the session by itself (a model error)."""


@dataclass(eq=False)
class LiveSession:
    resume_id: str
    handle: SessionHandle
    options: SessionOptions
    owner: SessionOwner | None = None  # the connection attached to it, if any
    recorder: Mp4Recorder | None = None
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)


class SessionRegistry:
    def __init__(self, engine: Engine, *, grace_s: float = 10.0, record_dir: Path | None = None) -> None:
        self.engine = engine
        self.metrics: Metrics = engine.metrics
        self.grace_s = grace_s
        self.record_dir = record_dir
        self._sessions: dict[str, LiveSession] = {}
        self._ending: set[asyncio.Task[None]] = set()
        self._unfinished: set[str] = set()  # recordings not yet closed: never served

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, handle: SessionHandle, options: SessionOptions, owner: SessionOwner) -> LiveSession:
        """Register a started session under a fresh resume id."""
        live = LiveSession(secrets.token_urlsafe(18), handle, options, owner=owner)
        self._sessions[live.resume_id] = live
        loop = asyncio.get_running_loop()

        def closed(future: Future[None]) -> None:  # any thread
            try:
                loop.call_soon_threadsafe(self._closed_by_engine, live, future)
            except RuntimeError:  # the loop is gone: the server is down
                pass

        handle.closed.add_done_callback(closed)
        return live

    def _closed_by_engine(self, live: LiveSession, future: Future[None]) -> None:
        if self._sessions.pop(live.resume_id, None) is None:
            return  # we ended it ourselves
        if live.expiry is not None:
            live.expiry.cancel()
        if live.recorder is not None:  # the engine closed the writer before it closed the session
            self._unfinished.discard(live.recorder.path.name)
            live.recorder = None
        error = future.exception()
        if live.owner is not None and error is not None:
            live.owner.session_lost(error)
        self._update_gauges()

    def attach(self, resume_id: str, owner: SessionOwner) -> LiveSession:
        """Hand a session to a new connection; raise ``unknown_session`` if it has expired or never was."""
        live = self._sessions.get(resume_id)
        if live is None:
            raise ProtocolError("unknown_session", "no session with that resume id (it may have expired)",
                                request="start")
        if live.expiry is not None:
            live.expiry.cancel()
            live.expiry = None
        if live.owner is not None and live.owner is not owner:
            live.owner.session_replaced()
        live.owner = owner
        self._update_gauges()
        return live

    def detach(self, live: LiveSession, owner: SessionOwner) -> None:
        """The owner's connection is gone: pause the session and keep it for the grace period."""
        if live.owner is not owner or live.resume_id not in self._sessions:
            return
        live.owner = None
        live.handle.on_frame = None
        live.handle.paused = True
        if self.grace_s <= 0:
            self.end_soon(live)
        else:
            live.expiry = asyncio.get_running_loop().call_later(self.grace_s, self.end_soon, live)
        self._update_gauges()

    def end_soon(self, live: LiveSession) -> None:
        task = asyncio.get_running_loop().create_task(self.end(live))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def end(self, live: LiveSession) -> None:
        """Close a session for good: finish its recording, free its engine slot."""
        if self._sessions.pop(live.resume_id, None) is None:
            return
        if live.expiry is not None:
            live.expiry.cancel()
        try:
            await self.stop_recording(live)
        except Exception:
            log.exception("finishing the recording of session %d failed", live.handle.id)
        try:
            await asyncio.wrap_future(live.handle.close())
        except Exception as err:
            log.warning("session %d ended with an error: %s", live.handle.id, err)
        self._update_gauges()

    async def close_all(self) -> None:
        await asyncio.gather(*(self.end(live) for live in list(self._sessions.values())))
        if self._ending:
            await asyncio.gather(*self._ending, return_exceptions=True)

    # ---- recordings ----
    def active_recordings(self) -> set[str]:
        return set(self._unfinished)

    async def start_recording(self, live: LiveSession) -> str:
        """Start (or keep) recording a session; returns the file name."""
        if self.record_dir is None:
            raise ProtocolError("unsupported", "recording is off on this server (start it with --record-dir)",
                                request="record")
        if live.recorder is not None:
            return live.recorder.path.name
        height, width = self.engine.frame_shape
        path = recording_path(self.record_dir, new_recording_name(live.handle.id))
        recorder = await asyncio.to_thread(Mp4Recorder, path, width, height, live.handle.fps)
        live.recorder = recorder
        self._unfinished.add(path.name)
        try:
            await asyncio.wrap_future(live.handle.attach_writer(recorder))
        except Exception:
            live.recorder = None
            await asyncio.to_thread(recorder.close)
            self._unfinished.discard(path.name)
            raise
        self._update_gauges()
        return path.name

    async def stop_recording(self, live: LiveSession) -> RecordingInfo | None:
        recorder, live.recorder = live.recorder, None
        if recorder is None:
            return None
        try:
            await asyncio.wrap_future(live.handle.stop_writer())
        finally:
            info = await asyncio.to_thread(recorder.close)  # already closed by stop_writer unless it failed
            self._unfinished.discard(info.name)
            self._update_gauges()
        return info

    def _update_gauges(self) -> None:
        sessions = list(self._sessions.values())
        self.metrics.detached.set(sum(live.owner is None for live in sessions))
        self.metrics.recordings.set(len(self._unfinished))
