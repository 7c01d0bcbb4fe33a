"""Flood benchmark: a canary session's FPS while another client floods the server, attack by attack.

    python benchmarks/flood.py                                  # tiny preset, about 2 minutes
    python benchmarks/flood.py --model assets/default --seconds 15
    python benchmarks/flood.py --fake --seconds 2 --attacks errors pings   # the transport alone

A server runs in a child process on 127.0.0.1 (benchmarks/abuse.py); the canary, a well-behaved client at
``--fps``, runs here for the whole benchmark. For each attack the canary's received FPS is measured for
``--seconds`` (after ``--settle`` seconds) twice in a row: under the attack's baseline, then under the attack
(in its own process). The baseline is no attack, or for the session attacks (`prompts5`, `prompts100`) a
quiet second session (`peer`), which costs the canary its share of the model by itself. Prints the ratio per
attack (the median over ``--rounds`` pairs); the goal is at least 0.95. On a loaded machine use more rounds:
one pair of measurements is noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from abuse import Canary, ModelSource, ServerProcess, argument_parser, attacking

FLOODS = ("errors", "pings", "idle", "peer", "prompts5", "prompts100")


# The session attacks cost the canary its share of the model by having a session at all: measure them
# against a quiet second session.
BASELINES = {"prompts5": "peer", "prompts100": "peer"}


async def phase(canary: Canary, kind: str | None, server: ServerProcess, args: argparse.Namespace) -> float:
    """The canary's FPS while ``kind`` attacks (None: nobody)."""
    attack = attacking(kind, server.url, args.settle + args.seconds + 5) if kind else contextlib.nullcontext()
    with attack:
        await canary.fps_over(args.settle)
        fps = await canary.fps_over(args.seconds)
    await canary.fps_over(1.0)  # let a dropped attacker's session go
    return fps


async def measure(args: argparse.Namespace, server: ServerProcess) -> dict[str, Any]:
    """Each attack right after its baseline, so that a drift in the machine's load cancels out."""
    results: dict[str, Any] = {}
    async with Canary(server.url, args.fps) as canary:
        await canary.fps_over(args.settle)
        for kind in args.attacks:
            baseline = BASELINES.get(kind)
            pairs = []
            for _ in range(args.rounds):
                before = await phase(canary, baseline, server, args)
                pairs.append((before, await phase(canary, kind, server, args)))
            ratios = [fps / before for before, fps in pairs if before]
            results[kind] = {"fps": round(statistics.median(f for _, f in pairs), 2),
                             "baseline": baseline or "none",
                             "baseline_fps": round(statistics.median(b for b, _ in pairs), 2),
                             "ratio": round(statistics.median(ratios), 3) if ratios else None,
                             "ratios": [round(r, 3) for r in ratios]}
        results["server"] = server.health()
    return results


def report(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    print(f"{'attack':<12} {'baseline':<9} {'FPS before':>10} {'FPS during':>10} {'ratio':>6}")
    for kind in args.attacks:
        r = results[kind]
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        print(f"{kind:<12} {r['baseline']:<9} {r['baseline_fps']:>10.2f} {r['fps']:>10.2f} {ratio:>6}")
    health = results["server"]
    print(f"server: dropped {health.get('dropped')}, refused {health.get('refused')}, "
          f"throttled {health.get('throttled')}")
    return {"target_fps": args.fps, "seconds": args.seconds, **results}


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="measured seconds per attack and per baseline (default: 6; 2 minutes in all)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before each measurement")
    parser.add_argument("--rounds", type=int, default=1,
                        help="baseline/attack pairs per attack; the median ratio is reported (default: 1)")
    parser.add_argument("--attacks", nargs="+", choices=FLOODS, default=list(FLOODS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= 120 or not 0 <= args.settle <= 30 or not 1 <= args.rounds <= 20:
        parser.error("--seconds must be in 1..120, --settle in 0..30 and --rounds in 1..20")
    with ServerProcess(ModelSource.from_args(args)) as server:
        record = report(asyncio.run(measure(args, server)), args)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
