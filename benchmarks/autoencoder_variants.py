"""Autoencoder variants side by side at equal CPU time: reconstruction quality against decode speed.

Each variant trains from scratch with ``worldloop train vae`` (the one training loop and its pooled world
frames, 128×128) until ``--cpu-minutes`` of process CPU time are spent (both threads counted), then its
exported EMA autoencoder is measured on held-out worlds (32 worlds × 4 frames, the ``worldloop eval`` seeds):
PSNR mean and worst frame, SSIM, the sharpness ratio (mean Laplacian variance of the reconstructions ÷ that
of the engine frames; 1.0 = as sharp as the engine), per-theme PSNR, per-channel latent statistics, and the
decoder's time per frame (bf16, channels_last, one thread, batch 1). One JSON line per variant.

    python benchmarks/autoencoder_variants.py --cpu-minutes 8                 # every variant
    python benchmarks/autoencoder_variants.py --cpu-minutes 8 --variants c16,f4c8
    python benchmarks/autoencoder_variants.py --list

The variants are parameters of ``models.vae`` (latent shape, widths, loss weights), not copies of it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worldloop.distill.data.media import save_png
from worldloop.distill.eval.autoencoder import autoencoder_report
from worldloop.distill.stages.runtime import TrainConfig, setup_distributed
from worldloop.distill.stages.vae import VAEObjective, train_vae
from worldloop.models import checkpoint
from worldloop.models.config import VAEConfig, preset
from worldloop.models.vae import LatentAutoencoder


@dataclass(frozen=True)
class Variant:
    vae: VAEConfig
    edge_weight: float = 0.5
    spectrum_weight: float = 0.0
    kl_weight: float = 1e-3
    noise_std: float = 0.1
    lr: float = 1e-3
    note: str = ""


VARIANTS: dict[str, Variant] = {
    "base": Variant(VAEConfig(), note="the shipped shape: f8, 8 channels, widths 32-64-128 / 128-64-32"),
    "c16": Variant(VAEConfig(latent_channels=16), note="f8, 16 channels"),
    "c32": Variant(VAEConfig(latent_channels=32), note="f8, 32 channels"),
    "c16b2": Variant(VAEConfig(latent_channels=16, blocks_per_stage=2),
                     note="f8, 16 channels, 2 blocks/stage"),
    "f4c4": Variant(VAEConfig(latent_channels=4, downsample=4, encoder_channels=(48, 96),
                              decoder_channels=(96, 48)), note="f4, 4 channels (32×32×4)"),
    "f4c8": Variant(VAEConfig(latent_channels=8, downsample=4, encoder_channels=(48, 96),
                              decoder_channels=(96, 48)), note="f4, 8 channels (32×32×8)"),
    "c16spec": Variant(VAEConfig(latent_channels=16), spectrum_weight=0.5, note="c16 + log-spectrum term"),
    "c16lr3": Variant(VAEConfig(latent_channels=16), lr=3e-3, note="c16, learning rate 3e-3"),
    "c16lr3spec": Variant(VAEConfig(latent_channels=16), lr=3e-3, spectrum_weight=0.5,
                          note="c16, learning rate 3e-3, log-spectrum term"),
    "c16edge2": Variant(VAEConfig(latent_channels=16), edge_weight=2.0, note="c16, gradient term ×4"),
}


def train(variant: Variant, cpu_minutes: float, batch_clips: int, seed: int,
          out: Path) -> tuple[LatentAutoencoder, dict]:
    """`worldloop train vae` (the one training loop) on a CPU-time budget; the exported EMA autoencoder."""
    config = preset("default").replace(vae=variant.vae)
    cfg = TrainConfig(iterations=10**9, cpu_minutes=cpu_minutes, batch_size=batch_clips, lr=variant.lr,
                      warmup=50, bf16=True, device="cpu", seed=seed, out=str(out), log_every=25,
                      sample_every=0, checkpoint_every=10**9)
    objective = VAEObjective(noise_std=variant.noise_std, kl_weight=variant.kl_weight,
                             edge_weight=variant.edge_weight, spectrum_weight=variant.spectrum_weight)
    started = time.perf_counter()
    result = train_vae(config, cfg, objective, setup_distributed("cpu"))
    wall = time.perf_counter() - started
    files = checkpoint.load_model(result.model_dir, need_dit=False)
    vae = LatentAutoencoder(config)
    checkpoint.load_into(vae, files.vae, result.model_dir / checkpoint.VAE_FILE)
    frames = result.iteration * batch_clips * 2
    return vae, {"iterations": result.iteration, "frames": frames, "wall_s": round(wall, 1),
                 "frames_per_cpu_s": round(frames / (60 * cpu_minutes), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-minutes", type=float, default=8.0, help="process CPU time per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    parser.add_argument("--batch-clips", type=int, default=16, help="clips of 2 frames per iteration")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    parser.add_argument("--save", help="folder to save each trained variant's weights in")
    args = parser.parse_args()
    if args.list:
        for name, v in VARIANTS.items():
            print(f"{name:10s} {v.note}")
        return
    torch.set_num_threads(args.threads)
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; --list shows them")
        variant = VARIANTS[name]
        print(f"{name}: {variant.note}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            vae, stats = train(variant, args.cpu_minutes, args.batch_clips, args.seed, Path(tmp) / name)
        report = autoencoder_report(vae, timing_threads=1)
        pictures = report.pop("pictures")
        row = {"variant": name, "cpu_minutes": args.cpu_minutes, **stats, **report,
               "params_decoder": sum(p.numel() for p in vae.decoder.parameters())}
        if args.save:
            folder = Path(args.save)
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(vae.state_dict(), folder / f"{name}.pt")
            save_png(folder / f"{name}.png", np.concatenate(list(pictures.values()), 0))
        print(json.dumps(row), flush=True)
        torch.set_num_threads(args.threads)


if __name__ == "__main__":
    main()
