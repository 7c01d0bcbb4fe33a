"""``worldloop export``: the shipping form of a trained model directory (what ``assets/default`` holds).

    worldloop export --model runs/dmd/model --out assets/default --steps 1 --report runs/eval/report.json
    worldloop export --model runs/teacher/model --out /tmp/teacher-small --dtype fp32

Keeps the config, the EMA weights (the raw weights when a run has no EMA) and the autoencoder; drops the raw
fp32 DiT that only training needs; writes the model card (README.md: what it is, how it was trained, and
with ``--report`` its eval figures) and the shard index of sharded weights. The result is checked against
its config before it replaces ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from worldloop.app.errors import UserError, user_input

DTYPES = ("bf16", "fp16", "fp32")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="write the shipping form of a model directory",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, metavar="DIR", help="a model directory from train or distill")
    source.add_argument("model_positional", nargs="?", type=Path, metavar="DIR",
                        help="the same, as a positional argument")
    p.add_argument("--out", type=Path, required=True, help="the directory to write (replaced when complete)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="DiT weight type (default: %(default)s)")
    p.add_argument("--steps", type=int, help="denoising steps it plays with (default: the model's own)")
    p.add_argument("--note", help="a line stored in the metadata (e.g. how the model was trained)")
    p.add_argument("--report", type=Path, metavar="FILE",
                   help="a `worldloop eval` report.json whose figures of this model go into its model card")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from worldloop.models.checkpoint import CheckpointError, export_model
    from worldloop.models.model_card import eval_rows

    model = args.model or args.model_positional
    if args.out.resolve() == model.resolve():
        raise UserError("--out must differ from --model")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    report = None
    if args.report is not None:
        with user_input():
            report = json.loads(args.report.read_text())
            if not isinstance(report, dict):
                raise ValueError(f"{args.report}: not a `worldloop eval` report")
            eval_rows(report, model, {})  # the report must hold this model
    try:
        out = export_model(model, args.out, dtype=dtype, note=args.note, steps=args.steps, report=report)
    except CheckpointError as err:
        raise UserError(str(err)) from err
    sizes = {f.name: f.stat().st_size for f in sorted(out.iterdir())}
    total = sum(sizes.values())
    print(f"exported {model} → {out} ({total / 2**20:.1f} MiB: "
          + ", ".join(f"{n} {b / 2**20:.1f} MiB" for n, b in sizes.items()) + ")")
    return 0
