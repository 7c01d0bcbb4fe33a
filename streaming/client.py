"""A Python client for the worldloop server: ``WorldloopClient`` (asyncio) and ``SyncClient`` (blocking).

    async with WorldloopClient("ws://127.0.0.1:8765/ws") as client:
        await client.start("a frozen ice cave", seed=1)
        await client.set_keys("w+q")
        async for frame in client.frames():      # acknowledged as they are taken
            rgb = frame.image                    # uint8 (H, W, 3), decoded on first access

    with SyncClient("ws://127.0.0.1:8765/ws") as client:   # the same, for scripts and game loops
        client.start("a frozen ice cave")
        frame = client.latest_frame()            # the newest frame; older waiting ones are skipped

Frames are acknowledged when the program takes them, so a slow program slows only its own stream.
Requests (`prompt`, `snapshot`, …) return the server's reply or raise ``RequestFailed`` with its error code.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from worldloop.models.keys import parse_keys
from worldloop.streaming.encoding import decode_image
from worldloop.streaming.protocol import (
    Bye,
    Done,
    Error,
    FrameHeader,
    Ready,
    Recording,
    ServerMessage,
    Snapshot,
    Stats,
    parse_server_message,
    unpack_frame,
)

T = TypeVar("T")
REPLY_TYPES = {"start": "ready", "prompt": "ok", "reset": "ok", "restore": "ok", "snapshot": "snapshot",
               "record": "recording", "stats": "stats"}


class RequestFailed(Exception):
    """The server answered a request with an `error`."""

    def __init__(self, error: Error) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.code = error.code
        self.message = error.message


class Disconnected(ConnectionError):
    """The connection closed; ``reason`` is the server's `bye` reason when it sent one."""


@dataclass(eq=False)
class ReceivedFrame:
    header: FrameHeader
    data: bytes  # the JPEG/WebP image
    received_at: float = field(default_factory=time.monotonic)

    @property
    def seq(self) -> int:
        return self.header.frame_seq

    @property
    def key_seq(self) -> int:
        return self.header.key_seq

    @cached_property
    def image(self) -> np.ndarray:
        return decode_image(self.data)


class WorldloopClient:
    def __init__(self, url: str, *, token: str | None = None, origin: str | None = None,
                 open_timeout: float = 10.0) -> None:
        self.url = url
        self.token = token
        self.origin = origin
        self.open_timeout = open_timeout
        self.ready: Ready | None = None
        self.bye: Bye | None = None
        self.errors: list[Error] = []  # errors that answered no request (e.g. to `keys`)
        self.key_seq = 0
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._frames: deque[ReceivedFrame] = deque()
        self._arrived = asyncio.Event()
        self._closed = False
        self._pending: deque[tuple[str, asyncio.Future[Any]]] = deque()
        self._acked = -1

    async def connect(self) -> WorldloopClient:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        self._ws = await connect(self.url, additional_headers=headers, origin=self.origin,  # type: ignore[arg-type]
                                 compression=None, open_timeout=self.open_timeout, max_size=2**24)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return self

    async def __aenter__(self) -> WorldloopClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    # ---- requests ----
    async def start(self, prompt: str, seed: int = 0, *, fps: int | None = None, steps: int | None = None,
                    image_format: str = "jpeg", quality: int = 80, resume: str | None = None) -> Ready:
        """Begin a session (or resume one by its id from an earlier `ready`)."""
        body: dict[str, Any] = {"prompt": prompt, "seed": seed, "format": image_format, "quality": quality}
        if fps is not None:
            body["fps"] = fps
        if steps is not None:
            body["steps"] = steps
        if resume is not None:
            body["session"] = resume
        self.ready = await self._request("start", body)
        return self.ready

    async def set_keys(self, keys: int | str | Iterable[str]) -> int:
        """Hold these keys from the next frame on (bitmask, "w+a" or names); returns the key seq sent."""
        self.key_seq += 1
        await self._send({"type": "keys", "keys": parse_keys(keys), "seq": self.key_seq})
        return self.key_seq

    async def set_prompt(self, prompt: str) -> int:
        """Returns the seq of the first frame made under the new prompt."""
        reply: Done = await self._request("prompt", {"prompt": prompt})
        return reply.frame

    async def reset(self, prompt: str | None = None, seed: int | None = None) -> int:
        body = {k: v for k, v in (("prompt", prompt), ("seed", seed)) if v is not None}
        reply: Done = await self._request("reset", body)
        return reply.frame

    async def snapshot(self) -> Snapshot:
        return await self._request("snapshot", {})

    async def restore(self, snapshot_id: int) -> int:
        """Returns the seq of the first frame after the restore."""
        reply: Done = await self._request("restore", {"id": snapshot_id})
        return reply.frame

    async def record(self, action: str) -> Recording:
        return await self._request("record", {"action": action})

    async def stats(self) -> Stats:
        return await self._request("stats", {})

    # ---- frames ----
    @property
    def buffered(self) -> int:
        """Frames received and not yet taken."""
        return len(self._frames)

    async def next_frame(self, timeout: float | None = None) -> ReceivedFrame:
        """The next frame in order (acknowledged now); raises ``Disconnected`` once the stream has ended."""
        await self._wait_frame(timeout)
        frame = self._frames.popleft()
        await self._ack(frame.seq)
        return frame

    async def latest_frame(self, timeout: float | None = None) -> ReceivedFrame:
        """The newest frame: older frames already here are skipped; waits if none is here."""
        await self._wait_frame(timeout)
        frame = self._frames.pop()
        self._frames.clear()
        await self._ack(frame.seq)
        return frame

    async def _wait_frame(self, timeout: float | None) -> None:
        # asyncio.wait, not wait_for: Python 3.11's wait_for can swallow the caller's cancellation.
        waiter = asyncio.ensure_future(self._until_frame())
        try:
            done, _ = await asyncio.wait({waiter}, timeout=timeout)
        finally:
            waiter.cancel()
        if not done:
            raise asyncio.TimeoutError(f"no frame within {timeout} s")
        waiter.result()

    async def _until_frame(self) -> None:
        while not self._frames:
            if self._closed:
                raise Disconnected(self.bye.reason if self.bye else "connection closed")
            self._arrived.clear()
            await self._arrived.wait()

    async def frames(self) -> AsyncIterator[ReceivedFrame]:
        """Every frame until the connection closes."""
        while True:
            try:
                yield await self.next_frame()
            except Disconnected:
                return

    # ---- internals ----
    async def _send(self, body: dict[str, Any]) -> None:
        if self._ws is None:
            raise Disconnected("not connected")
        await self._ws.send(json.dumps(body, allow_nan=False))

    async def _request(self, kind: str, body: dict[str, Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((kind, future))
        await self._send({"type": kind, **body})
        return await future

    async def _ack(self, seq: int) -> None:
        if seq > self._acked:
            self._acked = seq
            try:
                await self._send({"type": "ack", "frame": seq})
            except Exception:
                pass  # the reader reports the disconnect

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for data in self._ws:
                if isinstance(data, bytes):
                    header, image = unpack_frame(data)
                    self._frames.append(ReceivedFrame(header, image))
                    self._arrived.set()
                else:
                    self._on_message(parse_server_message(data))
        except Exception:
            pass
        finally:
            reason = self.bye.reason if self.bye else "connection closed"
            for _, future in self._pending:
                if not future.done():
                    future.set_exception(Disconnected(reason))
            self._pending.clear()
            self._closed = True
            self._arrived.set()

    def _on_message(self, message: ServerMessage) -> None:
        if isinstance(message, Bye):
            self.bye = message
            return
        if isinstance(message, Error):
            for i, (kind, future) in enumerate(self._pending):
                if kind == message.request:
                    del self._pending[i]
                    future.set_exception(RequestFailed(message))
                    if message.code == "server_full":
                        self.bye = Bye(reason="closed")
                    return
            self.errors.append(message)
            return
        for i, (kind, future) in enumerate(self._pending):
            if REPLY_TYPES[kind] == message.type:
                del self._pending[i]
                if not future.done():
                    future.set_result(message)
                return


class SyncClient:
    """``WorldloopClient`` for blocking code: its event loop runs in a background thread."""

    def __init__(self, url: str, *, token: str | None = None, origin: str | None = None,
                 timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="worldloop-client", daemon=True)
        self._thread.start()
        self.client = WorldloopClient(url, token=token, origin=origin)
        try:
            self._call(self.client.connect())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(timeout if timeout is not None else self.timeout)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, prompt: str, seed: int = 0, **options: Any) -> Ready:
        return self._call(self.client.start(prompt, seed, **options))

    def set_keys(self, keys: int | str | Iterable[str]) -> int:
        return self._call(self.client.set_keys(keys))

    def set_prompt(self, prompt: str) -> int:
        return self._call(self.client.set_prompt(prompt))

    def reset(self, prompt: str | None = None, seed: int | None = None) -> int:
        return self._call(self.client.reset(prompt, seed))

    def snapshot(self) -> Snapshot:
        return self._call(self.client.snapshot())

    def restore(self, snapshot_id: int) -> int:
        return self._call(self.client.restore(snapshot_id))

    def record(self, action: str) -> Recording:
        return self._call(self.client.record(action))

    def stats(self) -> Stats:
        return self._call(self.client.stats())

    def next_frame(self, timeout: float | None = None) -> ReceivedFrame:
        return self._call(self.client.next_frame(timeout), None if timeout is None else timeout + 1)

    def latest_frame(self, timeout: float | None = None) -> ReceivedFrame:
        return self._call(self.client.latest_frame(timeout), None if timeout is None else timeout + 1)

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                self._call(self.client.close(), 10.0)
            finally:
                self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        self._loop.close()
