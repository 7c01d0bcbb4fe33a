"""Flood benchmark: a canary session's FPS while another client floods the server, attack by attack.

    python benchmarks/flood.py                                  # tiny preset, 8 s per attack (about 80 s)
    python benchmarks/flood.py --model assets/default --seconds 15
    python benchmarks/flood.py --fake --seconds 2 --attacks errors pings   # the transport alone

A server runs in a child process on 127.0.0.1 (benchmarks/abuse.py); the canary, a well-behaved client at
``--fps``, runs here for the whole benchmark; each attack runs in its own process for ``--seconds`` while the
canary's received FPS is measured (after ``--settle`` seconds). Prints the canary FPS per attack and its ratio
to the FPS with no attack; the session attacks (`prompts5`, `prompts100`) also against a quiet second session
(`peer`), which costs the canary its share of the model by itself. The goal is a ratio of at least 0.95.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from abuse import Canary, ModelSource, ServerProcess, attacking

FLOODS = ("errors", "pings", "idle", "peer", "prompts5", "prompts100")


async def measure(args: argparse.Namespace, server: ServerProcess) -> dict[str, Any]:
    async with Canary(server.url, args.fps) as canary:
        await canary.fps_over(args.settle)
        results: dict[str, Any] = {"none": await canary.fps_over(args.seconds)}
        for kind in args.attacks:
            with attacking(kind, server.url, args.settle + args.seconds + 5):
                await canary.fps_over(args.settle)
                results[kind] = await canary.fps_over(args.seconds)
            await canary.fps_over(1.0)  # let a dropped attacker's session go
        results["health"] = server.health()
    return results


def report(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    alone = results["none"] or float("nan")
    peer = results.get("peer")
    rows = {}
    print(f"{'attack':<12} {'canary FPS':>10} {'vs none':>8} {'vs peer':>8}")
    for kind in ("none", *args.attacks):
        fps = results[kind]
        row = {"fps": round(fps, 2), "ratio": round(fps / alone, 3)}
        versus_peer = ""
        if peer and kind.startswith("prompts"):
            row["ratio_vs_peer"] = round(fps / peer, 3)
            versus_peer = f"{row['ratio_vs_peer']:.3f}"
        rows[kind] = row
        print(f"{kind:<12} {fps:>10.2f} {row['ratio']:>8.3f} {versus_peer:>8}")
    health = results["health"]
    print(f"server: dropped {health.get('dropped')}, refused {health.get('refused')}, "
          f"throttled {health.get('throttled')}")
    return {"target_fps": args.fps, "seconds": args.seconds, "attacks": rows, "server": health}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="DIR", help="a model directory, e.g. assets/default")
    source.add_argument("--preset", default="tiny", help="a preset with random weights (default: tiny)")
    source.add_argument("--fake", action="store_true", help="the test fake (tests/fakes.py), not a model")
    parser.add_argument("--fake-step-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server (default: 1)")
    parser.add_argument("--fps", type=int, default=30, help="the canary's FPS")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per attack (default: 8)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before each measurement")
    parser.add_argument("--attacks", nargs="+", choices=FLOODS, default=list(FLOODS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= 120 or not 0 <= args.settle <= 30:
        parser.error("--seconds must be in 1..120 and --settle in 0..30")
    source = ModelSource(fake=args.fake, fake_step_ms=args.fake_step_ms, preset=args.preset, model=args.model,
                         threads=args.threads)
    with ServerProcess(source) as server:
        record = report(asyncio.run(measure(args, server)), args)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
