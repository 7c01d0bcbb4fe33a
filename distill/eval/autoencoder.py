"""The autoencoder's ceiling: encode → decode of held-out engine frames, measured like the model's frames.

Every frame a player sees goes through the decoder, so no DiT can be sharper or more faithful than this.
``reconstruction_metrics`` gives PSNR (mean, worst frame), SSIM, the sharpness ratio (mean Laplacian variance
of the reconstructions ÷ that of the engine frames: 1.0 = as sharp as the engine; a ratio of means, so flat
frames do not blow it up), PSNR per theme and the latent's per-channel statistics. ``decode_ms`` times the
decoder the way the player runs it (bf16, channels_last, batch 1). ``worldloop eval`` reports these as the
"autoencoder only" row; ``benchmarks/autoencoder_variants.py`` compares training variants with them.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import numpy as np
import torch

from worldloop.distill.data.clips import WorldClips
from worldloop.distill.eval import metrics
from worldloop.distill.world.themes import THEMES
from worldloop.models.vae import LatentAutoencoder, to_uint8, to_unit

RECON_WORLDS, RECON_FRAMES = 32, 4  # held-out worlds × frames each (seed 0: the eval's worlds)


def held_out_frames(height: int, width: int, worlds: int = RECON_WORLDS, frames: int = RECON_FRAMES,
                    seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """uint8 (worlds·frames, H, W, 3) engine frames of held-out worlds and each frame's theme index."""
    batch = WorldClips(height, width, frames, "cpu", seed=seed, held_out=True).batch(0, worlds)
    themes = batch.themes.repeat_interleave(frames).tolist()
    return batch.frames.flatten(0, 1).numpy(), themes


def sharpness_ratio(frames: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean Laplacian variance of ``frames`` ÷ that of ``reference`` (both float (B, 3, H, W) in [0, 1])."""
    ref = metrics.sharpness(reference).double().mean().item()
    return metrics.sharpness(frames).double().mean().item() / ref if ref > 0 else float("nan")


@torch.no_grad()
def reconstruct(vae: LatentAutoencoder, frames: np.ndarray,
                batch: int = 32) -> tuple[np.ndarray, torch.Tensor]:
    """Encode → decode uint8 frames (N, H, W, 3) in float32; returns uint8 reconstructions and the latents."""
    vae = copy.deepcopy(vae).float().eval()
    device = vae.latent_scale.device
    outs, latents = [], []
    for chunk in torch.from_numpy(frames).split(batch):
        z = vae.encode(to_unit(chunk).to(device))
        latents.append(z.cpu())
        outs.append(to_uint8(vae.decode(z)).cpu())
    return torch.cat(outs).numpy(), torch.cat(latents)


def reconstruction_metrics(engine: np.ndarray, recon: np.ndarray, themes: list[int]) -> dict[str, Any]:
    """PSNR (mean, min), SSIM, sharpness ratio and per-theme PSNR of reconstructions against engine frames."""
    a, b = metrics.from_uint8(engine), metrics.from_uint8(recon)
    psnr = metrics.psnr(b, a).clamp(max=100.0)
    per_theme = {}
    for i, name in enumerate(THEMES):
        mask = torch.tensor([t == i for t in themes])
        if mask.any():
            per_theme[name] = round(float(psnr[mask].mean()), 2)
    return {"psnr": float(psnr.mean()), "psnr_min": float(psnr.min()),
            "ssim": float(metrics.ssim(b, a).mean()), "sharpness_ratio": sharpness_ratio(b, a),
            "psnr_by_theme": per_theme, "eval_frames": len(engine)}


def latent_stats(latents: torch.Tensor) -> dict[str, list[float]]:
    """Per-channel mean and standard deviation of scaled latents (N, C, h, w)."""
    flat = latents.transpose(0, 1).flatten(1).double()
    return {"channel_mean": [round(v, 3) for v in flat.mean(1).tolist()],
            "channel_std": [round(v, 3) for v in flat.std(1).tolist()]}


def decode_ms(vae: LatentAutoencoder, threads: int = 1, reps: int = 40, rounds: int = 3,
              dtype: torch.dtype | None = torch.bfloat16) -> float:
    """Median milliseconds of ``decode_frames`` for one latent (batch 1), from the quietest of ``rounds``."""
    fast = copy.deepcopy(vae).cpu().optimize_for_inference(dtype)
    config = vae.config
    z = torch.randn(1, config.latent_channels, *config.latent_size)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(5):
            fast.decode_frames(z)
        best = float("inf")
        for _ in range(rounds):
            times = []
            for _ in range(reps):
                started = time.perf_counter()
                fast.decode_frames(z)
                times.append((time.perf_counter() - started) * 1000)
            best = min(best, statistics.median(times))
    finally:
        torch.set_num_threads(before)
    return best


def autoencoder_report(vae: LatentAutoencoder, *, worlds: int = RECON_WORLDS, frames: int = RECON_FRAMES,
                       seed: int = 0, timing_threads: int | None = 1) -> dict[str, Any]:
    """All of the above for one autoencoder on held-out worlds (decode time unless timing_threads is None)."""
    config = vae.config
    engine, themes = held_out_frames(config.height, config.width, worlds, frames, seed)
    recon, latents = reconstruct(vae, engine)
    report = reconstruction_metrics(engine, recon, themes)
    report["latent"] = {"shape": [config.latent_channels, *config.latent_size],
                        "latent_scale": float(vae.latent_scale), **latent_stats(latents)}
    if timing_threads is not None:
        report["decode_ms"] = decode_ms(vae, timing_threads)
    report["pictures"] = picture_rows(engine, recon, themes)
    return report


def picture_rows(engine: np.ndarray, recon: np.ndarray, themes: list[int]) -> dict[str, np.ndarray]:
    """One uint8 picture per theme: its first held-out frame, engine | reconstruction side by side."""
    out = {}
    for i, name in enumerate(THEMES):
        if i in themes:
            j = themes.index(i)
            out[name] = np.concatenate([engine[j], recon[j]], 1)
    return out
