"""Stage 0: train the latent autoencoder on world frames (``worldloop train vae``).

A plain loop: frames from the built-in world (or recorded episodes) → ``models.vae.autoencoder_loss`` →
AdamW, EMA, logs, PNG samples (engine frames above their EMA reconstructions), resumable checkpoints.
At the end the EMA autoencoder's ``latent_scale`` is calibrated on fresh frames and exported as a model
directory (``run/model``) whose DiT is freshly initialised: ``worldloop train teacher --vae run/model``
takes the autoencoder from it.

    worldloop train vae --preset default --steps 3000 --batch-size 32 --out runs/vae
    torchrun --nproc-per-node 2 -m worldloop.app.cli train vae ...      # DDP, gloo on CPU / NCCL on CUDA
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from worldloop.distill.data.clips import ClipSource
from worldloop.distill.data.media import save_png_grid
from worldloop.distill.stages.run import (
    JsonlLog,
    Progress,
    RunDir,
    StopSignal,
    load_checkpoint,
    save_checkpoint,
    settings_dict,
)
from worldloop.distill.stages.runtime import (
    EMA,
    Distributed,
    TrainConfig,
    TrainResult,
    any_rank,
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


def frames_of(clips: ClipSource, step: int, size: int) -> torch.Tensor:
    """A step's training images: every frame of ``size`` clips, float (B·F, 3, H, W) in [-1, 1]."""
    return to_unit(clips.batch(step, size).frames.flatten(0, 1))


def train_vae(config: ModelConfig, cfg: TrainConfig, objective: VAEObjective, ddp: Distributed, *,
              resume: bool = False, init_from: Path | None = None,
              clips: ClipSource | None = None) -> TrainResult:
    """Train the autoencoder and export a model directory. Stops early (and saves) on SIGTERM.

    ``clips`` replaces the run's data source (``make_clip_source``), e.g. with a fake in tests.
    """
    run = RunDir(Path(cfg.out))
    settings = settings_dict(stage=STAGE, model=config, train=cfg, objective=objective)
    run.prepare(resume, settings, write=ddp.is_main)
    torch.manual_seed(cfg.seed)
    vae = LatentAutoencoder(config).to(ddp.device)
    if init_from is not None and not resume:
        checkpoint.load_into(vae, checkpoint.load_model(init_from).vae, init_from / checkpoint.VAE_FILE)
    ema = EMA(vae, cfg.ema_decay)
    optimizer = make_optimizer(vae, cfg, ddp.device)
    start = 0
    if resume:
        start = load_checkpoint(run.checkpoint, stage=STAGE, settings=settings, modules={"vae": vae},
                                emas={"vae": ema}, optimizer=optimizer)
    model = wrap_model(VAELoss(vae, objective), cfg, ddp)
    clips = clips or make_clip_source(cfg, config, ddp.device, ddp.rank, frames=2)
    batch = local_batch_size(cfg.batch_size, ddp)
    log = JsonlLog(run.log, ddp.is_main)
    progress = Progress(start, cfg.steps, "train vae", ddp.is_main)
    step = start
    with StopSignal() as stop:
        while step < cfg.steps and not any_rank(stop.requested, ddp):
            started = time.perf_counter()
            images = frames_of(clips, step, batch).to(ddp.device)
            data_seconds = time.perf_counter() - started
            with autocast(ddp.device, cfg.bf16):
                loss, parts = model(images, step_generator(cfg.seed, step, ddp.rank, ddp.device))
            grad_norm = optimizer_step(loss, model, optimizer, lr_at(step, cfg), cfg.grad_clip)
            ema.update(vae)
            step += 1
            progress.update(images.shape[0] * ddp.world_size, data_seconds, loss=loss.item())
            if step % cfg.log_every == 0 or step == cfg.steps:
                psnr = (10 * torch.log10(4.0 / parts["mse"].float())).item()  # images span [-1, 1]: range 2
                log.write(step=step, loss=loss.item(), psnr=psnr, kl=parts["kl"].item(), grad_norm=grad_norm,
                          latent_std=parts["latent_std"].item(), lr=lr_at(step - 1, cfg),
                          frames_per_s=progress.rate(), data_share=progress.data_share())
                progress.reset_rate()
            if ddp.is_main and cfg.sample_every and step % cfg.sample_every == 0:
                write_samples(ema.module, images[:8], run.samples / f"vae_{step:07d}.png")
            if step % cfg.checkpoint_every == 0 and ddp.is_main:
                save_checkpoint(run.checkpoint, stage=STAGE, step=step, settings=settings,
                                modules={"vae": vae}, emas={"vae": ema}, optimizer=optimizer)
    progress.close()
    if ddp.is_main:
        save_checkpoint(run.checkpoint, stage=STAGE, step=step, settings=settings, modules={"vae": vae},
                        emas={"vae": ema}, optimizer=optimizer)
        export(config, ema.module, clips, run.model, step, cfg)
    return TrainResult(run.model, step, vae)


@torch.no_grad()
def write_samples(vae: LatentAutoencoder, images: torch.Tensor, path: Path) -> None:
    """Engine frames (top row) above their reconstructions (bottom row)."""
    vae.eval()
    recon = vae.decode(vae.encode(images.to(next(vae.parameters()).device).float())).float().cpu()
    save_png_grid(path, [images.cpu(), recon])


@torch.no_grad()
def export(config: ModelConfig, vae: LatentAutoencoder, clips: ClipSource, out: Path, step: int,
           cfg: TrainConfig, calibration_frames: int = 256) -> Path:
    """Calibrate ``latent_scale`` on fresh frames and write a model directory (its DiT is untrained)."""
    vae = copy.deepcopy(vae).float().eval()
    needed = max(1, calibration_frames // clips.frames)  # clips
    images = torch.cat([frames_of(clips, step + i, min(needed - i, 32)) for i in range(0, needed, 32)])
    scale = vae.calibrate_latent_scale(images.to(next(vae.parameters()).device))
    torch.manual_seed(cfg.seed)
    dit = DiT(config)
    meta = {"stage": STAGE, "step": step, "latent_scale": scale, "dit": "untrained",
            "train": settings_dict(train=cfg)["train"]}
    return checkpoint.save_model(out, config, dit, vae, metadata=meta)
