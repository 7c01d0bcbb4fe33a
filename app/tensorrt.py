"""TensorRT engines from a model's ONNX graphs (``worldloop export MODEL --onnx --tensorrt``).

Unverified: TensorRT cannot be installed on the machines worldloop is developed on (its pip packages fetch
binaries from NVIDIA's servers) and their GPU has none. What is checked here is only what needs no TensorRT:
the ONNX graphs themselves (against PyTorch, with ONNX Runtime) and the trtexec command lines written next to
them (``tensorrt.sh``), which give every input its shape range: batch 1 (min and opt) to ``max_batch``.
"""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path
from typing import Any

from worldloop.app.errors import UserError

SCRIPT = "tensorrt.sh"


def missing_reason() -> str | None:
    """Why engines cannot be built here (no tensorrt package, no CUDA GPU), or None when they can."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed"
    import torch

    if not torch.cuda.is_available():
        return "there is no CUDA GPU"
    return None


def _dims(shape: list[Any], batch: int) -> str:
    return "x".join(str(batch if d == "B" else d) for d in shape)


def trtexec_commands(folder: Path, manifest: dict[str, Any], max_batch: int, precision: str = "fp16"
                     ) -> list[str]:
    """One trtexec command line per graph: engine ``<graph>.engine`` beside it, batch 1..``max_batch``."""
    commands = []
    for name, graph in manifest["graphs"].items():
        inputs = graph["inputs"]
        ranges = {flag: ",".join(f"{n}:{_dims(i['shape'], b)}" for n, i in inputs.items())
                  for flag, b in (("--minShapes", 1), ("--optShapes", 1), ("--maxShapes", max_batch))}
        onnx, engine = folder / name, folder / name.replace(".onnx", ".engine")
        args = ["trtexec", f"--onnx={onnx}", f"--saveEngine={engine}", f"--{precision}"]
        commands.append(shlex.join(args + [f"{flag}={value}" for flag, value in ranges.items()]))
    return commands


def write_script(folder: Path, manifest: dict[str, Any], max_batch: int) -> Path:
    """``tensorrt.sh``: the trtexec commands that build every engine (run it where TensorRT is)."""
    lines = ["#!/usr/bin/env bash", "# TensorRT engines from these ONNX graphs (written by worldloop export "
             "--onnx; unverified here: no TensorRT on the machines it was made on).", "set -euo pipefail"]
    path = folder / SCRIPT
    path.write_text("\n".join(lines + trtexec_commands(folder, manifest, max_batch)) + "\n")
    path.chmod(0o755)
    return path


def build_engines(folder: Path, manifest: dict[str, Any], max_batch: int) -> list[Path]:
    """Build an fp16 engine per graph with TensorRT's Python API (TensorRT ≥ 10); UserError when it cannot."""
    reason = missing_reason()
    if reason is not None:
        raise UserError(f"cannot build TensorRT engines here: {reason}. The ONNX graphs are in {folder}; "
                        f"on a machine with a GPU and TensorRT run {folder / SCRIPT} (trtexec), or this "
                        "command with --tensorrt")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    engines = []
    for name, graph in manifest["graphs"].items():
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(folder / name)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise UserError(f"TensorRT cannot parse {name}: {errors}")
        config = builder.create_builder_config()
        config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for input_name, spec in graph["inputs"].items():
            low, high = ([1 if d == "B" else d for d in spec["shape"]],
                         [max_batch if d == "B" else d for d in spec["shape"]])
            profile.set_shape(input_name, low, low, high)
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise UserError(f"TensorRT could not build an engine from {name} (see its log above)")
        engine = folder / name.replace(".onnx", ".engine")
        engine.write_bytes(bytes(serialized))
        engines.append(engine)
    return engines
