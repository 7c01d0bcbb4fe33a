"""Stage 0: train the latent autoencoder on world frames (``worldloop train vae``).

A plain loop: frames from the built-in world (or recorded episodes) → ``models.vae.autoencoder_loss`` →
AdamW, EMA, logs, PNG samples (engine frames above their EMA reconstructions), resumable checkpoints.
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

    worldloop train vae --preset default --steps 3000 --batch-size 32 --out runs/vae
    worldloop train vae --init-from runs/vae/model --decoder-only --adversarial-weight 0.5 --out runs/vae-gan
    torchrun --nproc-per-node 2 -m app.cli train vae ...      # DDP, gloo on CPU / NCCL on CUDA
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from distill.data import ClipSource, make_clip_source
from distill.media import save_png_grid
from distill.run import (
    JsonlLog,
    Progress,
    RunDir,
    RunError,
    StopSignal,
    load_checkpoint,
    save_checkpoint,
    settings_dict,
)
from distill.train_common import (
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
from models import checkpoint
from models.config import ModelConfig
from models.vae import (
    LatentAutoencoder,
    PatchDiscriminator,
    autoencoder_loss,
    discriminator_hinge_loss,
    generator_adversarial_loss,
    to_unit,
)

STAGE = "vae"
CRITIC_OPTIMIZER = "critic_optimizer.pt"  # the critic's optimizer state, beside checkpoint.pt


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

    def __post_init__(self) -> None:
        weights = (self.noise_std, self.kl_weight, self.edge_weight, self.spectrum_weight,
                   self.adversarial_weight)
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
                                generator=generator)


class Critic:
    """The patch critic, its optimizer and the adversarial term of the decoder's loss (see the docstring)."""

    def __init__(self, vae: LatentAutoencoder, objective: VAEObjective, cfg: TrainConfig,
                 ddp: Distributed) -> None:
        self.net = PatchDiscriminator(objective.critic_channels).to(ddp.device)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, betas=(0.5, 0.9),
                                           weight_decay=0.0)
        self.objective, self.ddp = objective, ddp
        self.last_layer = vae.decoder.layers[-1].conv.weight

    def active(self, step: int) -> bool:
        return self.objective.adversarial_weight > 0 and step >= self.objective.adversarial_start

    def generator_term(self, recon_loss: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, float]:
        """λ·(−D(recon)) with the adaptive weight λ; the critic's own weights get no gradient from it."""
        self.net.requires_grad_(False)
        adv = generator_adversarial_loss(self.net(recon))
        self.net.requires_grad_(True)
        g_rec = torch.autograd.grad(recon_loss, self.last_layer, retain_graph=True)[0]
        g_adv = torch.autograd.grad(adv, self.last_layer, retain_graph=True)[0]
        weight = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()
        weight = weight * self.objective.adversarial_weight
        if self.ddp.enabled:  # one weight on every rank
            dist.all_reduce(weight)
            weight = weight / self.ddp.world_size
        return weight * adv, float(weight)

    def train_step(self, real: torch.Tensor, recon: torch.Tensor, lr: float) -> float:
        """One hinge-loss update of the critic on engine frames vs (detached) reconstructions."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss = discriminator_hinge_loss(self.net(real), self.net(recon.detach()))
        loss.backward()
        if self.ddp.enabled:
            for p in self.net.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.ddp.world_size
        self.optimizer.step()
        return float(loss.detach())


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
        checkpoint.load_into(vae, checkpoint.load_model(init_from, need_dit=False).vae,
                             init_from / checkpoint.VAE_FILE)
    if objective.decoder_only:
        if init_from is None:
            raise RunError("--decoder-only fine-tunes the decoder of an autoencoder: "
                           "pass --init-from MODEL_DIR")
        vae.encoder.requires_grad_(False).eval()
    ema = EMA(vae, cfg.ema_decay)
    optimizer = make_optimizer(vae, cfg, ddp.device)
    critic = Critic(vae, objective, cfg, ddp) if objective.adversarial_weight > 0 else None
    modules: dict[str, nn.Module] = {"vae": vae} | ({"critic": critic.net} if critic else {})
    start = 0
    if resume:
        start = load_checkpoint(run.checkpoint, stage=STAGE, settings=settings, modules=modules,
                                emas={"vae": ema}, optimizer=optimizer)
        if critic is not None:
            critic.optimizer.load_state_dict(torch.load(run.root / CRITIC_OPTIMIZER, weights_only=True))
    model = wrap_model(VAELoss(vae, objective), cfg, ddp)
    clips = clips or make_clip_source(cfg, config, ddp.device, ddp.rank, frames=2)
    batch = local_batch_size(cfg.batch_size, ddp)
    log = JsonlLog(run.log, ddp.is_main)
    progress = Progress(start, cfg.steps, "train vae", ddp.is_main)
    step = start

    def save() -> None:
        if ddp.is_main:
            if critic is not None:  # written first: a checkpoint never points at a missing critic state
                torch.save(critic.optimizer.state_dict(), run.root / CRITIC_OPTIMIZER)
            save_checkpoint(run.checkpoint, stage=STAGE, step=step, settings=settings, modules=modules,
                            emas={"vae": ema}, optimizer=optimizer)

    with StopSignal() as stop:
        while step < cfg.steps and not any_rank(stop.requested, ddp):
            started = time.perf_counter()
            images = frames_of(clips, step, batch).to(ddp.device)
            data_seconds = time.perf_counter() - started
            record: dict[str, float] = {}
            with autocast(ddp.device, cfg.bf16):
                loss, parts = model(images, step_generator(cfg.seed, step, ddp.rank, ddp.device))
                recon = parts.pop("recon")
                if critic is not None and critic.active(step):
                    adv, record["adversarial_weight"] = critic.generator_term(loss, recon)
                    loss = loss + adv
            grad_norm = optimizer_step(loss, model, optimizer, lr_at(step, cfg), cfg.grad_clip)
            if critic is not None and critic.active(step):
                with autocast(ddp.device, cfg.bf16):
                    record["critic_loss"] = critic.train_step(images, recon, lr_at(step, cfg))
            ema.update(vae)
            step += 1
            progress.update(images.shape[0] * ddp.world_size, data_seconds, loss=loss.item())
            if step % cfg.log_every == 0 or step == cfg.steps:
                psnr = (10 * torch.log10(4.0 / parts["mse"].float())).item()  # images span [-1, 1]: range 2
                log.write(step=step, loss=loss.item(), psnr=psnr, kl=parts["kl"].item(), grad_norm=grad_norm,
                          latent_std=parts["latent_std"].item(), lr=lr_at(step - 1, cfg),
                          frames_per_s=progress.rate(), data_share=progress.data_share(), **record)
                progress.reset_rate()
            if ddp.is_main and cfg.sample_every and step % cfg.sample_every == 0:
                write_samples(ema.module, images[:8], run.samples / f"vae_{step:07d}.png")
            if step % cfg.checkpoint_every == 0:
                save()
    progress.close()
    save()
    if ddp.is_main:
        export(config, ema.module, clips, run.model, step, cfg, keep_scale=objective.decoder_only)
    return TrainResult(run.model, step, vae)


@torch.no_grad()
def write_samples(vae: LatentAutoencoder, images: torch.Tensor, path: Path) -> None:
    """Engine frames (top row) above their reconstructions (bottom row)."""
    vae.eval()
    recon = vae.decode(vae.encode(images.to(next(vae.parameters()).device).float())).float().cpu()
    save_png_grid(path, [images.cpu(), recon])


@torch.no_grad()
def export(config: ModelConfig, vae: LatentAutoencoder, clips: ClipSource, out: Path, step: int,
           cfg: TrainConfig, calibration_frames: int = 256, keep_scale: bool = False) -> Path:
    """Calibrate ``latent_scale`` on fresh frames and write an autoencoder-only model directory.

    ``keep_scale``: keep the loaded scale (a decoder-only fine-tune must not move the latents' scaling).
    """
    vae = copy.deepcopy(vae).float().eval()
    if keep_scale:
        scale = float(vae.latent_scale)
    else:
        needed = max(1, calibration_frames // clips.frames)  # clips
        images = torch.cat([frames_of(clips, step + i, min(needed - i, 32)) for i in range(0, needed, 32)])
        scale = vae.calibrate_latent_scale(images.to(next(vae.parameters()).device))
    meta = {"stage": STAGE, "step": step, "latent_scale": scale, "train": settings_dict(train=cfg)["train"]}
    return checkpoint.save_model(out, config, None, vae, metadata=meta)
