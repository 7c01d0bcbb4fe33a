"""One connection's sender: a 1-slot latest-frame mailbox, a control queue, acks, and send deadlines.

Each connection runs ``Outbox.run`` as its own task, so a slow or stalled client only ever blocks its own
sender, never the engine or other clients. Rules (docs/protocol.md, "Flow control"):

- Control messages (replies, errors, `bye`) go first, in order. The connection reads the client's next
  request only when there is ``room`` (under half of ``max_control`` waiting), so a burst of requests is
  answered at the pace the client reads the answers; more than ``max_control`` waiting still means the client
  is not reading, and it is dropped.
- Frames: at most ``max_in_flight`` sent and not yet acknowledged. A newer frame replaces an unsent one
  (latest frame wins; the replaced one counts as dropped). While a frame waits for the window to open,
  ``on_backpressure(True)`` pauses the session's generation. A waiting frame older than ``max_frame_age`` s
  when the window opens is dropped (counted stale) and generation resumes, so a slow reader gets a fresh
  frame rather than one that waited for it.
- Deadlines: a send that does not complete within ``send_timeout`` s, or an unacknowledged frame older than
  ``ack_timeout`` s, raises ``Stalled``; the caller aborts the connection.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from worldloop.streaming.metrics import Metrics


class Stalled(Exception):
    """The client stopped reading; ``reason`` is a metrics label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class OutgoingFrame:
    seq: int
    data: bytes  # the whole binary message: header + image
    started_at: float  # time.monotonic() when the step that made it started
    ready_at: float = 0.0  # time.monotonic() when it was encoded and offered


class Outbox:
    def __init__(self, send: Callable[[str | bytes], Awaitable[None]], metrics: Metrics, *,
                 max_in_flight: int = 2, send_timeout: float = 3.0, ack_timeout: float = 5.0,
                 max_control: int = 64) -> None:
        self._send_fn = send
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.send_timeout = send_timeout
        self.ack_timeout = ack_timeout
        self.max_control = max_control
        self.max_frame_age: float | None = None  # seconds; None: a waiting frame never goes stale
        self.on_backpressure: Callable[[bool], None] = lambda paused: None
        self._control: deque[str] = deque()
        self._frame: OutgoingFrame | None = None
        self._in_flight: deque[tuple[int, float]] = deque()  # (seq, time sent)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._space = asyncio.Event()  # set whenever a control message has gone out
        self._overflow = False
        self._backpressure = False
        self.sent = self.dropped = 0  # frames, this connection
        self._running = False
        self._stopped = False

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def offer(self, frame: OutgoingFrame) -> None:
        """Make ``frame`` the next frame to send, replacing an unsent older one."""
        if self._frame is not None:
            self.dropped += 1
            self.metrics.frames_dropped.inc()
        self._frame = frame
        self._changed()

    def post(self, text: str) -> None:
        """Queue a control message; too many queued marks the client as stalled."""
        if len(self._control) >= self.max_control:
            self._overflow = True
        else:
            self._control.append(text)
            self._idle.clear()
        self._wake.set()

    def ack(self, seq: int) -> None:
        """The client has received every frame up to ``seq``."""
        while self._in_flight and self._in_flight[0][0] <= seq:
            self._in_flight.popleft()
        self._changed()

    def clear_frames(self) -> None:
        """Forget frames of a previous session (a new session was attached to this connection)."""
        self._frame = None
        self._in_flight.clear()
        self._changed()

    async def room(self) -> None:
        """Wait while half of ``max_control`` replies or more are waiting to be sent (returns at once when the
        sender has stopped)."""
        while self._running and not self._stopped and len(self._control) >= self.max_control // 2:
            self._space.clear()
            await self._space.wait()

    async def drain(self, timeout: float) -> bool:
        """Wait until the control queue is empty; False on timeout or when the sender has stopped."""
        if not self._running:
            return self._idle.is_set()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def stop(self) -> None:
        """Make ``run`` return after the send in progress (if any)."""
        self._stopped = True
        self._wake.set()

    async def run(self) -> None:
        """Send until ``stop()``; raises ``Stalled`` when a deadline passes."""
        self._running = True
        try:
            await self._send_loop()
        finally:
            self._running = False
            self._idle.set()  # nothing more will be sent: release drain() and room() waiters
            self._space.set()

    async def _send_loop(self) -> None:
        # Stopped by a flag, not by cancellation: Python 3.11's wait_for can swallow a cancellation.
        while not self._stopped:
            self._wake.clear()
            if self._overflow:
                raise Stalled("control_overflow")
            if self._control:
                await self._send(self._control.popleft())
                self._space.set()
                if not self._control:
                    self._idle.set()
                continue
            if self._frame is not None and len(self._in_flight) < self.max_in_flight:
                frame, self._frame = self._frame, None
                if self._stale(frame):
                    self._changed()  # generation resumes and makes a fresh frame
                    continue
                await self._send(frame.data)
                self._in_flight.append((frame.seq, time.monotonic()))
                self.sent += 1
                self.metrics.frames_sent.inc()
                self.metrics.frame_latency.observe(time.monotonic() - frame.started_at)
                self._changed()
                continue
            await self._wait()

    def _stale(self, frame: OutgoingFrame) -> bool:
        if self.max_frame_age is None or time.monotonic() - frame.ready_at <= self.max_frame_age:
            return False
        self.dropped += 1
        self.metrics.frames_dropped.inc()
        self.metrics.frames_stale.inc()
        return True

    async def _wait(self) -> None:
        timeout = None
        if self._in_flight:
            timeout = self._in_flight[0][1] + self.ack_timeout - time.monotonic()
            if timeout <= 0:
                raise Stalled("ack_deadline")
        waiter = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({waiter}, timeout=timeout)
        finally:
            waiter.cancel()

    async def _send(self, data: str | bytes) -> None:
        try:
            await asyncio.wait_for(self._send_fn(data), self.send_timeout)
        except asyncio.TimeoutError:
            raise Stalled("send_deadline") from None

    def _changed(self) -> None:
        backpressure = self._frame is not None and len(self._in_flight) >= self.max_in_flight
        if backpressure != self._backpressure:
            self._backpressure = backpressure
            self.on_backpressure(backpressure)
        self._wake.set()
