"""Soak benchmark: a canary session next to a stalled reader that reconnects whenever it is dropped.

    python benchmarks/soak.py                      # tiny preset, 60 s
    python benchmarks/soak.py --model assets/default --seconds 600

A server runs in a child process on 127.0.0.1 (benchmarks/abuse.py). The canary, a well-behaved client at
``--fps``, counts the frames it receives each second; the stalled reader starts a session, never reads, is
dropped (unacknowledged frames or a full write buffer) and comes back at once, for ``--seconds``. Prints the
canary's FPS p5 and median over the seconds, and the server's resident memory at the start and end with its
slope (least squares over samples every 2 s, after the first tenth of the run), in MB per minute.
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

from abuse import Canary, ModelSource, ServerProcess, argument_parser, attacking, percentile


def slope_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) samples, in MB per minute."""
    if len(samples) < 2:
        return float("nan")
    mean_t = statistics.fmean(t for t, _ in samples)
    mean_m = statistics.fmean(m for _, m in samples)
    covariance = sum((t - mean_t) * (m - mean_m) for t, m in samples)
    variance = sum((t - mean_t) ** 2 for t, _ in samples)
    return covariance / variance * 60 if variance else float("nan")


async def soak(args: argparse.Namespace, server: ServerProcess) -> dict[str, Any]:
    rss: list[tuple[float, float]] = []
    async with Canary(server.url, args.fps) as canary:
        await canary.fps_over(2.0)
        first = len(canary.per_second)
        with attacking("stalled", server.url, args.seconds + 5):
            start = time.monotonic()
            while (elapsed := time.monotonic() - start) < args.seconds:
                rss.append((elapsed, server.rss_mb()))
                await asyncio.sleep(min(2.0, max(0.0, args.seconds - elapsed)))
        fps = [float(n) for n in canary.per_second[first:]]
        health = server.health()
    steady = [(t, m) for t, m in rss if t >= args.seconds / 10] or rss
    return {
        "seconds": args.seconds, "target_fps": args.fps,
        "canary_fps": {"p5": percentile(fps, 0.05), "median": statistics.median(fps) if fps else float("nan"),
                       "seconds_measured": len(fps)},
        "server_rss_mb": {"start": round(rss[0][1], 1), "end": round(rss[-1][1], 1),
                          "slope_mb_per_min": round(slope_per_minute(steady), 3)},
        "stalled_reader_drops": health.get("dropped"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds to soak (default: 60, max 3600)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= 3600:
        parser.error("--seconds must be in 1..3600")
    with ServerProcess(ModelSource.from_args(args)) as server:
        result = asyncio.run(soak(args, server))
    fps, rss = result["canary_fps"], result["server_rss_mb"]
    print(f"canary FPS p5 {fps['p5']:.1f}, median {fps['median']:.1f} over {fps['seconds_measured']} s "
          f"(target {args.fps})")
    print(f"server RSS {rss['start']} → {rss['end']} MB, slope {rss['slope_mb_per_min']:+.3f} MB/min")
    print(f"stalled reader drops: {result['stalled_reader_drops']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
