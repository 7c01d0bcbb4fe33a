"""End-to-end model speed: WorldModel.next_frame (DiT with the fused cache pass + decode to RGB), random
weights.

CPU (default): the ``default`` preset at batch 1, 1 and 2 denoising steps, in float32, bfloat16 autocast over
float32 weights, and bfloat16 weights (what ``precision="auto"`` picks on CPUs with native bf16); plus the DiT
alone: one fused forward [clean frame t | noisy frame t+1] against two separate forwards. Reports medians of
wall time and of process CPU time per frame (CPU time is far less sensitive to other processes on a shared
machine; at 1 thread it approximates the uncontended wall time).

CUDA: batch 1/64/256 of the ``default`` preset (bf16), and one ``wan``-shaped DiT forward per latent frame.

    python benchmarks/model_speed.py                      # CPU, 2 threads
    python benchmarks/model_speed.py --threads 1 --frames 60
    python benchmarks/model_speed.py --device cuda        # on a GPU machine

Prints a JSON document naming the hardware. Set OMP_WAIT_POLICY=PASSIVE on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch

from worldloop.models.config import ModelConfig, preset
from worldloop.models.dit import DiT
from worldloop.models.kv_cache import KVCache
from worldloop.models.text import PromptEncoder
from worldloop.models.timing import hardware, percentile, sync
from worldloop.models.world_model import WorldModel
from worldloop.streaming.measure import run_frames


def timed(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 3) -> dict[str, float]:
    """Median/p90 wall ms and median process-CPU ms of ``fn``."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        sync(device)
        w, c = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append((time.perf_counter() - w) * 1e3)
        cpu.append((time.process_time() - c) * 1e3)
    return {
        "wall_ms": round(statistics.median(wall), 2),
        "wall_p90_ms": round(percentile(wall, 0.9), 2),
        "cpu_ms": round(statistics.median(cpu), 2),
    }


def world_model_speed(
    config: ModelConfig,
    encoder: PromptEncoder,
    device: torch.device,
    precision: str,
    steps: int,
    batch: int,
    frames: int,
    autocast: bool = False,
) -> dict[str, object]:
    """``frames`` steps of ``batch`` sessions after a warm-up that fills the window."""
    wm = WorldModel.from_config(
        config, device=device, prompt_encoder=encoder, max_sessions=batch, steps=steps, precision=precision
    )
    sessions = [wm.new_session("a stone dungeon with torches", seed=i) for i in range(batch)]
    run_frames(wm, sessions, config.dit.sink + config.dit.window, autocast=autocast)
    s = run_frames(wm, sessions, frames, autocast=autocast)
    wall, cpu = statistics.median(s.wall_ms), statistics.median(s.cpu_ms)
    return {
        "wall_ms": round(wall, 2),
        "wall_p90_ms": round(percentile(s.wall_ms, 0.9), 2),
        "cpu_ms": round(cpu, 2),
        "dit_ms": round(statistics.median(s.dit_ms), 2),
        "decode_ms": round(statistics.median(s.decode_ms), 2),
        "forwards": s.forwards,
        "fps": round(1e3 * batch / wall, 1),
        "fps_cpu_time": round(1e3 * batch / cpu, 1) if device.type == "cpu" else None,
    }


def dit_fusion_speed(
    config: ModelConfig, device: torch.device, dtype: torch.dtype, batch: int, reps: int
) -> dict[str, object]:
    """One fused forward [clean t | noisy t+1] against a cache pass and a denoising forward run separately."""
    torch.manual_seed(0)
    with torch.device(device):
        model = DiT(config).to(dtype).eval()
    cache = KVCache.for_model(config, batch, device, dtype)
    slots = list(range(batch))
    prompt = model.null_prompt_kv(batch)
    shape = (batch, 1, config.latent_channels, *config.latent_size)
    x = torch.randn(shape, device=device)
    sigma, keys = (
        torch.zeros(batch, 1, device=device),
        torch.zeros(batch, 1, config.dit.num_keys, device=device),
    )
    filled = config.dit.sink + config.dit.window
    with torch.inference_mode():
        for t in range(filled):  # a full window
            f = torch.full((batch, 1), t, device=device)
            out = model.forward_cached(x, sigma, keys, f, 1, prompt, cache.view(slots))
            cache.append(slots, f, out.k, out.v_cache, x, keys, sigma)
        # Steady state: sink + window frames cached, frame `filled` pending, frame `filled + 1` to denoise.
        f2 = torch.tensor([[filled, filled + 1]], device=device).expand(batch, 2)
        x2, s2, k2 = torch.cat([x, x], 1), torch.cat([sigma, sigma], 1), torch.cat([keys, keys], 1)
        fused = timed(
            lambda: model.forward_cached(x2, s2, k2, f2, 1, prompt, cache.view(slots)), device, reps
        )
        single = timed(
            lambda: model.forward_cached(x, sigma, keys, f2[:, 1:], 0, prompt, cache.view(slots)),
            device,
            reps,
        )
    params = sum(p.numel() for p in model.parameters())
    return {
        "params_m": round(params / 1e6, 2),
        "tokens_per_frame": config.tokens_per_frame,
        "batch": batch,
        "fused_forward": fused,
        "single_forward": single,
        "unfused_frame_ms": round(2 * single["wall_ms"], 2),
    }


def cpu_report(args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    config = preset(args.preset)
    encoder = PromptEncoder(config.dit.max_prompt_tokens)
    runs: dict[str, object] = {}
    variants = [("fp32", "fp32", False), ("bf16_autocast", "fp32", True), ("bf16", "bf16", False)]
    for steps in (1, 2):
        for name, precision, autocast in variants:
            if args.quick and name == "bf16_autocast":
                continue
            runs[f"{name}_steps{steps}"] = world_model_speed(
                config, encoder, device, precision, steps, 1, args.frames, autocast
            )
            print(f"  {name} steps={steps}: {runs[f'{name}_steps{steps}']}", flush=True)
    dit = {
        d: dit_fusion_speed(config, device, dt, 1, args.frames)
        for d, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    return {"world_model": runs, "dit": dit}


def cuda_report(args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    config = preset(args.preset)
    encoder = PromptEncoder(config.dit.max_prompt_tokens, device=device)
    runs = {}
    for batch in (1, 64, 256):
        runs[f"batch{batch}"] = world_model_speed(config, encoder, device, "bf16", 1, batch, args.frames)
        print(f"  batch {batch}: {runs[f'batch{batch}']}", flush=True)
    dit = {
        f"batch{b}": dit_fusion_speed(config, device, torch.bfloat16, b, args.frames) for b in (1, 64, 256)
    }
    wan = dit_fusion_speed(preset("wan"), device, torch.bfloat16, 1, max(5, args.frames // 4))
    return {"world_model": runs, "dit": dit, "wan_per_latent_frame": wan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU intra-op threads")
    parser.add_argument("--frames", type=int, default=40, help="timed frames per measurement")
    parser.add_argument("--quick", action="store_true", help="skip the autocast variant")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    header = {
        "hardware": hardware(args.device),
        "device": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "preset": args.preset,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(header), flush=True)
    body = cuda_report(args, device) if device.type == "cuda" else cpu_report(args, device)
    report = header | body | {"load_average_after": [round(x, 2) for x in os.getloadavg()]}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
