"""A connection's replies in request order, carried out by one task (``Connection._reply_loop``).

Each request that has an answer puts one item in the ``ReplyQueue``: a ready message, an error, a command to
carry out first (a coroutine function: the queue runs commands one at a time, in order), or ``Dropped``
for commands the rate limit refused. Consecutive ``Dropped`` of one request type merge into one, answered
by a single `rate_limited` that says how many, so a flood of refused commands costs one reply.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from worldloop.streaming.protocol import ProtocolError, ServerMessage


@dataclass
class Dropped:
    """Consecutive commands of one type dropped by the rate limit: one `rate_limited` answers them all."""

    request: str
    count: int = 1


# What the reply task answers with: a reply, an error, dropped commands, or a command to carry out first.
Reply = ServerMessage | ProtocolError | Dropped | Callable[[], Awaitable[ServerMessage]]


class ReplyQueue:
    """Replies in request order, at most ``limit`` waiting (``put`` waits); a ``Dropped`` right after another
    for the same request type is merged into it, so a flood of rate-limited commands costs one reply."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.busy = False  # the reply task is carrying out the item it took
        self._items: deque[Reply] = deque()
        self._changed = asyncio.Condition()

    async def put(self, item: Reply) -> None:
        last = self._items[-1] if self._items else None
        if isinstance(item, Dropped) and isinstance(last, Dropped) and last.request == item.request:
            last.count += 1
            return
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._items) < self.limit)
            self._items.append(item)
            self._changed.notify_all()

    async def take(self) -> Reply:
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._items))
            self.busy = True
            item = self._items.popleft()
            self._changed.notify_all()
            return item

    async def done(self) -> None:
        async with self._changed:
            self.busy = False
            self._changed.notify_all()

    async def idle(self) -> None:
        """Wait until every queued reply has been posted."""
        async with self._changed:
            await self._changed.wait_for(lambda: not self._items and not self.busy)
