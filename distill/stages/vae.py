"""Stage 0: train the latent autoencoder on world frames (``worldloop train vae``).

One iteration (``VAEStage.step``, in the loop of ``loop.py``): frames from the built-in world (or recorded
episodes) → ``models.vae.autoencoder_loss`` → AdamW, EMA; PNG samples show engine frames above their EMA
reconstructions.
At the end the EMA autoencoder's ``latent_scale`` is calibrated on fresh frames and exported as a model
directory (``run/model``) whose DiT is freshly initialised: ``worldloop train teacher --vae run/model``
takes the autoencoder from it.

    worldloop train vae --preset default --iterations 3000 --batch-size 32 --out runs/vae
    torchrun --nproc-per-node 2 -m worldloop.app.cli train vae ...      # DDP, gloo on CPU / NCCL on CUDA
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from worldloop.distill.data.clips import ClipSource
from worldloop.distill.data.media import save_png_grid
from worldloop.distill.stages.loop import Stage, Step, prepare_run, train
from worldloop.distill.stages.run import RunDir, settings_dict
from worldloop.distill.stages.runtime import (
    EMA,
    Distributed,
    TrainConfig,
    TrainResult,
    autocast,
    local_batch_size,
    lr_at,
    make_optimizer,
    optimizer_step,
    step_generator,
    wrap_model,
)
from worldloop.distill.stages.shared import make_clip_source
from worldloop.models import checkpoint
from worldloop.models.config import ModelConfig
from worldloop.models.dit import DiT
from worldloop.models.vae import LatentAutoencoder, autoencoder_loss, to_unit

STAGE = "vae"


@dataclass(frozen=True)
class VAEObjective:
    """Weights of ``models.vae.autoencoder_loss`` (see there)."""

    noise_std: float = 0.1
    kl_weight: float = 1e-3
    edge_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.noise_std < 0 or self.kl_weight < 0 or self.edge_weight < 0:
            raise ValueError("VAE loss weights must be non-negative")


class VAELoss(nn.Module):
    """The objective as a module, so DDP (which hooks ``forward``) and ``torch.compile`` see one call."""

    def __init__(self, vae: LatentAutoencoder, objective: VAEObjective) -> None:
        super().__init__()
        self.vae, self.objective = vae, objective

    def forward(self, images: torch.Tensor, generator: torch.Generator
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o = self.objective
        return autoencoder_loss(self.vae, images, noise_std=o.noise_std, kl_weight=o.kl_weight,
                                edge_weight=o.edge_weight, generator=generator)


def frames_of(clips: ClipSource, iteration: int, size: int) -> torch.Tensor:
    """An iteration's training images: every frame of ``size`` clips, float (B·F, 3, H, W) in [-1, 1]."""
    return to_unit(clips.batch(iteration, size).frames.flatten(0, 1))


class VAEStage(Stage):
    """The autoencoder (its EMA exported), trained on frames of the run's clips."""

    name, title = STAGE, "train vae"

    def __init__(self, config: ModelConfig, cfg: TrainConfig, objective: VAEObjective, ddp: Distributed,
                 settings: dict[str, Any], *, resume: bool, init_from: Path | None,
                 clips: ClipSource | None) -> None:
        self.config, self.cfg, self.ddp, self.settings = config, cfg, ddp, settings
        torch.manual_seed(cfg.seed)
        self.vae = self.trained = LatentAutoencoder(config).to(ddp.device)
        if init_from is not None and not resume:
            weights = checkpoint.load_model(init_from).vae
            checkpoint.load_into(self.vae, weights, init_from / checkpoint.VAE_FILE)
        self.ema = EMA(self.vae, cfg.ema_decay)
        self.optimizer = make_optimizer(self.vae, cfg, ddp.device)
        self.modules, self.emas = {"vae": self.vae}, {"vae": self.ema}
        self.model = wrap_model(VAELoss(self.vae, objective), cfg, ddp)
        self.clips = clips or make_clip_source(cfg, config, ddp.device, ddp.rank, frames=2)
        self.batch_size = local_batch_size(cfg.batch_size, ddp)

    def batch(self, iteration: int) -> torch.Tensor:
        return frames_of(self.clips, iteration, self.batch_size).to(self.ddp.device)

    def step(self, iteration: int, images: torch.Tensor) -> Step:
        cfg, device = self.cfg, self.ddp.device
        with autocast(device, cfg.bf16):
            loss, parts = self.model(images, step_generator(cfg.seed, iteration, self.ddp.rank, device))
        grad_norm = optimizer_step(loss, self.model, self.optimizer, lr_at(iteration, cfg), cfg.grad_clip)
        self.ema.update(self.vae)
        psnr = 10 * torch.log10(4.0 / parts["mse"].float())  # images span [-1, 1]: range 2
        shown = loss.item()
        return Step(images.shape[0], shown, {
            "loss": shown, "psnr": psnr, "kl": parts["kl"], "grad_norm": grad_norm,
            "latent_std": parts["latent_std"], "lr": lr_at(iteration, cfg)})

    def samples(self, iteration: int, images: torch.Tensor, run: RunDir) -> None:
        write_samples(self.ema.module, images[:8], run.samples / f"vae_{iteration:07d}.png")

    def export(self, iteration: int, out: Path) -> None:
        export(self.config, self.ema.module, self.clips, out, iteration, self.cfg)


def train_vae(config: ModelConfig, cfg: TrainConfig, objective: VAEObjective, ddp: Distributed, *,
              resume: bool = False, init_from: Path | None = None,
              clips: ClipSource | None = None) -> TrainResult:
    """Train the autoencoder and export a model directory. Stops early (and saves) on SIGTERM.

    ``clips`` replaces the run's data source (``make_clip_source``), e.g. with a fake in tests.
    """
    settings = settings_dict(stage=STAGE, model=config, train=cfg, objective=objective)
    run = prepare_run(cfg, settings, resume, ddp)
    stage = VAEStage(config, cfg, objective, ddp, settings, resume=resume, init_from=init_from, clips=clips)
    return train(stage, cfg, ddp, run, resume=resume)


@torch.no_grad()
def write_samples(vae: LatentAutoencoder, images: torch.Tensor, path: Path) -> None:
    """Engine frames (top row) above their reconstructions (bottom row)."""
    vae.eval()
    recon = vae.decode(vae.encode(images.to(next(vae.parameters()).device).float())).float().cpu()
    save_png_grid(path, [images.cpu(), recon])


@torch.no_grad()
def export(config: ModelConfig, vae: LatentAutoencoder, clips: ClipSource, out: Path, iteration: int,
           cfg: TrainConfig, calibration_frames: int = 256) -> Path:
    """Calibrate ``latent_scale`` on fresh frames and write a model directory (its DiT is untrained)."""
    vae = copy.deepcopy(vae).float().eval()
    needed = max(1, calibration_frames // clips.frames)  # clips
    images = torch.cat([frames_of(clips, iteration + i, min(needed - i, 32)) for i in range(0, needed, 32)])
    scale = vae.calibrate_latent_scale(images.to(next(vae.parameters()).device))
    torch.manual_seed(cfg.seed)
    dit = DiT(config)
    meta = {"stage": STAGE, "step": iteration, "latent_scale": scale, "dit": "untrained",
            "train": settings_dict(train=cfg)["train"]}
    return checkpoint.save_model(out, config, dit, vae, metadata=meta)
