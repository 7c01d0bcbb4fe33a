"""Serving speed: sustained FPS, key-to-frame latency and CPU use of `worldloop serve`, one and N clients.

    python benchmarks/serve_latency.py --preset tiny
    python benchmarks/serve_latency.py --model assets/default --clients 4 --json runs/serve_latency.json
    python benchmarks/serve_latency.py --fake --fake-step-ms 5      # the transport alone (tests/fakes.py)

The server (engine + websocket server) runs in this process on 127.0.0.1, the clients too (same event loop,
frames not decoded), over real loopback sockets. Measured:

- sustained FPS of one session at the target FPS (frames received per second, after a warm-up);
- key-to-frame latency: from sending a `keys` message to receiving the first frame whose header reports that
  key seq (p50/p95 over many key changes, sent at random phases of the frame clock);
- CPU: process CPU time over wall time (100% = one core), server and client together;
- N concurrent sessions: FPS of each.
Prints a table and a JSON record naming the hardware.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from abuse import load_fakes

from worldloop.models.timing import cpu_seconds, hardware, load_average, percentile
from worldloop.streaming.client import WorldloopClient
from worldloop.streaming.engine import Engine
from worldloop.streaming.measure import key_latencies, sustained_fps
from worldloop.streaming.server import ServerConfig, WorldloopServer


def build_model(args: argparse.Namespace) -> Any:
    if args.fake:
        return load_fakes().FakeWorldModel(height=args.fake_size, width=args.fake_size,
                                           step_delay=args.fake_step_ms / 1000)
    from worldloop.app.loading import choose_model, load_model

    choice = choose_model(args.model, args.preset, fallback=True)
    return load_model(choice, device=args.device, steps=args.steps, max_sessions=max(args.clients, 1))


async def one_session(args: argparse.Namespace, url: str) -> dict[str, Any]:
    async with WorldloopClient(url) as client:
        ready = await client.start("a dark stone dungeon with torch-lit walls", seed=1, fps=args.fps)
        await sustained_fps(client, args.warmup)
        cpu0, wall0 = cpu_seconds(), time.monotonic()
        fps = await sustained_fps(client, args.seconds)
        cpu = (cpu_seconds() - cpu0) / (time.monotonic() - wall0) * 100
        latencies = await key_latencies(client, args.trials, args.fps)
        stats = await client.stats()
    return {
        "model": ready.model, "size": f"{ready.width}x{ready.height}", "steps": ready.steps,
        "target_fps": args.fps,
        "one_session": {
            "fps": round(fps, 2), "cpu_percent": round(cpu, 1),
            "key_to_frame_ms": {"p50": round(percentile(latencies, 0.5), 1),
                                "p95": round(percentile(latencies, 0.95), 1),
                                "mean": round(statistics.fmean(latencies), 1), "trials": len(latencies)},
            "speculative_kept": stats.speculative_kept,
            "speculative_discarded": stats.speculative_discarded,
            "deadlines_missed": stats.deadlines_missed,
        },
    }


async def concurrent_sessions(args: argparse.Namespace, url: str) -> dict[str, Any]:
    clients = [await WorldloopClient(url).connect() for _ in range(args.clients)]
    try:
        for i, client in enumerate(clients):
            await client.start("a frozen ice cave", seed=10 + i, fps=args.fps)
        await asyncio.gather(*(sustained_fps(c, args.warmup) for c in clients))
        cpu0, wall0 = cpu_seconds(), time.monotonic()
        each = await asyncio.gather(*(sustained_fps(c, args.seconds) for c in clients))
        cpu = (cpu_seconds() - cpu0) / (time.monotonic() - wall0) * 100
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    return {"clients": args.clients, "fps_each": [round(f, 2) for f in each], "cpu_percent": round(cpu, 1)}


async def measure(args: argparse.Namespace, engine: Engine) -> dict[str, Any]:
    async with WorldloopServer(engine, ServerConfig(port=0, ping_interval_s=None)) as server:
        url = f"ws://127.0.0.1:{server.port}/ws"
        result = await one_session(args, url)
        while engine.session_count:  # the first session ends just after its client has closed
            await asyncio.sleep(0.01)
        if args.clients > 1:
            result["concurrent"] = await concurrent_sessions(args, url)
        return result


def print_table(result: dict[str, Any]) -> None:
    one = result["one_session"]
    lat = one["key_to_frame_ms"]
    rows = [("model", f"{result['model']} {result['size']}, {result['steps']} step(s)"),
            ("target FPS", result["target_fps"]),
            ("sustained FPS (1 session)", one["fps"]),
            ("key→frame p50 / p95 (ms)", f"{lat['p50']} / {lat['p95']}"),
            ("CPU (1 session, % of a core)", one["cpu_percent"]),
            ("speculative kept / discarded", f"{one['speculative_kept']} / {one['speculative_discarded']}")]
    if "concurrent" in result:
        c = result["concurrent"]
        rows += [(f"FPS each ({c['clients']} sessions)", " ".join(map(str, c["fps_each"]))),
                 (f"CPU ({c['clients']} sessions, %)", c["cpu_percent"])]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="DIR", help="model directory (default: assets/default)")
    source.add_argument("--preset", help="a preset with random weights")
    source.add_argument("--fake", action="store_true", help="the test fake instead of a model")
    parser.add_argument("--fake-step-ms", type=float, default=5.0)
    parser.add_argument("--fake-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=5.0, help="each FPS measurement")
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--trials", type=int, default=40, help="key changes for the latency")
    parser.add_argument("--clients", type=int, default=4, help="concurrent sessions (1: skip)")
    parser.add_argument("--no-speculative", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the JSON record here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    engine = Engine(model, max_sessions=max(args.clients, 1), speculative=not args.no_speculative).start()
    try:
        result = asyncio.run(measure(args, engine))
    finally:
        engine.close()
    result["speculative"] = not args.no_speculative
    result["hardware"] = hardware("cpu" if args.fake else args.device) | {"load_average": load_average()}
    print_table(result)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
