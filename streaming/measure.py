"""Measuring frames as a player gets them, shared by ``worldloop bench`` (``app/bench.py``) and
``benchmarks/``: frames of a ``WorldModel`` stepped and JPEG-encoded in this thread (``run_frames``), and the
websocket path through a ``WorldloopClient`` (``sustained_fps``, ``key_latencies``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from worldloop.models.timing import sync
from worldloop.models.world_model import FrameTimings, WorldModel
from worldloop.streaming.client import WorldloopClient
from worldloop.streaming.encoding import encode_image

KEY_CYCLE = (1, 1, 17, 1, 33, 1, 0, 2)  # forward, forward+turn_left, …: held keys change now and then


@dataclass
class FrameSamples:
    """Per ``next_frame`` call: wall and process-CPU ms of the whole frame, and its parts."""

    wall_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    dit_ms: list[float] = field(default_factory=list)
    decode_ms: list[float] = field(default_factory=list)
    encode_ms: list[float] = field(default_factory=list)
    forwards: int = 0


def run_frames(wm: WorldModel, sessions: Sequence[Any], count: int, *, quality: int | None = None,
               autocast: bool = False) -> FrameSamples:
    """``count`` frames of every session (one batched ``next_frame`` each; keys cycle through ``KEY_CYCLE``).

    ``quality``: also JPEG-encode every frame, as the server does. ``autocast``: bf16 autocast.
    """
    samples, seen = FrameSamples(), []
    previous, wm.on_timings = wm.on_timings, seen.append
    try:
        for _ in range(count):
            keys = [KEY_CYCLE[sessions[0].frame_index % len(KEY_CYCLE)]] * len(sessions)
            sync(wm.device)
            wall, cpu = time.perf_counter(), time.process_time()
            with torch.autocast(wm.device.type, dtype=torch.bfloat16, enabled=autocast):
                rgb = wm.next_frame(sessions, keys)  # no_grad inside, as in the engine
            encode = time.perf_counter()
            if quality is not None:
                for frame in rgb:
                    encode_image(frame, "jpeg", quality)
            end = time.perf_counter()
            timings: FrameTimings = seen[-1]
            samples.wall_ms.append((end - wall) * 1e3)
            samples.cpu_ms.append((time.process_time() - cpu) * 1e3)
            samples.dit_ms.append(timings.dit_ms)
            samples.decode_ms.append(timings.decode_ms)
            samples.encode_ms.append((end - encode) * 1e3)
            samples.forwards = timings.forwards
    finally:
        wm.on_timings = previous
    return samples


async def sustained_fps(client: WorldloopClient, seconds: float) -> float:
    """Frames received per second over ``seconds``."""
    start, count = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        await client.next_frame(10)
        count += 1
    return count / (time.monotonic() - start)


async def key_latencies(client: WorldloopClient, trials: int, fps: int, seed: int = 0) -> list[float]:
    """ms from sending `keys` to the first frame made with them, sent at random phases of the frame clock."""
    rng = random.Random(seed)
    latencies = []
    for i in range(trials):
        await asyncio.sleep(rng.uniform(0, 1 / fps))
        while client.buffered:  # frames already here were made before the change
            await client.next_frame(10)
        sent = time.monotonic()
        seq = await client.set_keys(["forward", "turn_left"][i % 2])
        while (await client.next_frame(10)).key_seq < seq:
            pass
        latencies.append((time.monotonic() - sent) * 1000)
    return latencies
