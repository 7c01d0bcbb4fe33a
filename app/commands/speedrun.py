"""``worldloop speedrun``: autoencoder → teacher → distillation → eval → export in one command, in a budget.

    worldloop speedrun --budget 9m --device cuda                     # a GPU lease
    worldloop speedrun --budget 2h --device cpu --out runs/speedrun  # this CPU
    worldloop speedrun --resume --out runs/speedrun                  # continue a stopped run
    worldloop speedrun --budget 30s --preset tiny --out /tmp/sr      # a smoke run

How the budget is split and how a run resumes: ``app/speedrun.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from worldloop.app.errors import UserError
from worldloop.models.config import PRESETS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "speedrun", help="train a playable model end to end within a time budget",
        description="Autoencoder → teacher → consistency distillation → DMD → eval helpers → eval → export, "
                    "each stage given its share of --budget by measured throughput (the plan is printed "
                    "first). Writes report.md (plan and outcome, eval table, learning curves) and model/ "
                    "(for `worldloop play --model`) under --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--budget", help="wall-clock time for the whole run, e.g. 90s, 9m, 2h, 1h30m "
                                    "(required unless --resume)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--preset", default="default", choices=list(PRESETS), help="model config preset")
    p.add_argument("--out", type=Path, default=Path("runs/speedrun"), help="run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue the speedrun in --out in the stage it stopped in (its own options)")
    p.add_argument("--episodes", type=Path, help="train on recorded episode folders under this path")
    vae = p.add_mutually_exclusive_group()
    vae.add_argument("--vae", type=Path, metavar="DIR",
                     help="reuse this autoencoder (default: assets/autoencoder when its shape is the "
                          "preset's)")
    vae.add_argument("--train-vae", action="store_true", help="train the autoencoder from scratch")
    p.add_argument("--iterations", metavar="STAGE=N,…",
                   help="fixed iterations for some stages, e.g. teacher=2000,cd=300 (the rest are planned)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off for CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the trained models")
    p.add_argument("--pool-clips", type=int, default=-1,
                   help="reuse rendered clips from a pool this big (-1: 256 on CPU, 4096 on CUDA; 0: off)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate at the end (--no-eval: neither the eval nor the helpers it uses; their "
                        "time goes to training; run `worldloop eval` on the model later)")
    p.set_defaults(func=run)


def options_from(args: argparse.Namespace) -> object:
    """The run's options, checked (one-line errors)."""
    from worldloop.app.speedrun import (
        SpeedrunError,
        SpeedrunOptions,
        default_vae,
        parse_duration,
        parse_iterations,
    )
    from worldloop.models import checkpoint
    from worldloop.models.config import preset
    from worldloop.models.device import resolve_device

    try:
        if args.budget is None:
            raise SpeedrunError("give --budget DURATION (e.g. 9m), or --resume to continue a run")
        budget = parse_duration(args.budget)
        device = resolve_device(args.device)
        vae = None if args.train_vae else (str(args.vae) if args.vae else default_vae(args.preset))
        if vae is not None:  # a clear error now rather than in the teacher stage
            checkpoint.with_autoencoder_of(preset(args.preset), vae)
        if args.pool_clips < -1:
            raise SpeedrunError(f"--pool-clips {args.pool_clips} is out of range")
        if args.episodes is not None and not args.episodes.is_dir():
            raise SpeedrunError(f"--episodes {args.episodes}: not a directory")
        return SpeedrunOptions(
            budget_s=budget, out=str(args.out), preset=args.preset, device=str(device), vae=vae,
            episodes=str(args.episodes) if args.episodes else None,
            iterations=parse_iterations(args.iterations),
            seed=args.seed, bf16=device.type == "cuda" if args.bf16 is None else args.bf16,
            compile=args.compile, pool_clips=args.pool_clips, evaluate=args.eval)
    except (ValueError, OSError) as err:
        raise UserError(str(err)) from None


def run(args: argparse.Namespace) -> int:
    import torch

    from worldloop.app.speedrun import SpeedrunError, SpeedrunOptions, start

    if args.threads < 0:
        raise UserError(f"--threads {args.threads} is out of range")
    if args.threads:
        torch.set_num_threads(args.threads)
    options = SpeedrunOptions(budget_s=1.0, out=str(args.out)) if args.resume else options_from(args)
    try:
        result = start(options, resume=args.resume, say=lambda m: print(m, file=sys.stderr, flush=True))
    except SpeedrunError as err:
        raise UserError(str(err)) from None
    return 130 if result.stopped_in else 0
