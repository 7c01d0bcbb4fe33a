"""Shared parts of the abuse benchmarks (``flood.py``, ``soak.py``): a server in a child process, a canary
client that counts the frames it receives each second, and attackers, each in its own process.

The server runs alone in its process (engine + websocket server on 127.0.0.1), as `worldloop serve` does;
the canary runs in the benchmark's process and the attackers in theirs, so an attacker's own work is not
charged to the server's event loop. Every attacker reconnects when the server drops it, to keep up the
pressure. Attacks:

- ``errors``: invalid JSON as fast as the socket takes it (no session);
- ``pings``: websocket pings as fast as the socket takes them (no session);
- ``idle``: as many idle connections as the server admits, reopened when closed;
- ``peer``: a quiet second session (the baseline for the session attacks);
- ``prompts5`` / ``prompts100``: a session changing its prompt 5 / 100 times a second;
- ``stalled``: a session whose client never reads (``soak.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import multiprocessing
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ATTACKS = ("errors", "pings", "idle", "peer", "prompts5", "prompts100", "stalled")


def load_fakes() -> ModuleType:
    """``tests/fakes.py`` (the fake world model), which is not part of the installed package."""
    spec = importlib.util.spec_from_file_location("worldloop_test_fakes", REPO / "tests" / "fakes.py")
    assert spec is not None and spec.loader is not None
    fakes = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = fakes  # dataclasses look their module up there
    spec.loader.exec_module(fakes)
    return fakes


@dataclass(frozen=True)
class ModelSource:
    """What the server serves: the test fake, a preset with random weights, or a model directory."""

    fake: bool = False
    fake_step_ms: float = 5.0
    preset: str | None = "tiny"
    model: str | None = None
    threads: int = 1

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelSource:
        return cls(fake=args.fake, fake_step_ms=args.fake_step_ms, preset=args.preset, model=args.model,
                   threads=args.threads)

    def build(self) -> Any:
        if self.fake:
            return load_fakes().FakeWorldModel(height=128, width=128, step_delay=self.fake_step_ms / 1000)
        import torch

        from worldloop.app.loading import choose_model, load_model

        torch.set_num_threads(self.threads)
        choice = choose_model(self.model, None if self.model else self.preset, fallback=True)
        return load_model(choice, device="cpu", max_sessions=4)


def argument_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options both benchmarks take: what the server serves, its threads, the canary's FPS."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="DIR", help="a model directory, e.g. assets/default")
    source.add_argument("--preset", default="tiny", help="a preset with random weights (default: tiny)")
    source.add_argument("--fake", action="store_true", help="the test fake (tests/fakes.py), not a model")
    parser.add_argument("--fake-step-ms", type=float, default=5.0, help="the fake's time per step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server (default: 1)")
    parser.add_argument("--fps", type=int, default=30, help="the canary's FPS")
    return parser


def _serve(source: ModelSource, ports: Any) -> None:
    """The child process: serve until terminated."""
    from worldloop.streaming.engine import Engine
    from worldloop.streaming.server import ServerConfig, WorldloopServer

    engine = Engine(source.build(), max_sessions=4).start()

    async def run() -> None:
        async with WorldloopServer(engine, ServerConfig(port=0)) as server:
            ports.put(server.port)
            await asyncio.Event().wait()

    asyncio.run(run())


class ServerProcess:
    """``with ServerProcess(source) as server:`` a server on ``server.url``; ``rss_mb()`` is its memory."""

    def __init__(self, source: ModelSource) -> None:
        context = multiprocessing.get_context("spawn")
        self._ports = context.Queue()
        self.process = context.Process(target=_serve, args=(source, self._ports), daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def __enter__(self) -> ServerProcess:
        self.process.start()
        self.port = self._ports.get(timeout=300)
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.join(10)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def health(self) -> dict[str, Any]:
        import json
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=10) as answer:
            return dict(json.loads(answer.read()))


# ---- the canary ------------------------------------------------------------------------------------------

class Canary:
    """A well-behaved session that counts the frames it receives, second by second."""

    def __init__(self, url: str, fps: int) -> None:
        self.url, self.fps = url, fps
        self.per_second: list[int] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Canary:
        from worldloop.streaming.client import WorldloopClient

        self.client = await WorldloopClient(self.url).connect()
        await self.client.start("a dark stone dungeon with torch-lit walls", seed=1, fps=self.fps)
        self._task = asyncio.get_running_loop().create_task(self._count())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.close()

    async def _count(self) -> None:
        second, count = time.monotonic() + 1.0, 0
        while True:
            await self.client.next_frame(30)
            count += 1
            while time.monotonic() >= second:
                self.per_second.append(count)
                second, count = second + 1.0, 0

    async def fps_over(self, seconds: float) -> float:
        """Frames received per second over the next ``seconds`` (whole seconds)."""
        before = len(self.per_second)
        await asyncio.sleep(seconds)
        counts = self.per_second[before:]
        return sum(counts) / len(counts) if counts else 0.0


# ---- attackers -------------------------------------------------------------------------------------------

@contextlib.contextmanager
def attacking(kind: str, url: str, seconds: float) -> Iterator[None]:
    """Run attack ``kind`` against ``url`` in a child process for at most ``seconds``; returns once the
    attacker is connected (its imports and start-up are not measured)."""
    context = multiprocessing.get_context("spawn")
    connected = context.Event()
    process = context.Process(target=_attack_child, args=(kind, url, seconds, connected), daemon=True)
    process.start()
    try:
        if not connected.wait(60):
            raise RuntimeError(f"the {kind} attacker did not connect")
        yield
    finally:
        process.terminate()
        process.join(10)


def _attack_child(kind: str, url: str, seconds: float, connected: Any) -> None:
    asyncio.run(_attack(kind, url, time.monotonic() + seconds, connected))


async def _attack(kind: str, url: str, deadline: float, connected: Any) -> None:
    from websockets.asyncio.client import connect

    if kind == "idle":
        await _idle(url, deadline, connected)
        return
    attack = _ATTACKS[kind]
    while time.monotonic() < deadline:
        try:
            async with connect(url, compression=None, max_size=2**24, open_timeout=10) as ws:
                connected.set()
                await attack(ws, deadline)
        except Exception:  # dropped or refused: come back
            await asyncio.sleep(0.05)


async def _flood(ws: Any, deadline: float, frame: bytes, read: bool = True) -> None:
    reader = asyncio.get_running_loop().create_task(_drain(ws)) if read else None
    try:
        while time.monotonic() < deadline and not ws.transport.is_closing():
            if ws.transport.get_write_buffer_size() < 1 << 20:
                ws.transport.write(frame * 64)
            await asyncio.sleep(0)
    finally:
        if reader is not None:
            reader.cancel()


async def _drain(ws: Any, ack: bool = False) -> None:
    import json
    import struct

    async for data in ws:
        if ack and isinstance(data, bytes):  # the frame header's seq (docs/protocol.md); no torch import
            await ws.send(json.dumps({"type": "ack", "frame": struct.unpack_from("<I", data, 4)[0]}))


def _frame(opcode_name: str, payload: bytes) -> bytes:
    from websockets.frames import Frame, Opcode

    return Frame(Opcode[opcode_name], payload).serialize(mask=True)


async def _errors(ws: Any, deadline: float) -> None:
    await _flood(ws, deadline, _frame("TEXT", b"{not json"))


async def _pings(ws: Any, deadline: float) -> None:
    await _flood(ws, deadline, _frame("PING", b"p" * 16))


async def _session(ws: Any, deadline: float, prompts_per_s: float = 0.0, read: bool = True) -> None:
    import json

    await ws.send(json.dumps({"type": "start", "prompt": "a neon city at night", "seed": 2}))
    reader = asyncio.get_running_loop().create_task(_drain(ws, ack=True)) if read else None
    try:
        i = 0
        while time.monotonic() < deadline and not ws.transport.is_closing():
            if prompts_per_s:
                i += 1
                await ws.send(json.dumps({"type": "prompt", "prompt": f"a neon city, variation {i}"}))
                await asyncio.sleep(1 / prompts_per_s)
            else:
                await asyncio.sleep(0.5)
            if reader is not None and reader.done():
                return
    finally:
        if reader is not None:
            reader.cancel()


async def _idle(url: str, deadline: float, connected: Any) -> None:
    from websockets.asyncio.client import connect

    async def hold() -> None:
        while time.monotonic() < deadline:
            try:
                async with connect(url, open_timeout=10) as ws:
                    connected.set()
                    await ws.wait_closed()
            except Exception:
                await asyncio.sleep(0.2)

    tasks = [asyncio.get_running_loop().create_task(hold()) for _ in range(80)]
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


_ATTACKS: dict[str, Callable[[Any, float], Awaitable[None]]] = {
    "errors": _errors,
    "pings": _pings,
    "peer": _session,
    "prompts5": lambda ws, deadline: _session(ws, deadline, 5.0),
    "prompts100": lambda ws, deadline: _session(ws, deadline, 100.0),
    "stalled": lambda ws, deadline: _session(ws, deadline, read=False),
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")
