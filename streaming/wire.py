"""The websocket under the protocol: the library's ``ServerConnection`` with an inbound budget, a stall check.

Two rules the library cannot express, enforced where frames enter and leave the socket:

1. **Inbound budget.** Every frame a client sends (text, binary, ping, pong, fragments alike) costs
   ``1 + size // 4096`` tokens from a ``TokenBucket`` (``message_rate`` a second after ``message_burst``).
   In debt, the socket is not read until the debt is paid, so TCP pushes back on the client; the
   ``Connection`` above also waits before handling each message (``wait_for_budget``) and tells the client
   `rate_limited` once per episode (``on_throttled``). Debt beyond another whole burst is a flood: the
   connection is closed (1008).
2. **Write stall.** When the transport's write buffer goes over its high-water mark the socket stops reading
   (a client that does not read is not read from either, so its pings stop making pongs), and if the buffer
   has not drained within ``send_timeout`` s the connection is aborted, whatever filled it: frames, replies,
   pongs or the keepalive's own pings.

``stall_reason`` says why this layer ended the connection (a metrics label), or is None.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.frames import CloseCode, Frame
from websockets.protocol import Event

from worldloop.streaming.limits import TokenBucket

COST_BYTES = 4096  # a message costs one token per started 4 KiB on top of one


@dataclass(frozen=True)
class WireLimits:
    message_rate: float = 200.0  # inbound frames a second per connection…
    message_burst: int = 400  # …after a burst of this many
    send_timeout_s: float = 3.0  # the write buffer must drain within this


class GuardedConnection(ServerConnection):
    """A ``ServerConnection`` enforcing ``WireLimits``; made by ``serve(create_connection=...)``."""

    def __init__(self, *args: Any, limits: WireLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.budget = TokenBucket(limits.message_rate, limits.message_burst)
        self.on_throttled: Callable[[], None] = lambda: None
        self.stall_reason: str | None = None
        self._paused_by: set[str] = set()  # "queue" (the library's), "budget", "write"
        self._reading_paused = False
        self._in_debt = False
        self._budget_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None

    async def wait_for_budget(self) -> None:
        """Return once this connection's message budget is out of debt."""
        while (wait := self.budget.wait_s()) > 0:
            await asyncio.sleep(wait)

    # ---- reading ----
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # The library pauses reading when its message queue is full; route that through the same gate.
        self.recv_messages.pause = lambda: self._gate("queue", True)
        self.recv_messages.resume = lambda: self._gate("queue", False)

    def process_event(self, event: Event) -> None:
        if self.request is not None and isinstance(event, Frame):  # a frame after the handshake
            if self.stall_reason is not None:
                return
            if not self._charge(1 + len(event.data) // COST_BYTES):
                return
        super().process_event(event)

    def _charge(self, cost: int) -> bool:
        left = self.budget.charge(cost)
        if left >= 0:
            return True
        if left < -self.limits.message_burst:
            self._drop("flood", CloseCode.POLICY_VIOLATION, "too many messages")
            return False
        if not self._in_debt:
            self._in_debt = True
            self.on_throttled()
        self._gate("budget", True)
        if self._budget_timer is None:
            self._budget_timer = self.loop.call_later(self.budget.wait_s(), self._budget_check)
        return True

    def _budget_check(self) -> None:
        self._budget_timer = None
        wait = self.budget.wait_s()
        if wait > 0:
            self._budget_timer = self.loop.call_later(wait, self._budget_check)
            return
        self._in_debt = False
        self._gate("budget", False)

    def _gate(self, reason: str, paused: bool) -> None:
        (self._paused_by.add if paused else self._paused_by.discard)(reason)
        want = bool(self._paused_by)
        if want != self._reading_paused and not self.transport.is_closing():
            self._reading_paused = want
            (self.transport.pause_reading if want else self.transport.resume_reading)()

    # ---- writing ----
    def pause_writing(self) -> None:
        super().pause_writing()
        self._gate("write", True)
        self._stall_timer = self.loop.call_later(self.limits.send_timeout_s, self._drop, "send_deadline")

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._gate("write", False)

    def _drop(self, reason: str, code: CloseCode | None = None, text: str = "") -> None:
        if self.stall_reason is not None:
            return
        self.stall_reason = reason
        if code is not None and not self.paused:  # say why, if the client can still take it
            self.protocol.fail(code, text)
            self.send_data()
            self.loop.call_later(1.0, self.transport.abort)
        else:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._budget_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)
