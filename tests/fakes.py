"""A fake world model with the ``WorldModel`` interface (docs/CONTRACTS.md), and helpers for streaming tests.

Frames are deterministic: each session carries a 64-bit state that every committed frame advances by
hashing (state, keys, prompt, frame index); a frame is a 4×4 grid of flat colour blocks drawn from the new
state, so JPEG keeps frames recognisable and any change of seed, keys, prompt or history changes them.
``step_delay`` (seconds per step call) and ``prompt_delay`` (per ``set_prompt``) stand in for the model's
compute. The fake checks its contract:
one calling thread, no double speculation beyond the slack, no plain step over a pending speculative frame.

``serve_fake`` runs an engine and a server on a free loopback port; ``RawClient`` is a thin websocket client
that sends anything (malformed messages included) and collects frames, acknowledging them;
``raw_websocket`` is a bare socket after the handshake, for clients that misbehave below the library.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.frames import Frame, Opcode

from worldloop.models.config import preset
from worldloop.streaming.engine import Engine
from worldloop.streaming.protocol import FrameHeader, unpack_frame
from worldloop.streaming.server import ServerConfig, WorldloopServer
from worldloop.streaming.session import Starts


def _mix(*parts: object) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def render(state: int, height: int, width: int) -> np.ndarray:
    """The image of a state: a 4×4 grid of flat colours (uint8, (H, W, 3))."""
    colours = np.random.default_rng(state).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return np.repeat(np.repeat(colours, height // 4, axis=0), width // 4, axis=1)


@dataclass
class FakeSession:
    slot: int
    prompt: str
    seed: int
    state: int = 0
    frame_index: int = 0
    pending: list[tuple[int, int]] = field(default_factory=list)  # speculative (state, frame_index)
    context: np.ndarray | None = None  # the first frames it started from (None: from the prompt)
    context_keys: list[int] | None = None

    def __post_init__(self) -> None:
        self.start()

    def start(self) -> None:
        """The stream's first state: from the seed, the prompt and the context frames (if any)."""
        frames = None if self.context is None else hashlib.blake2b(self.context.tobytes()).hexdigest()
        self.state, self.frame_index = _mix("start", self.seed, self.prompt, frames, self.context_keys), 0


@dataclass(frozen=True)
class FakeSnapshot:
    state: int
    frame_index: int
    prompt: str


class FakeWorldModel:
    """Implements new_session/step/commit/discard/set_prompt/reset/snapshot/restore/close_session."""

    def __init__(self, height: int = 32, width: int = 32, fps: int = 30, step_delay: float = 0.0,
                 max_sessions: int = 8, slack: int = 2, prompt_delay: float = 0.0) -> None:
        self.config = preset("tiny").replace(name="fake", height=height, width=width, fps=fps)
        self.device = "cpu"
        self.steps = 1
        self.frame_shape = (height, width)
        self.step_delay = step_delay
        self.prompt_delay = prompt_delay  # seconds per set_prompt: the window's re-caching
        self.max_sessions = max_sessions
        self.slack = slack
        self.calls: list[tuple[int, bool]] = []  # (batch size, speculative) per step call
        self.sessions_created = 0
        self.sessions: list[FakeSession] = []  # every session opened, in order
        self._slots: set[int] = set()
        self._thread: int | None = None
        self._lock = threading.Lock()

    def _check_thread(self) -> None:
        me = threading.get_ident()
        with self._lock:
            if self._thread is None:
                self._thread = me
        assert self._thread == me, "the model was called from two threads"

    def new_session(self, prompt: str, seed: int, first_frames: np.ndarray | None = None,
                    first_keys: Sequence[int] | None = None, first_poses: np.ndarray | None = None
                    ) -> FakeSession:
        self._check_thread()
        self._check_context(first_frames, first_keys, first_poses)
        free = [i for i in range(self.max_sessions) if i not in self._slots]
        if not free:
            raise RuntimeError(f"all {self.max_sessions} cache slots are in use")
        self._slots.add(free[0])
        self.sessions_created += 1
        keys = None if first_keys is None else [int(k) for k in first_keys]
        self.sessions.append(FakeSession(free[0], prompt, seed, context=first_frames, context_keys=keys))
        return self.sessions[-1]

    def _check_context(self, frames: np.ndarray | None, keys: Sequence[int] | None,
                       poses: np.ndarray | None = None) -> None:
        """As ``WorldModel``: uint8 (T, H, W, 3) at the frame size, one key state and pose per frame."""
        if frames is None:
            assert keys is None and poses is None, "first_keys or first_poses without first_frames"
            return
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (*self.frame_shape, 3):
            raise ValueError(f"first_frames must be uint8 (T, {self.frame_shape}, 3), got {frames.shape}")
        if keys is not None and len(keys) != len(frames):
            raise ValueError("first_keys must give one key state per first frame")
        if poses is not None and np.shape(poses) != (len(frames), 3):
            raise ValueError("first_poses must give one (x, y, heading) per first frame")

    def next_frame(self, sessions: Sequence[FakeSession], keys: Sequence[int],
             speculative: bool = False) -> np.ndarray:
        self._check_thread()
        if len(sessions) != len(keys) or not sessions:
            raise ValueError("step needs one key state per session")
        if self.step_delay:
            time.sleep(self.step_delay)
        self.calls.append((len(sessions), speculative))
        frames = []
        for s, k in zip(sessions, keys, strict=True):
            assert s.slot in self._slots, "step on a closed session"
            if speculative:
                assert len(s.pending) < self.slack, "more speculative frames than slack slots"
                state, index = s.pending[-1] if s.pending else (s.state, s.frame_index)
                state = _mix(state, int(k), s.prompt, index)
                s.pending.append((state, index + 1))
            else:
                assert not s.pending, "plain step while speculative frames are pending"
                s.state = _mix(s.state, int(k), s.prompt, s.frame_index)
                s.frame_index += 1
                state = s.state
            frames.append(render(state, *self.frame_shape))
        return np.stack(frames)

    def commit(self, session: FakeSession) -> None:
        self._check_thread()
        assert session.pending, "commit without a speculative frame"
        session.state, session.frame_index = session.pending[-1]
        session.pending.clear()

    def discard(self, session: FakeSession) -> None:
        self._check_thread()
        session.pending.clear()

    def set_prompt(self, session: FakeSession, prompt: str) -> None:
        self._check_thread()
        assert not session.pending, "set_prompt with pending speculative frames"
        if self.prompt_delay:
            time.sleep(self.prompt_delay)
        session.prompt = prompt

    def reset(self, session: FakeSession, prompt: str | None = None, seed: int | None = None,
              first_frames: np.ndarray | None = None, first_keys: Sequence[int] | None = None,
              first_poses: np.ndarray | None = None) -> None:
        self._check_thread()
        self._check_context(first_frames, first_keys, first_poses)
        session.pending.clear()
        session.prompt = session.prompt if prompt is None else prompt
        session.seed = session.seed if seed is None else seed
        session.context = first_frames
        session.context_keys = None if first_keys is None else [int(k) for k in first_keys]
        session.start()

    def snapshot(self, session: FakeSession) -> FakeSnapshot:
        self._check_thread()
        assert not session.pending, "snapshot with pending speculative frames"
        return FakeSnapshot(session.state, session.frame_index, session.prompt)

    def restore(self, session: FakeSession, snapshot: FakeSnapshot) -> None:
        self._check_thread()
        session.pending.clear()
        session.state, session.frame_index = snapshot.state, snapshot.frame_index
        session.prompt = snapshot.prompt

    def close_session(self, session: FakeSession) -> None:
        self._check_thread()
        self._slots.discard(session.slot)


@asynccontextmanager
async def serve_fake(model: FakeWorldModel | None = None, *, max_sessions: int = 4, speculative: bool = True,
                     starts: Starts | None = None, **config: Any) -> AsyncIterator[WorldloopServer]:
    """An engine on ``model`` (default: a fake) and a server on 127.0.0.1 at a free port."""
    engine = Engine(model or FakeWorldModel(), max_sessions=max_sessions, speculative=speculative,
                    starts=starts).start()
    server = WorldloopServer(engine, ServerConfig(**{"port": 0, **config}))
    try:
        await server.start()
        yield server
    finally:
        await server.close()
        await asyncio.to_thread(engine.close)


@dataclass
class ReceivedFrame:
    header: FrameHeader
    image: bytes


class RawClient:
    """A websocket client for tests: sends raw text/bytes, receives replies and frames (acking frames)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[ReceivedFrame] = []

    @classmethod
    @asynccontextmanager
    async def connect(cls, server: WorldloopServer, **kwargs: Any) -> AsyncIterator[RawClient]:
        async with connect(f"ws://127.0.0.1:{server.port}/ws", compression=None, **kwargs) as ws:
            yield cls(ws)

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(json.dumps(message) if isinstance(message, dict) else message)

    async def receive(self, timeout: float = 10.0) -> dict[str, Any] | ReceivedFrame:
        data = await asyncio.wait_for(self.ws.recv(), timeout)
        if isinstance(data, str):
            return json.loads(data)
        header, image = unpack_frame(data)
        frame = ReceivedFrame(header, image)
        self.frames.append(frame)
        await self.send({"type": "ack", "frame": header.frame_seq})
        return frame

    async def reply(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next text message; frames arriving before it are collected and acknowledged."""
        deadline = time.monotonic() + timeout
        while True:
            message = await self.receive(max(0.01, deadline - time.monotonic()))
            if isinstance(message, dict):
                return message

    async def start(self, **fields: Any) -> dict[str, Any]:
        await self.send({"type": "start", "prompt": "a stone dungeon", **fields})
        ready = await self.reply()
        assert ready["type"] == "ready", ready
        return ready

    async def frames_from(self, first_seq: int, count: int, timeout: float = 20.0) -> dict[int, bytes]:
        """Images of frames ``first_seq … first_seq + count - 1`` by offset from ``first_seq``.

        Waits until the last one has arrived. A frame may be missing: the server drops a frame when a newer
        one replaces it before it could be sent (latest frame wins), so callers compare the offsets present.
        """
        deadline = time.monotonic() + timeout
        last = first_seq + count - 1
        while not self.frames or self.frames[-1].header.frame_seq < last:
            message = await self.receive(max(0.01, deadline - time.monotonic()))
            assert not isinstance(message, dict) or message["type"] != "error", message
        return {f.header.frame_seq - first_seq: f.image for f in self.frames
                if first_seq <= f.header.frame_seq <= last}

    async def count_frames(self, seconds: float) -> int:
        """Frames received during ``seconds``."""
        before = len(self.frames)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                await self.receive(left)
            except asyncio.TimeoutError:
                break
        return len(self.frames) - before


def client_frame(opcode: Opcode, payload: bytes) -> bytes:
    """One masked client-to-server websocket frame, as bytes on the wire."""
    return Frame(opcode, payload).serialize(mask=True)


@asynccontextmanager
async def raw_websocket(port: int, receive_buffer: int = 4096) -> AsyncIterator[
        tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A websocket to ``/ws`` on a bare socket with a small receive buffer: the test decides what is read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                 .encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    try:
        yield reader, writer
    finally:
        writer.transport.abort()
