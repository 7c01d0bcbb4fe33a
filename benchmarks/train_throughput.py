"""Teacher training throughput: one iteration of the DiT teacher (fwd + bwd + AdamW) on random latents.

Reports frames/s and tokens/s of the training iteration, its FLOPs (counted with ``torch.utils.flop_counter``
on one iteration: matmuls, convolutions and attention) and the model FLOP utilisation against the matmul
throughput measured on the same device (and against ``--peak-tflops`` when given). Separately: the
autoencoder encode of the clips, the prompt encoder, and the built-in world's clip generation (frames/s),
so it is visible which of them bounds a run. ``frames_per_cpu_s`` divides by process CPU time (all threads;
the warm-up iterations included), the currency of the training loop's ``--cpu-minutes`` budget.

    python benchmarks/train_throughput.py                        # CPU, default preset
    python benchmarks/train_throughput.py --threads 1 --batch-size 4
    python benchmarks/train_throughput.py --device cuda --batch-size 64 --compile   # bf16 on by default

On CUDA the DiT's training attention uses flex-attention block masks (``models/dit.py``). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from worldloop.distill.data.clips import WorldClips
from worldloop.distill.stages.runtime import autocast
from worldloop.distill.stages.teacher import TeacherLoss, TeacherObjective, draw
from worldloop.models.config import preset
from worldloop.models.device import resolve_device
from worldloop.models.dit import DiT
from worldloop.models.vae import LatentAutoencoder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_tflops(device: torch.device, bf16: bool, n: int = 2048) -> float:
    """Measured dense matmul throughput (TFLOP/s) at the training precision: the MFU reference."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    n = n if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, repeats=10 if device.type == "cuda" else 3)
    return 2 * n**3 / seconds / 1e12


def iteration_flops(iteration: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        iteration()
    return counter.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--clip-frames", type=int, default=0, help="0: window + sink + 1")
    p.add_argument("--iterations", type=int, default=5, help="timed iterations")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--world-batch", type=int, default=16, help="worlds per generated batch")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="nominal peak for a second MFU figure")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    config = preset(args.preset)
    frames = args.clip_frames or config.dit.window + config.dit.sink + 1
    b = args.batch_size
    torch.manual_seed(0)
    dit = DiT(config).to(device)
    loss_module = TeacherLoss(dit)
    model = torch.compile(loss_module) if args.compile else loss_module
    optimizer = torch.optim.AdamW(dit.parameters(), lr=1e-4, fused=device.type == "cuda")
    x0 = torch.randn(b, frames, config.latent_channels, *config.latent_size, device=device)
    keys = torch.randint(0, 2, (b, frames, config.dit.num_keys), device=device).float()
    tokens = torch.randn(b, config.dit.max_prompt_tokens, config.dit.text_dim, device=device)
    mask = torch.ones(b, config.dit.max_prompt_tokens, dtype=torch.bool, device=device)

    draws = draw(TeacherObjective(), x0.shape, torch.Generator(device).manual_seed(0), device)

    def iteration() -> None:
        with autocast(device, bf16):
            loss = model(x0, keys, tokens, mask, draws).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    cpu_start = time.process_time()
    seconds = timed(iteration, device, args.iterations, warmup=2 if args.compile else 1)
    warm = 2 if args.compile else 1
    cpu_per_iteration = (time.process_time() - cpu_start) / (args.iterations + warm)  # warm-up included
    # eager, fp32: the count does not depend on precision or compilation
    flops = iteration_flops(lambda: loss_module(x0, keys, tokens, mask, draws).mean().backward())
    reference = matmul_tflops(device, bf16)
    achieved = flops / seconds / 1e12
    sequence = frames if config.dit.bidirectional else 2 * frames  # [clean | noisy] in teacher forcing
    report = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or "cpu"),
        "threads": torch.get_num_threads(), "preset": args.preset, "batch": b, "clip_frames": frames,
        "bf16": bf16, "compile": args.compile,
        "dit_parameters_m": sum(q.numel() for q in dit.parameters()) / 1e6,
        "iteration_ms": seconds * 1e3, "frames_per_s": b * frames / seconds,
        # process CPU time: what a --cpu-minutes budget pays; steady under a busy machine, unlike wall time
        "frames_per_cpu_s": b * frames / cpu_per_iteration,
        "tokens_per_s": b * sequence * config.tokens_per_frame / seconds,
        "iteration_gflop": flops / 1e9, "achieved_tflops": achieved, "matmul_tflops_measured": reference,
        "mfu_vs_measured_matmul": achieved / reference,
    }
    if args.peak_tflops:
        report["mfu_vs_peak"] = achieved / args.peak_tflops
    report.update(side_costs(config, device, b, frames, args.world_batch))
    print(json.dumps(report, indent=2))


def side_costs(config, device: torch.device, batch: int, frames: int, world_batch: int) -> dict[str, float]:
    """Frames/s of what feeds an iteration: VAE encode of the clips, the built-in world's clip generation."""
    vae = LatentAutoencoder(config).to(device).eval()
    images = torch.rand(batch * frames, 3, config.height, config.width, device=device) * 2 - 1
    with torch.no_grad():
        encode = timed(lambda: vae.encode(images), device, repeats=3)
    world = WorldClips(config.height, config.width, frames, device)
    world.batch(0, world_batch)  # warm up
    start = time.perf_counter()
    world.batch(1, world_batch)
    sync(device)
    generate = time.perf_counter() - start
    return {"vae_encode_frames_per_s": batch * frames / encode,
            "world_clip_frames_per_s": world_batch * frames / generate}


if __name__ == "__main__":
    main()
