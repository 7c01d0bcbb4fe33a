"""PyTorch vs ONNX Runtime, part by part: the DiT frame step (the fused cache pass included) and the decoder
of ``WorldModel.next_frame``, at 1 and 2 denoising steps and 1 and 2 threads, side by side in one run.

Three engines per setting: PyTorch float32, PyTorch at its CPU default (bfloat16 weights on CPUs with native
bf16, what ``worldloop play`` uses) and ONNX Runtime (float32, ``--backend onnxruntime``). Each takes a
fresh session, fills the window, then times ``--frames`` frames; medians of wall ms and of process CPU ms
per frame (CPU time is far less sensitive to other processes on a shared machine). End to end, with JPEG and
the websocket, is ``worldloop bench --compare``.

    python benchmarks/onnx_speed.py                        # the shipped model (assets/default)
    python benchmarks/onnx_speed.py --preset default       # the next model's shape, random weights

Prints a table and a JSON document naming the hardware. The ONNX graphs are exported on first use into the
user cache (models/onnx_runtime.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does, before torch starts OpenMP

import torch  # noqa: E402

from worldloop.app.loading import choose_model  # noqa: E402
from worldloop.models.text import PromptEncoder  # noqa: E402
from worldloop.models.timing import hardware, load_average  # noqa: E402
from worldloop.models.world_model import WorldModel  # noqa: E402
from worldloop.streaming.measure import run_frames  # noqa: E402

ENGINES = (("torch fp32", "torch", "fp32"), ("torch default", "torch", "auto"),
           ("onnxruntime", "onnxruntime", "fp32"))


def build(choice, encoder: PromptEncoder, backend: str, precision: str) -> WorldModel:  # noqa: ANN001
    common = {"prompt_encoder": encoder, "max_sessions": 1, "precision": precision, "backend": backend}
    if choice.path is not None:
        return WorldModel.from_pretrained(choice.path, **common)
    return WorldModel.from_config(choice.config, seed=0, **common)


def measure(wm: WorldModel, steps: int, frames: int) -> dict[str, float]:
    wm.steps = steps
    session = wm.new_session("a dark stone dungeon with torch-lit walls", seed=0)
    d = wm.config.dit
    run_frames(wm, [session], d.sink + d.window + 5)
    s = run_frames(wm, [session], frames)
    wm.close_session(session)
    parts = {"frame_ms": s.wall_ms, "cpu_ms": s.cpu_ms, "dit_ms": s.dit_ms, "decode_ms": s.decode_ms}
    return {name: round(statistics.median(values), 2) for name, values in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="model directory (default: assets/default)")
    source.add_argument("--preset", help="a preset with random weights")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    choice = choose_model(args.model, args.preset, fallback=True)
    encoder = PromptEncoder(choice.config.dit.max_prompt_tokens)
    report = {"hardware": hardware("cpu"), "load_before": load_average(), "model": choice.source, "runs": []}
    print(f"{'threads':>7} {'steps':>5}  {'engine':<14} {'frame ms':>8} {'CPU ms':>7} {'DiT ms':>7} "
          f"{'decode ms':>9}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        models = {name: build(choice, encoder, backend, precision) for name, backend, precision in ENGINES}
        for steps in args.steps:
            for name, wm in models.items():
                r = {"threads": threads, "steps": steps, "engine": name, "dtype": str(wm.dtype)}
                r |= measure(wm, steps, args.frames)
                report["runs"].append(r)
                print(f"{threads:>7} {steps:>5}  {name:<14} {r['frame_ms']:>8.2f} {r['cpu_ms']:>7.2f} "
                      f"{r['dit_ms']:>7.2f} {r['decode_ms']:>9.2f}", flush=True)
    report["load_after"] = load_average()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
