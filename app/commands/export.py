"""``worldloop export``: the shipping form of a trained model directory (what ``assets/default`` holds), or
its ONNX graphs.

    worldloop export runs/dmd/model --out assets/default --steps 1
    worldloop export runs/teacher/model --out /tmp/teacher-small --dtype fp32
    worldloop export assets/default --onnx --out /tmp/default-onnx      # the graphs of --backend onnxruntime
    worldloop export assets/default --onnx --tensorrt --out /tmp/trt    # + TensorRT engines (GPU + tensorrt)

The shipping form keeps the config, the EMA weights (the raw weights when a run has no EMA) and the
autoencoder; it drops the raw fp32 DiT that only training needs. The result is checked against its config
before it replaces ``--out``.

``--onnx`` writes the cached DiT frame step (with and without the fused cache pass) and the decoder as ONNX
(opset 18, float32, the KV cache as explicit inputs and outputs; docs/onnx.md), each checked against PyTorch
with ONNX Runtime, plus ``onnx.json`` (shapes, the differences found) and ``tensorrt.sh`` (trtexec commands).
Without ``--out`` they go to MODEL_DIR/onnx, where ``--backend onnxruntime`` finds them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from worldloop.app.errors import UserError

DTYPES = ("bf16", "fp16", "fp32")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="write the shipping form of a model directory, or ONNX",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, metavar="MODEL_DIR", help="a model directory from train or distill")
    p.add_argument("--out", type=Path,
                   help="the directory to write (replaced when complete); required unless --onnx, whose "
                        "default is MODEL_DIR/onnx")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="DiT weight type (default: %(default)s)")
    p.add_argument("--steps", type=int, help="denoising steps it plays with (default: the model's own)")
    p.add_argument("--note", help="a line stored in the metadata (e.g. how the model was trained)")
    p.add_argument("--onnx", action="store_true",
                   help="write the ONNX graphs (DiT frame step, decoder) instead, checked against PyTorch")
    p.add_argument("--tensorrt", action="store_true",
                   help="with --onnx: also build TensorRT fp16 engines (needs the tensorrt package, a GPU)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="TensorRT: the most sessions an engine steps at once (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.tensorrt and not args.onnx:
        raise UserError("--tensorrt builds engines from the ONNX graphs: add --onnx")
    if args.onnx:
        return run_onnx(args)
    if args.out is None:
        raise UserError("--out DIR is required (the directory to write)")
    import torch

    from worldloop.models.checkpoint import CheckpointError, export_model

    if args.out.resolve() == args.model.resolve():
        raise UserError("--out must differ from MODEL_DIR")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    try:
        out = export_model(args.model, args.out, dtype=dtype, note=args.note, steps=args.steps)
    except CheckpointError as err:
        raise UserError(str(err)) from err
    sizes = {f.name: f.stat().st_size for f in sorted(out.iterdir())}
    total = sum(sizes.values())
    print(f"exported {args.model} → {out} ({total / 2**20:.1f} MiB: "
          + ", ".join(f"{n} {b / 2**20:.1f} MiB" for n, b in sizes.items()) + ")")
    return 0


def run_onnx(args: argparse.Namespace) -> int:
    """The ONNX graphs of a model directory (EMA weights when present, as ``--backend onnxruntime`` loads)."""
    from worldloop.app import tensorrt
    from worldloop.models.checkpoint import (
        DIT_FILE,
        EMA_FILE,
        VAE_FILE,
        CheckpointError,
        load_into,
        load_model,
    )
    from worldloop.models.dit import DiT
    from worldloop.models.onnx_export import export_graphs
    from worldloop.models.onnx_runtime import require_onnxruntime
    from worldloop.models.vae import LatentAutoencoder

    if args.max_batch < 1:
        raise UserError(f"--max-batch must be at least 1, got {args.max_batch}")
    try:
        require_onnxruntime()
    except ImportError as err:
        raise UserError(str(err)) from None
    out = args.out or args.model / "onnx"
    try:
        files = load_model(args.model)
        if files.dit is None and files.dit_ema is None:
            raise UserError(f"{args.model} holds no DiT (an autoencoder-only directory)")
        dit, vae = DiT(files.config), LatentAutoencoder(files.config)
        weights, name = (files.dit_ema, EMA_FILE) if files.dit_ema is not None else (files.dit, DIT_FILE)
        load_into(dit, weights, args.model / name)
        load_into(vae, files.vae, args.model / VAE_FILE)
    except CheckpointError as err:
        raise UserError(str(err)) from err
    print(f"worldloop export: exporting {args.model} to ONNX (opset 18, float32) → {out}", flush=True)
    manifest = export_graphs(dit, vae, out)
    script = tensorrt.write_script(out, manifest, args.max_batch)
    for graph, info in manifest["graphs"].items():
        diff = info.get("max_abs_diff") or {}
        worst = f"max |ORT − PyTorch| {max(diff.values()):.1e}" if diff else "not checked"
        size = (out / graph).stat().st_size / 2**20
        print(f"  {graph}: {size:.1f} MiB, {len(info['inputs'])} inputs, {worst} "
              f"(tolerance {manifest['tolerance']:g})")
    print(f"  {script.name}: trtexec commands for TensorRT engines")
    if args.tensorrt:
        engines = tensorrt.build_engines(out, manifest, args.max_batch)
        print("  TensorRT engines: " + ", ".join(e.name for e in engines))
    return 0
