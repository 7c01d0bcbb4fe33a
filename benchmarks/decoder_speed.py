"""Latent decoder, encoder and prompt encoder speed on this CPU.

Compares candidate decoders from the ``default`` preset's latent (16×16×C) to 128×128 RGB at batch 1 and 8,
in float32 (contiguous and channels_last) and bfloat16 channels_last, then times the shipped autoencoder's
``decode_frames`` / ``encode_frames`` and the MiniLM prompt encoder. Medians and 90th percentiles in ms.

    python benchmarks/decoder_speed.py                # all candidates
    python benchmarks/decoder_speed.py --quick        # fewer repetitions, no stock TAESD

The AutoencoderTiny (TAESD) rows need diffusers: ``pip install 'worldloop[bench]'``.

Other processes on a 2-core machine skew timings: threads are pinned (--threads), each number comes from the
quietest of three rounds, and the header prints the load average; run it more than once.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from worldloop.models.config import preset
from worldloop.models.text import PromptEncoder
from worldloop.models.timing import cpu_name
from worldloop.models.vae import Decoder, LatentAutoencoder, ResBlock


def timed(fn: Callable[[], object], reps: int, warmup: int = 5, rounds: int = 3) -> tuple[float, float]:
    """(median, p90) wall time of ``fn`` in ms, from the quietest of ``rounds`` rounds of ``reps`` calls.

    Other processes on the machine stall two-thread torch for whole rounds; the round with the lowest median
    is the best estimate of the cost on an idle machine.
    """
    for _ in range(warmup):
        fn()
    best: list[float] = []
    for _ in range(rounds):
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        if not best or statistics.median(times) < statistics.median(best):
            best = times
    return statistics.median(best), best[min(len(best) - 1, int(0.9 * len(best)))]


def nearest_decoder(latent_channels: int, channels: tuple[int, ...]) -> nn.Module:
    """Reference from DESIGN §9: nearest-neighbour ×2 + 3×3 conv per stage, a residual block per width."""
    layers: list[nn.Module] = [nn.Conv2d(latent_channels, channels[0], 3, padding=1), nn.ReLU()]
    for c_in, c_out in zip(channels[:-1], channels[1:], strict=False):
        layers += [ResBlock(c_in), nn.Upsample(scale_factor=2.0), nn.Conv2d(c_in, c_out, 3, padding=1)]
        layers.append(nn.ReLU())
    layers += [ResBlock(channels[-1]), nn.Conv2d(channels[-1], 3, 3, padding=1)]
    return nn.Sequential(*layers)


def tiny_autoencoder_decoder(latent_channels: int, channels: tuple[int, ...],
                             blocks: tuple[int, ...]) -> nn.Module:
    from diffusers import AutoencoderTiny

    vae = AutoencoderTiny(latent_channels=latent_channels, decoder_block_out_channels=channels,
                          num_decoder_blocks=blocks, encoder_block_out_channels=channels,
                          num_encoder_blocks=(1,) * len(channels))
    return vae.decoder


def candidates(latent: int, quick: bool) -> dict[str, Callable[[], nn.Module]]:
    def ours(channels: tuple[int, ...], blocks: int = 1) -> Callable[[], nn.Module]:
        return lambda: Decoder(channels, latent, blocks)

    found: dict[str, Callable[[], nn.Module]] = {
        "subpixel 96-64-32": ours((96, 64, 32)),
        "subpixel 128-64-32": ours((128, 64, 32)),
        "subpixel 128-96-48": ours((128, 96, 48)),
        "subpixel 128-64-32 ×2 blocks": ours((128, 64, 32), 2),
        "nearest 64-48-32-16": lambda: nearest_decoder(latent, (64, 48, 32, 16)),
        "nearest 128-64-32-16": lambda: nearest_decoder(latent, (128, 64, 32, 16)),
    }
    if importlib.util.find_spec("diffusers") is None:
        print("(no AutoencoderTiny rows: diffusers is not installed; pip install 'worldloop[bench]')")
        return found
    found["AutoencoderTiny 32×4"] = lambda: tiny_autoencoder_decoder(latent, (32,) * 4, (1, 1, 1, 1))
    if not quick:
        found["AutoencoderTiny stock (64×4, 3-3-3-1)"] = lambda: tiny_autoencoder_decoder(
            latent, (64,) * 4, (3, 3, 3, 1))
    return found


def run_module(module: nn.Module, x: torch.Tensor, mode: str, reps: int) -> tuple[float, float]:
    module = module.eval()
    if mode != "fp32":
        module = module.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if mode == "bf16 CL":
        module, x = module.to(torch.bfloat16), x.to(torch.bfloat16)
    with torch.inference_mode():
        return timed(lambda: module(x), reps)


def bench_candidates(args: argparse.Namespace) -> None:
    config = preset("default")
    latent, (h, w) = config.latent_channels, config.latent_size
    print(f"\ncandidate decoders: latent {latent}×{h}×{w} → {config.height}×{config.width} RGB "
          "(median / p90 ms; CL = channels_last)")
    modes = ("fp32", "fp32 CL", "bf16 CL")
    print(f"{'decoder':40s} {'params':>8s} {'batch':>5s} " + " ".join(f"{m:>14s}" for m in modes))
    for name, build in candidates(latent, args.quick).items():
        params = sum(p.numel() for p in build().parameters())
        reps = args.reps if "stock" not in name else max(5, args.reps // 10)
        for batch in (1, 8):
            x = torch.randn(batch, latent, h, w)
            batch_reps = reps if batch == 1 else max(5, reps // 4)
            cells = [run_module(build(), x, mode, batch_reps) for mode in modes]
            row = " ".join(f"{m:6.2f} / {p:5.2f}" for m, p in cells)
            print(f"{name:40s} {params / 1e6:7.3f}M {batch:5d} {row}")


def bench_shipped(args: argparse.Namespace) -> None:
    config = preset("default")
    print(f"\nshipped LatentAutoencoder (preset default: {config.vae})")
    for dtype in (None, torch.bfloat16):
        model = LatentAutoencoder(config).optimize_for_inference(dtype=dtype)
        enc = sum(p.numel() for p in model.encoder.parameters())
        dec = sum(p.numel() for p in model.decoder.parameters())
        label = "float32" if dtype is None else "bfloat16"
        for batch in (1, 8):
            z = torch.randn(batch, config.latent_channels, *config.latent_size)
            frames = torch.randint(0, 256, (batch, config.height, config.width, 3), dtype=torch.uint8)
            reps = args.reps if batch == 1 else max(5, args.reps // 4)
            d_med, d_p90 = timed(lambda z=z, m=model: m.decode_frames(z), reps)
            e_med, e_p90 = timed(lambda f=frames, m=model: m.encode_frames(f), reps)
            print(f"  {label:8s} batch {batch}: decode_frames {d_med:6.2f} / {d_p90:6.2f} ms   "
                  f"encode_frames {e_med:6.2f} / {e_p90:6.2f} ms   (decoder {dec / 1e6:.3f}M, "
                  f"encoder {enc / 1e6:.3f}M parameters)")


def bench_prompts(args: argparse.Namespace) -> None:
    print("\nprompt encoder (MiniLM-L6, max_tokens 32)")
    start = time.perf_counter()
    encoder = PromptEncoder(max_tokens=32)
    print(f"  load: {(time.perf_counter() - start) * 1e3:.0f} ms")
    counter = iter(range(10**9))

    def fresh() -> None:
        encoder.encode([f"a frozen ice cave with blue crystal walls, variant {next(counter)}"])

    med, p90 = timed(fresh, args.reps // 2)
    print(f"  encode one new prompt: {med:.2f} / {p90:.2f} ms")
    batch = [f"a desert ruin at dusk, sandstone pillars, number {i}" for i in range(8)]
    med, p90 = timed(lambda: (encoder.clear_cache(), encoder.encode(batch)), max(5, args.reps // 8))
    print(f"  encode 8 new prompts in one call: {med:.2f} / {p90:.2f} ms")
    med, p90 = timed(lambda: encoder.encode(["a hell fortress of red brick"]), args.reps)
    print(f"  encode a cached prompt: {med:.3f} / {p90:.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=40, help="calls per round (3 rounds)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-candidates", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; load average {load}")
    if not args.skip_candidates:
        bench_candidates(args)
    bench_shipped(args)
    bench_prompts(args)


if __name__ == "__main__":
    main()
