"""``worldloop export``: the shipping form of a trained model directory (what ``assets/default`` holds), or
its ONNX graphs.

    worldloop export --model runs/dmd/model --out assets/default --steps 1 --report runs/eval/report.json
    worldloop export --model runs/teacher/model --out /tmp/teacher-small --dtype fp32
    worldloop export --model assets/default --onnx --out /tmp/onnx   # the graphs of --backend onnxruntime
    worldloop export --model assets/default --onnx --tensorrt --out /tmp/trt   # + TensorRT (GPU, tensorrt)
    worldloop export --model assets/default --onnx --int8   # the graphs of --backend onnxruntime-int8

The shipping form keeps the config, the EMA weights (the raw weights when a run has no EMA) and the
autoencoder; drops the raw fp32 DiT that only training needs; writes the model card (README.md: what it is,
how it was trained, and with ``--report`` its eval figures) and the shard index of sharded weights. The result
is checked against its config before it replaces ``--out``.

``--onnx`` writes the cached DiT frame step (with and without the fused cache pass) and the decoder as ONNX
(opset 18, float32, the KV cache as explicit inputs and outputs; docs/onnx.md), each checked against PyTorch
with ONNX Runtime, plus ``onnx.json`` (shapes, the differences found) and ``tensorrt.sh`` (trtexec commands).
Without ``--out`` they go to MODEL_DIR/onnx, where ``--backend onnxruntime`` finds them. ``--int8`` writes
int8 copies instead (``models/onnx_quantize.py``: the DiT's matrix products with int8 weights, the decoder's
convolutions calibrated on 64 frames of the built-in world), by default to MODEL_DIR/onnx-int8, where
``--backend onnxruntime-int8`` finds them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from worldloop.app.errors import UserError, user_input

DTYPES = ("bf16", "fp16", "fp32")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="write the shipping form of a model directory, or ONNX",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, metavar="DIR", help="a model directory from train or distill")
    source.add_argument("model_positional", nargs="?", type=Path, metavar="DIR",
                        help="the same, as a positional argument")
    p.add_argument("--out", type=Path,
                   help="the directory to write (replaced when complete); required unless --onnx, whose "
                        "default is DIR/onnx")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="DiT weight type (default: %(default)s)")
    p.add_argument("--steps", type=int, help="denoising steps it plays with (default: the model's own)")
    p.add_argument("--note", help="a line stored in the metadata (e.g. how the model was trained)")
    p.add_argument("--report", type=Path, metavar="FILE",
                   help="a `worldloop eval` report.json whose figures of this model go into its model card")
    p.add_argument("--onnx", action="store_true",
                   help="write the ONNX graphs (DiT frame step, decoder) instead, checked against PyTorch")
    p.add_argument("--int8", action="store_true",
                   help="with --onnx: int8 graphs (the DiT's weights, the decoder calibrated on the built-in "
                        "world) for --backend onnxruntime-int8; default --out DIR/onnx-int8")
    p.add_argument("--tensorrt", action="store_true",
                   help="with --onnx: also build TensorRT fp16 engines (needs the tensorrt package, a GPU)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="TensorRT: the most sessions an engine steps at once (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    args.model = args.model or args.model_positional
    if args.tensorrt and not args.onnx:
        raise UserError("--tensorrt builds engines from the ONNX graphs: add --onnx")
    if args.int8 and (not args.onnx or args.tensorrt):
        raise UserError("--int8 quantises the ONNX graphs for ONNX Runtime: use it with --onnx, "
                        "without --tensorrt")
    if args.onnx:
        return run_onnx(args)
    if args.out is None:
        raise UserError("--out DIR is required (the directory to write)")
    import torch

    from worldloop.models.checkpoint import CheckpointError, export_model
    from worldloop.models.model_card import eval_rows

    model = args.model
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
    out = args.out or args.model / ("onnx-int8" if args.int8 else "onnx")
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
    if args.int8:
        return write_int8(args.model, dit, vae, out)
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


def write_int8(model: Path, dit: Any, vae: Any, out: Path) -> int:
    """The int8 graphs (``graphs_for``: quantised from the float32 ones of MODEL/onnx, or of the user cache,
    exported there when missing) into ``out``, the decoder calibrated on the built-in world."""
    from worldloop.app.loading import calibration_frames
    from worldloop.models.onnx_export import read_manifest
    from worldloop.models.onnx_runtime import graphs_for

    config = dit.config
    print(f"worldloop export: exporting {model} to ONNX (opset 18, int8) → {out}", flush=True)
    graphs_for(dit, vae, model, folder=out, int8=True,
               calibration=lambda: calibration_frames(config.height, config.width))
    manifest = read_manifest(out) or {}
    for graph in manifest.get("graphs", {}):
        print(f"  {graph}: {(out / graph).stat().st_size / 2**20:.1f} MiB")
    int8 = manifest.get("int8", {})
    print(f"  DiT: {int8.get('dit')}; decoder: {int8.get('decoder')} "
          f"({int8.get('calibration_latents')} frames)")
    return 0
