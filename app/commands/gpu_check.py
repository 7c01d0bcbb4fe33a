"""``worldloop gpu-check``: the CUDA checks (flex-attention, bf16, compile, batched sessions, NCCL, the
``wan`` preset's frame time, bench's sessions at 30 FPS), then ``worldloop speedrun`` on the time left; writes
gpu_check.json, report.md, curves.png and the models (bundle.tar.000, … : the student and the teacher) to
--out. Without CUDA the checks are recorded as skipped.

    scripts/gpu_check.sh $OUT 9                                        # on a GPU machine (what it runs)
    worldloop gpu-check --out runs/gpu --minutes 9
    worldloop gpu-check --out /tmp/dry --minutes 1 --device cpu --preset tiny   # the CPU dry run

What is checked and what comes back: ``app/gpu_check.py``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from worldloop.app.errors import UserError
from worldloop.models.config import PRESETS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("gpu-check", description=__doc__,
                              help="CUDA checks, then a speedrun, in one bounded call (scripts/gpu_check.sh)",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the folder that receives the results")
    p.add_argument("--minutes", type=float, default=9.0, help="the whole call's wall-clock time (default 9)")
    p.add_argument("--checks-minutes", type=float,
                   help="at most this long for the checks (default: 2, or a quarter of --minutes if less)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--preset", default="default", choices=list(PRESETS), help="the speedrun's preset")
    p.add_argument("--work", type=Path, help="the speedrun's folder (default: under the temp directory)")
    p.add_argument("--speedrun-iterations", metavar="STAGE=N,…",
                   help="fixed iterations for some speedrun stages (as `speedrun --iterations`)")
    p.add_argument("--pool-clips", type=int, default=-1,
                   help="the speedrun's pool of rendered clips (-1: 256 on CPU, 4096 on CUDA)")
    p.add_argument("--checks", metavar="NAME,…",
                   help="run only these checks, comma-separated (default: all; 'none': none; names in "
                        "app/gpu_check.py's CHECKS)")
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="the speedrun evaluates its models (--no-eval: that time trains; evaluate later)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from worldloop.app.gpu_check import gpu_check, parse_checks
    from worldloop.app.speedrun import SpeedrunError, parse_iterations
    from worldloop.models.device import resolve_device

    try:
        device = resolve_device(args.device)
        iterations = parse_iterations(args.speedrun_iterations)
        checks = parse_checks(args.checks)
    except (ValueError, SpeedrunError) as err:
        raise UserError(str(err)) from None
    if args.checks_minutes is None:
        args.checks_minutes = min(2.0, args.minutes / 4)
    if not 0 < args.checks_minutes < args.minutes:
        raise UserError(f"--checks-minutes must be positive and below --minutes ({args.minutes}), got "
                        f"{args.checks_minutes}")
    work = args.work or Path(tempfile.gettempdir()) / "worldloop-gpu-check"
    data = gpu_check(args.out, args.minutes, args.checks_minutes, device, args.preset, work,
                     speedrun_iterations=iterations, pool_clips=args.pool_clips, checks=checks,
                     evaluate=args.eval,
                     say=lambda m: print(m, file=sys.stderr, flush=True))
    for c in data["checks"]:
        verdict = "skipped: " + c["skipped"] if c.get("skipped") else ("ok" if c["ok"] else "FAILED")
        print(f"{c['name']}: {verdict}" + (f" ({c['error']})" if c.get("error") else ""))
    speedrun = data["speedrun"] or {}
    print(f"speedrun: {'ok' if speedrun.get('ok') else 'FAILED ' + str(speedrun.get('error', ''))}; "
          f"{len(data.get('files', []))} files in {args.out} ({data.get('seconds')} s)")
    failed = [c for c in data["checks"] if c["ok"] is False] or not speedrun.get("ok")
    return 1 if failed else 0
