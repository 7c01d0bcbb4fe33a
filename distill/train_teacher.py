"""Stage 1: train the teacher, a frame-wise autoregressive diffusion model (``worldloop train teacher``).

Teacher forcing (DESIGN §6.1): a clip of F frames is encoded by the frozen autoencoder, every frame gets its
own noise level, and the DiT runs the sequence [clean context | noisy frames] under the causal window+sink
mask, so noisy frame i sees the clean frames before it — what the cached rollout sees at inference.

1. Latents x0 (B, F, C, h, w) of the clip; keys (B, F) as multi-hot; prompt tokens from the prompt encoder.
2. Noise levels σ (B, F): logit-normal, shifted (``losses.sample_sigmas``); x_σ = (1 − σ)·x0 + σ·ε.
3. Context augmentation: the clean context is re-noised to σ_c ~ U(0, ``context_noise``) per frame (and
   the DiT is told σ_c), so the model learns to tolerate the small errors of its own past frames.
4. Condition dropout: keys per frame and the prompt per clip are replaced by the null condition with
   probabilities ``key_dropout``/``prompt_dropout`` (for classifier-free guidance and a null condition).
5. Loss: ``losses.flow_matching_loss(v, x0, ε)``, target v = ε − x0.

A ``bidirectional`` DiT (config flag, ``--bidirectional``; a distillation teacher) has no clean context: the
whole clip is noisy at per-frame σ under full attention.

    worldloop train teacher --preset default --vae runs/vae/model --steps 20000 --out runs/teacher
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from distill import losses
from distill.data import ClipBatch, ClipSource, WorldClips, make_clip_source
from distill.media import save_png_grid, write_video
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
from models.dit import DiT, drop_keys
from models.keys import keys_to_tensor
from models.text import PromptEmbedding, PromptEncoder
from models.vae import LatentAutoencoder, to_unit
from models.world_model import WorldModel

STAGE = "teacher"


@dataclass(frozen=True)
class TeacherObjective:
    shift: float = 3.0  # timestep shift of the training noise levels (the sampler's is config.sampling.shift)
    sigma_mean: float = 0.0  # logit-normal location
    sigma_std: float = 1.0  # logit-normal scale
    context_noise: float = 0.1  # clean context is re-noised to σ_c ~ U(0, context_noise)
    key_dropout: float = 0.1  # per frame
    prompt_dropout: float = 0.1  # per clip
    random_keys: float = 0.1  # data: fraction of frames whose keys are random instead of the explorer's

    def __post_init__(self) -> None:
        for name in ("context_noise", "key_dropout", "prompt_dropout", "random_keys"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.shift <= 0 or self.sigma_std <= 0:
            raise ValueError("--shift and --sigma-std must be positive")


@dataclass
class TeacherDraws:
    """Every random number of one teacher step, drawn eagerly so the loss module itself is deterministic
    (friendly to ``torch.compile`` and DDP): σ and ε of the noisy frames (B, F) / (B, F, C, h, w), σ_c and
    ε_c of the context augmentation, and the dropout masks of keys (B, F) and prompts (B,)."""

    sigma: torch.Tensor
    noise: torch.Tensor
    context_sigma: torch.Tensor
    context_noise: torch.Tensor
    drop_keys: torch.Tensor
    drop_prompt: torch.Tensor


def draw(objective: TeacherObjective, shape: torch.Size, generator: torch.Generator,
         device: torch.device) -> TeacherDraws:
    """The random numbers of one step for latents of ``shape`` (B, F, C, h, w), in a fixed order."""
    o, (b, f) = objective, shape[:2]
    sigma = losses.sample_sigmas((b, f), shift=o.shift, mean=o.sigma_mean, std=o.sigma_std,
                                 generator=generator, device=device)
    noise = torch.randn(shape, generator=generator, device=device)
    drop_keys = losses.dropout_mask(b * f, o.key_dropout, generator=generator, device=device).view(b, f)
    drop_prompt = losses.dropout_mask(b, o.prompt_dropout, generator=generator, device=device)
    context_sigma = torch.rand((b, f), generator=generator, device=device) * o.context_noise
    context_noise = torch.randn(shape, generator=generator, device=device)
    return TeacherDraws(sigma, noise, context_sigma, context_noise, drop_keys, drop_prompt)


class TeacherLoss(nn.Module):
    """The teacher-forcing objective as a module (DDP hooks ``forward``); see the module docstring."""

    def __init__(self, dit: DiT) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, x0: torch.Tensor, keys: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                d: TeacherDraws) -> torch.Tensor:
        """x0 (B, F, C, h, w) latents, keys (B, F, K) multi-hot, prompt tokens (B, T, 384) and mask (B, T)."""
        x_t = losses.add_noise(x0, d.noise, d.sigma)
        keys = drop_keys(keys, d.drop_keys)
        prompt = self.dit.prompt_kv(tokens, mask & ~d.drop_prompt[:, None])
        if self.dit.cfg.bidirectional:
            v = self.dit(x_t, d.sigma, keys, prompt)
        else:
            context = losses.add_noise(x0, d.context_noise, d.context_sigma)
            v = self.dit(x_t, d.sigma, keys, prompt, context=context, context_sigma=d.context_sigma)
        return losses.flow_matching_loss(v, x0, d.noise)


def teacher_inputs(clips: ClipSource, vae: LatentAutoencoder, encoder: PromptEncoder, step: int, size: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, PromptEmbedding]:
    """A step's clips as latents (B, F, C, h, w), multi-hot keys (B, F, K) and prompt embeddings."""
    batch = clips.batch(step, size).to(device)
    prompt = encoder.encode(batch.prompts).to(device)
    return encode_clips(vae, batch.frames), keys_to_tensor(batch.keys, device=device), prompt


@torch.no_grad()
def encode_clips(vae: LatentAutoencoder, frames: torch.Tensor) -> torch.Tensor:
    """uint8 clips (B, F, H, W, 3) → latents (B, F, C, h, w) with the frozen autoencoder."""
    b, f = frames.shape[:2]
    z = vae.encode(to_unit(frames.flatten(0, 1)).to(vae.latent_scale.device))
    return z.float().view(b, f, *z.shape[1:])


def load_vae(config: ModelConfig, path: Path) -> LatentAutoencoder:
    """The autoencoder of a model directory; its latent shape and frames must match the teacher's config."""
    vae_config, _ = checkpoint.read_config(path)
    checkpoint.check_autoencoder(config, vae_config, path)
    vae = LatentAutoencoder(config)
    checkpoint.load_into(vae, checkpoint.load_model(path, need_dit=False).vae, path / checkpoint.VAE_FILE)
    return vae


def train_teacher(config: ModelConfig, cfg: TrainConfig, objective: TeacherObjective, ddp: Distributed, *,
                  vae_from: Path | None, resume: bool = False, init_from: Path | None = None,
                  prompt_encoder: PromptEncoder | None = None,
                  clips: ClipSource | None = None) -> TrainResult:
    """Train the DiT teacher and export a model directory. Stops early (and saves) on SIGTERM.

    ``prompt_encoder`` shares a loaded encoder; ``clips`` replaces the run's data source (tests use fakes).
    """
    run = RunDir(Path(cfg.out))
    settings = settings_dict(stage=STAGE, model=config, train=cfg, objective=objective)
    run.prepare(resume, settings, write=ddp.is_main)
    source = vae_from or init_from
    if source is None:
        raise RunError("the teacher needs an autoencoder: pass --vae MODEL_DIR (from `worldloop train vae`)")
    vae = load_vae(config, source).to(ddp.device).eval().requires_grad_(False)
    dit, ema, optimizer, start, previous_steps = start_state(config, cfg, ddp.device, run, settings, resume,
                                                            init_from)
    model = wrap_model(TeacherLoss(dit), cfg, ddp)
    encoder = prompt_encoder or PromptEncoder(config.dit.max_prompt_tokens, device=ddp.device)
    clips = clips or make_clip_source(cfg, config, ddp.device, ddp.rank, cfg.clip_frames,
                                      objective.random_keys)
    batch_size = local_batch_size(cfg.batch_size, ddp)
    log = JsonlLog(run.log, ddp.is_main)
    progress = Progress(start, cfg.steps, "train teacher", ddp.is_main)
    step = start
    meta = {"init_from": str(init_from) if init_from else None, "previous_steps": previous_steps}

    def save() -> None:
        if ddp.is_main:
            save_checkpoint(run.checkpoint, stage=STAGE, step=step, settings=settings, modules={"dit": dit},
                            emas={"dit": ema}, optimizer=optimizer)

    with StopSignal() as stop:
        while step < cfg.steps and not any_rank(stop.requested, ddp):
            started = time.perf_counter()
            x0, keys, prompt = teacher_inputs(clips, vae, encoder, step, batch_size, ddp.device)
            data_seconds = time.perf_counter() - started
            generator = step_generator(cfg.seed, step, ddp.rank, ddp.device)
            draws = draw(objective, x0.shape, generator, ddp.device)
            with autocast(ddp.device, cfg.bf16):
                loss = model(x0, keys, prompt.tokens, prompt.mask, draws)
            grad_norm = optimizer_step(loss, model, optimizer, lr_at(step, cfg), cfg.grad_clip)
            ema.update(dit)
            step += 1
            progress.update(x0.shape[0] * x0.shape[1] * ddp.world_size, data_seconds, loss=loss.item())
            if step % cfg.log_every == 0 or step == cfg.steps:
                log.write(step=step, loss=loss.item(), grad_norm=grad_norm, lr=lr_at(step - 1, cfg),
                          sigma_mean=draws.sigma.mean().item(), frames_per_s=progress.rate(),
                          data_share=progress.data_share())
                progress.reset_rate()
            if step % cfg.checkpoint_every == 0:
                save()
            if ddp.is_main and cfg.sample_every and step % cfg.sample_every == 0:
                export(run.model, config, dit, ema.module, vae, step, meta)
                write_samples(run, config, ema.module, vae, encoder, step, ddp.device)
    progress.close()
    save()
    if ddp.is_main:
        export(run.model, config, dit, ema.module, vae, step, meta)
    return TrainResult(run.model, step, dit)


def start_state(config: ModelConfig, cfg: TrainConfig, device: torch.device, run: RunDir,
                settings: dict[str, Any], resume: bool, init_from: Path | None
                ) -> tuple[DiT, EMA, torch.optim.Optimizer, int, int]:
    """DiT, EMA and optimizer: fresh (seeded), from --init-from, or resumed from the run's checkpoint.

    Returns them with the step to start from and the steps of the --init-from model."""
    torch.manual_seed(cfg.seed)
    dit = DiT(config).to(device)
    ema = EMA(dit, cfg.ema_decay)
    previous_steps = 0
    if init_from is not None:  # a resumed run still counts the steps of the model it started from
        previous_steps = steps_of(init_from) if resume else init_weights(dit, ema, init_from)
    optimizer = make_optimizer(dit, cfg, device)
    start = 0
    if resume:
        start = load_checkpoint(run.checkpoint, stage=STAGE, settings=settings, modules={"dit": dit},
                                emas={"dit": ema}, optimizer=optimizer)
    return dit, ema, optimizer, start, previous_steps


def steps_of(path: Path) -> int:
    """Optimizer steps behind a model directory: its own and those of the model it was started from."""
    _, metadata = checkpoint.read_config(path)
    return int(metadata.get("step", 0)) + int(metadata.get("previous_steps", 0))


def init_weights(dit: DiT, ema: EMA, path: Path) -> int:
    """--init-from: DiT and EMA weights (any dtype) from a model directory; returns its recorded step."""
    files = checkpoint.load_model(path)
    checkpoint.load_into(dit, files.dit, path / checkpoint.DIT_FILE)
    ema_state = files.dit_ema if files.dit_ema is not None else files.dit
    checkpoint.load_into(ema.module, ema_state, path / checkpoint.EMA_FILE)
    ema.updates = 10_000  # a warm average: use the full decay from the first update
    return steps_of(path)


def export(out: Path, config: ModelConfig, dit: DiT, ema_dit: nn.Module, vae: LatentAutoencoder, step: int,
           meta: dict[str, Any]) -> Path:
    """The model directory: DiT (fp32), EMA (bf16, what ships and what --init-from carries), autoencoder."""
    return checkpoint.save_model(out, config, dit, vae, dit_ema=ema_dit,
                                 metadata={"stage": STAGE, "step": step, **meta})


@torch.no_grad()
def write_samples(run: RunDir, config: ModelConfig, ema_dit: nn.Module, vae: LatentAutoencoder,
                  encoder: PromptEncoder, step: int, device: torch.device, frames: int = 32) -> None:
    """A held-out engine clip continued by the EMA model through ``WorldModel``: MP4 engine | model, PNGs."""
    world = WorldClips(config.height, config.width, config.dit.sink + 2 + frames, device, held_out=True)
    clip: ClipBatch = world.batch(0, 1)
    wm = WorldModel(config, copy.deepcopy(ema_dit), copy.deepcopy(vae), encoder, device=device,
                    max_sessions=1)
    context = config.dit.sink + 2
    engine = clip.frames[0].cpu().numpy()
    session = wm.new_session(clip.prompts[0], seed=step, first_frames=engine[:context],
                             first_keys=clip.keys[0, :context].cpu().numpy())
    generated = [wm.step([session], [int(k)])[0] for k in clip.keys[0, context:].tolist()]
    side = [torch.cat([torch.from_numpy(e), torch.from_numpy(g)], 1).numpy()
            for e, g in zip(engine[context:], generated, strict=True)]
    write_video(run.samples / f"teacher_{step:07d}.mp4", side, config.fps)
    pick = list(range(0, frames, max(1, frames // 8)))[:8]
    strips = [engine[context:][pick], np.stack(generated)[pick]]
    save_png_grid(run.samples / f"teacher_{step:07d}.png", strips)
