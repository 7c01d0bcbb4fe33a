"""Stage 0: train the latent autoencoder on world frames (``worldloop train vae``).

One iteration (``VAEStage.step``, in the loop of ``loop.py``): frames from the built-in world (or recorded
episodes) → ``models.vae.autoencoder_loss`` → AdamW, EMA; PNG samples show engine frames above their EMA
reconstructions.
At the end the EMA autoencoder's ``latent_scale`` is calibrated on fresh frames and exported as a model
directory (``run/model``) that holds only the autoencoder: ``worldloop train teacher --vae run/model``
takes it from there.

Two options on top of the reconstruction loss:

- ``adversarial_weight`` > 0: from iteration ``adversarial_start`` a patch critic (``PatchDiscriminator``,
  hinge loss) judges reconstructions against engine frames, and the decoder gets −D(recon) with the adaptive
  weight of Esser et al. 2021 (‖∇L_rec‖ / ‖∇L_adv‖ at the decoder's last layer, times the option), so the
  term stays in scale with the pixel loss whatever its magnitude.
- ``decoder_only``: the encoder is frozen (from ``--init-from``), so the latents a DiT was trained on stay
  exactly as they are and only the decoder learns — the way to sharpen a shipped autoencoder.

    worldloop train vae --preset default --iterations 3000 --batch-size 32 --out runs/vae
    worldloop train vae --init-from runs/vae/model --decoder-only --adversarial-weight 0.5 --out runs/vae-gan
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
from worldloop.distill.stages.critic import Critic
from worldloop.distill.stages.loop import Stage, Step, prepare_run, train
from worldloop.distill.stages.run import RunDir, RunError, settings_dict
from worldloop.distill.stages.runtime import Distributed, TrainConfig, TrainResult
from worldloop.distill.stages.shared import make_clip_source
from worldloop.models import checkpoint
from worldloop.models.config import ModelConfig
from worldloop.models.vae import LatentAutoencoder, autoencoder_loss, to_unit

STAGE = "vae"


@dataclass(frozen=True)
class VAEObjective:
    """Weights of ``models.vae.autoencoder_loss`` (see there)."""

    noise_std: float = 0.1
    kl_weight: float = 1e-3
    edge_weight: float = 0.5
    spectrum_weight: float = 0.0
    adversarial_weight: float = 0.0  # 0: no critic
    adversarial_start: int = 0  # iteration from which the critic trains and the decoder sees its term
    critic_channels: int = 32
    decoder_only: bool = False  # freeze the encoder (fine-tune the decoder of an --init-from autoencoder)
    roundtrip_weight: float = 0.0  # the reconstruction encoded and decoded again must still be the image

    def __post_init__(self) -> None:
        weights = (self.noise_std, self.kl_weight, self.edge_weight, self.spectrum_weight,
                   self.adversarial_weight, self.roundtrip_weight)
        if min(weights) < 0 or self.adversarial_start < 0 or self.critic_channels < 1:
            raise ValueError("VAE loss weights and --adversarial-start must be non-negative")


class VAELoss(nn.Module):
    """The objective as a module, so DDP (which hooks ``forward``) and ``torch.compile`` see one call."""

    def __init__(self, vae: LatentAutoencoder, objective: VAEObjective) -> None:
        super().__init__()
        self.vae, self.objective = vae, objective

    def forward(self, images: torch.Tensor, generator: torch.Generator
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o = self.objective
        return autoencoder_loss(self.vae, images, noise_std=o.noise_std, kl_weight=o.kl_weight,
                                edge_weight=o.edge_weight, spectrum_weight=o.spectrum_weight,
                                generator=generator, roundtrip_weight=o.roundtrip_weight)


def frames_of(clips: ClipSource, iteration: int, size: int) -> torch.Tensor:
    """An iteration's training images: every frame of ``size`` clips, float (B·F, 3, H, W) in [-1, 1]."""
    return to_unit(clips.batch(iteration, size).frames.flatten(0, 1))


class VAEStage(Stage):
    """The autoencoder (its EMA exported), optionally with the patch critic, on frames of the run's clips."""

    name, title = STAGE, "train vae"

    def __init__(self, config: ModelConfig, cfg: TrainConfig, objective: VAEObjective, ddp: Distributed,
                 settings: dict[str, Any], *, resume: bool, init_from: Path | None,
                 clips: ClipSource | None) -> None:
        super().__init__(cfg, ddp, settings)
        self.config, self.objective = config, objective
        torch.manual_seed(cfg.seed)
        self.vae = LatentAutoencoder(config).to(ddp.device)
        if init_from is not None and not resume:
            weights = checkpoint.load_model(init_from, need_dit=False).vae
            checkpoint.load_into(self.vae, weights, init_from / checkpoint.VAE_FILE)
        if objective.decoder_only:
            if init_from is None:
                raise RunError("--decoder-only fine-tunes the decoder of an autoencoder: "
                               "pass --init-from MODEL_DIR")
            self.vae.encoder.requires_grad_(False).eval()
        self.ema = self.trains("vae", self.vae)
        self.critic = None
        if objective.adversarial_weight > 0:
            self.critic = Critic(self.vae.decoder.layers[-1].conv.weight, objective.adversarial_weight,
                                 objective.critic_channels, cfg.lr, ddp, seed=cfg.seed + 11)
        if self.critic is not None:  # checkpointed beside the autoencoder (its optimizer: save_extra)
            self.modules["critic"] = self.critic.net
        self.model = self.wrap(VAELoss(self.vae, objective))
        self.clips = clips or make_clip_source(cfg, config, ddp.device, ddp.rank, frames=2)

    def batch(self, iteration: int) -> torch.Tensor:
        return frames_of(self.clips, iteration, self.batch_size).to(self.ddp.device)

    def step(self, iteration: int, images: torch.Tensor) -> Step:
        critic = self.critic
        adversarial = critic is not None and iteration >= self.objective.adversarial_start
        record: dict[str, float | torch.Tensor] = {}
        with self.autocast():
            loss, parts = self.model(images, self.generator(iteration))
            recon = parts.pop("recon")
            if adversarial:
                adv, record["adversarial_weight"] = critic.generator_term(loss, recon)
                loss = loss + adv
        grad_norm = self.update(loss, self.model, iteration)
        lr = self.lr(iteration)
        if adversarial:
            with self.autocast():
                record["critic_loss"] = critic.train_step(images, recon, lr)
        psnr = 10 * torch.log10(4.0 / parts["mse"].float())  # images span [-1, 1]: range 2
        shown = loss.item()
        return Step(images.shape[0], shown, {
            "loss": shown, "psnr": psnr, "kl": parts["kl"], "grad_norm": grad_norm,
            "latent_std": parts["latent_std"], "lr": lr, **record,
            **({"roundtrip": parts["roundtrip"]} if "roundtrip" in parts else {})})

    def save_extra(self, run: RunDir) -> None:
        if self.critic is not None:  # written before checkpoint.pt: it never points at a missing state
            self.critic.save(run)

    def load_extra(self, run: RunDir) -> None:
        if self.critic is not None:
            self.critic.load(run)

    def samples(self, iteration: int, images: torch.Tensor, run: RunDir) -> None:
        write_samples(self.ema.module, images[:8], run.samples / f"vae_{iteration:07d}.png")

    def export(self, iteration: int, out: Path) -> None:
        export(self.config, self.ema.module, self.clips, out, iteration, self.cfg,
               keep_scale=self.objective.decoder_only)


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
           cfg: TrainConfig, calibration_frames: int = 256, keep_scale: bool = False) -> Path:
    """Calibrate ``latent_scale`` on fresh frames and write an autoencoder-only model directory.

    ``keep_scale``: keep the loaded scale (a decoder-only fine-tune must not move the latents' scaling).
    """
    vae = copy.deepcopy(vae).float().eval()
    if keep_scale:
        scale = float(vae.latent_scale)
    else:
        needed = max(1, calibration_frames // clips.frames)  # clips
        images = torch.cat([frames_of(clips, iteration + i, min(needed - i, 32))
                            for i in range(0, needed, 32)])
        scale = vae.calibrate_latent_scale(images.to(next(vae.parameters()).device))
    meta = {"stage": STAGE, "step": iteration, "latent_scale": scale,
            "train": settings_dict(train=cfg)["train"]}
    return checkpoint.save_model(out, config, None, vae, metadata=meta)
