"""The autoencoder's ceiling and its sharpening: reconstruction metrics, the spectrum and adversarial terms,
the decoder-only fine-tune, resuming with a critic, and latent-shape errors."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.train_fakes import FakeClips, random_model_dir
from worldloop.distill.eval.autoencoder import autoencoder_report, reconstruction_metrics, sharpness_ratio
from worldloop.distill.stages.critic import Critic
from worldloop.distill.stages.run import RunError, read_checkpoint
from worldloop.distill.stages.runtime import TrainConfig, setup_distributed
from worldloop.distill.stages.vae import VAEObjective, train_vae
from worldloop.models import checkpoint
from worldloop.models.checkpoint import CheckpointError
from worldloop.models.config import VAEConfig, preset
from worldloop.models.vae import (
    LatentAutoencoder,
    autoencoder_loss,
    encoder_features,
    local_gram,
    spectrum_distance,
    texture_distance,
)

TINY = preset("tiny")
pytestmark = pytest.mark.usefixtures("single_thread")


def _cfg(out: Path, **kw: object) -> TrainConfig:
    base = TrainConfig(iterations=2, batch_size=2, lr=1e-3, warmup=0, clip_frames=2, out=str(out),
                       log_every=1, sample_every=0, checkpoint_every=100, device="cpu", pool_clips=0)
    return replace(base, **kw)


def _textured(n: int = 4, size: int = 32) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8).numpy()


def test_reconstruction_metrics_rank_a_blur_below_an_exact_copy() -> None:
    engine = _textured()
    themes = [0, 0, 1, 1]
    exact = reconstruction_metrics(engine, engine.copy(), themes)
    assert exact["psnr"] == 100.0 and exact["ssim"] == pytest.approx(1.0)
    assert exact["sharpness_ratio"] == pytest.approx(1.0)
    x = torch.from_numpy(engine).permute(0, 3, 1, 2).float()
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    blurred = blurred.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    blur = reconstruction_metrics(engine, blurred, themes)
    assert blur["sharpness_ratio"] < 0.3 and blur["psnr"] < 30.0 and blur["ssim"] < 0.9
    assert blur["psnr_min"] <= blur["psnr"]
    assert set(blur["psnr_by_theme"]) == {"dungeon", "ice cave"}
    # A ratio of means: one flat engine frame (no Laplacian energy) does not blow it up.
    flat = engine.copy()
    flat[0] = 128
    assert math.isfinite(sharpness_ratio(torch.from_numpy(blurred).permute(0, 3, 1, 2).float() / 255,
                                         torch.from_numpy(flat).permute(0, 3, 1, 2).float() / 255))


def test_autoencoder_report_on_a_tiny_autoencoder() -> None:
    torch.manual_seed(0)
    vae = LatentAutoencoder(TINY)
    report = autoencoder_report(vae, worlds=7, frames=2, timing_threads=1)
    assert report["eval_frames"] == 14 and report["latent"]["shape"] == [4, 8, 8]
    assert len(report["latent"]["channel_std"]) == 4 and report["decode_ms"] > 0
    assert report["psnr_min"] <= report["psnr"] < 100 and 0 < report["sharpness_ratio"]
    pictures = report["pictures"]
    assert pictures and all(p.shape == (32, 64, 3) and p.dtype == np.uint8 for p in pictures.values())


def test_spectrum_distance_is_zero_for_equal_images_and_counts_the_missing_texture() -> None:
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert spectrum_distance(x, x).item() == 0.0
    # Hand value: a constant c image has one non-zero bin (DC, c·√(H·W) under the orthonormal FFT);
    # against zeros the mean over the 16 × 9 rfft bins is log1p(c·16) / 144.
    c = 0.5
    value = spectrum_distance(torch.full((1, 1, 16, 16), c), torch.zeros(1, 1, 16, 16)).item()
    assert value == pytest.approx(math.log1p(c * 16) / 144, rel=1e-5)
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1)
    assert spectrum_distance(blurred, x) > spectrum_distance(x + 0.01, x)


def test_local_gram_is_each_tiles_feature_covariance() -> None:
    f = torch.tensor([[1.0, 3.0, 5.0, 5.0], [1.0, 3.0, 5.0, 5.0],
                      [0.0, 0.0, 2.0, -2.0], [0.0, 0.0, 2.0, -2.0]])
    g = local_gram(f.view(1, 1, 4, 4), 2)  # tiles: top-left, top-right, bottom-left, bottom-right
    assert g.shape == (1, 4, 1, 1)
    assert g.flatten().tolist() == pytest.approx([1.0, 0.0, 0.0, 4.0])  # variances: {1,3}: 1; {2,-2}: 4
    two = torch.stack([f, 2 * f]).unsqueeze(0)  # channel 2 = 2 × channel 1: covariance 2·var, var 4·var
    expected = f.var(unbiased=False) * torch.tensor([[1.0, 2.0], [2.0, 4.0]])
    assert torch.allclose(local_gram(two, 1)[0, 0], expected)
    with pytest.raises(ValueError, match="grid"):
        local_gram(f.view(1, 1, 4, 4), 5)


def test_texture_distance_charges_a_blur_more_than_a_misplaced_texture() -> None:
    """Stripes moved by half their period are the worst pixel match and near in texture; blurred, they are
    a ten times closer pixel match and nearly twice as far in texture. The encoder's features come one per
    stage."""
    torch.manual_seed(0)
    vae = LatentAutoencoder(TINY)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    feats = encoder_features(vae.encoder, x)
    assert [tuple(f.shape[1:]) for f in feats] == [(c, 32 // 2**(i + 1), 32 // 2**(i + 1))
                                                   for i, c in enumerate(TINY.vae.encoder_channels)]
    stripes = torch.zeros(2, 3, 32, 32)  # 8-pixel period: 2 latent columns, so a 4-pixel move is one there
    for phase in range(4):
        stripes[..., phase::8] = 0.8
    stripes = stripes - 0.4 + 0.1 * x
    shifted = torch.roll(stripes, 4, dims=-1)
    blurred = F.avg_pool2d(stripes, 5, stride=1, padding=2, count_include_pad=False)
    assert F.mse_loss(shifted, stripes) > 10 * F.mse_loss(blurred, stripes)
    assert texture_distance(vae.encoder, stripes, stripes).item() == 0.0
    assert texture_distance(vae.encoder, shifted, stripes) < 0.6 * texture_distance(vae.encoder, blurred,
                                                                                     stripes)
    recon = blurred.clone().requires_grad_(True)
    texture_distance(vae.encoder, recon, stripes).backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0


def test_adversarial_term_reaches_the_decoder_not_the_frozen_encoder_nor_the_critic() -> None:
    torch.manual_seed(0)
    vae = LatentAutoencoder(TINY)
    vae.encoder.requires_grad_(False)
    objective = VAEObjective(adversarial_weight=0.5, decoder_only=True)
    critic = Critic(vae.decoder.layers[-1].conv.weight, objective.adversarial_weight,
                    objective.critic_channels, 1e-3, setup_distributed("cpu"))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    loss, parts = autoencoder_loss(vae, images, noise_std=0.0)
    adv, weight = critic.generator_term(loss, parts["recon"])
    assert weight > 0
    adv.backward()
    assert all(p.grad is None for p in vae.encoder.parameters())
    assert all(p.grad is None for p in critic.net.parameters())
    assert vae.decoder.layers[-1].conv.weight.grad.abs().sum() > 0
    # The critic's own update moves the critic and nothing else.
    before = [p.detach().clone() for p in critic.net.parameters()]
    critic.train_step(images, parts["recon"], lr=1e-3)
    assert any(not torch.equal(a, p) for a, p in zip(before, critic.net.parameters(), strict=True))


def test_decoder_only_adversarial_finetune_keeps_encoder_and_latent_scale(tmp_path: Path) -> None:
    source = random_model_dir(TINY, tmp_path / "ae")
    start = checkpoint.load_model(source).vae
    objective = VAEObjective(adversarial_weight=0.5, decoder_only=True)
    result = train_vae(TINY, _cfg(tmp_path / "ft"), objective, setup_distributed("cpu"), init_from=source,
                       clips=FakeClips(32, 32, 2))
    tuned = checkpoint.load_model(result.model_dir, need_dit=False).vae
    enc = [k for k in start if k.startswith("encoder.")]
    dec = [k for k in start if k.startswith("decoder.")]
    assert all(torch.equal(start[k], tuned[k]) for k in enc)
    assert any(not torch.equal(start[k], tuned[k]) for k in dec)
    assert tuned["latent_scale"].item() == start["latent_scale"].item()
    log = (tmp_path / "ft" / "log.jsonl").read_text()
    assert "critic_loss" in log and "adversarial_weight" in log
    with pytest.raises(RunError, match="--init-from"):
        train_vae(TINY, _cfg(tmp_path / "nope"), objective, setup_distributed("cpu"),
                  clips=FakeClips(32, 32, 2))


def test_resume_with_a_critic_continues_exactly(tmp_path: Path) -> None:
    objective = VAEObjective(adversarial_weight=0.5, adversarial_start=1, spectrum_weight=0.1)
    ddp = setup_distributed("cpu")
    train_vae(TINY, _cfg(tmp_path / "straight", iterations=3), objective, ddp, clips=FakeClips(32, 32, 2))
    train_vae(TINY, _cfg(tmp_path / "split", iterations=2), objective, ddp, clips=FakeClips(32, 32, 2))
    train_vae(TINY, _cfg(tmp_path / "split", iterations=3), objective, ddp, resume=True,
              clips=FakeClips(32, 32, 2))
    a = read_checkpoint(tmp_path / "straight" / "checkpoint.pt", "vae")["modules"]
    b = read_checkpoint(tmp_path / "split" / "checkpoint.pt", "vae")["modules"]
    for name in ("vae", "critic"):
        assert all(torch.allclose(a[name][k].float(), b[name][k].float(), atol=1e-6) for k in a[name]), name


def test_the_preset_takes_the_latent_shape_of_the_autoencoder_it_starts_from(tmp_path: Path) -> None:
    default = preset("default")
    wide = default.replace(vae=VAEConfig(latent_channels=16))
    path = random_model_dir(wide, tmp_path / "c16")
    assert checkpoint.with_autoencoder_of(default, path).latent_channels == 16
    with pytest.raises(CheckpointError, match=r"makes 16×16×16 latents \(128×128 frames, f8\) but the model "
                                              r"config 'tiny' expects 4×8×8 latents"):
        checkpoint.with_autoencoder_of(TINY, path)


def test_the_shipped_autoencoder_fits_the_default_preset_and_keeps_the_walls() -> None:
    path = Path(__file__).resolve().parents[1] / "assets" / "autoencoder"
    default = preset("default")
    assert checkpoint.with_autoencoder_of(default, path) == default
    files = checkpoint.load_model(path, need_dit=False)
    assert files.dit is None and files.metadata["stage"] == "vae"
    vae = LatentAutoencoder(default)
    checkpoint.load_into(vae, files.vae, path / checkpoint.VAE_FILE)
    report = autoencoder_report(vae, worlds=4, frames=2, timing_threads=None)
    # docs/autoencoder.md: 39 dB on 128 held-out frames; the shipped f8 autoencoder made 26 dB.
    assert report["psnr"] > 33.0 and report["ssim"] > 0.93 and report["sharpness_ratio"] > 0.6
