"""Stage 2: causal consistency distillation of the teacher into a 1–2-step student (``worldloop distill cd``).

DESIGN §6.2. The student starts as a copy of the teacher and learns to jump from any level of the teacher's
trajectory grid straight to the clean frame. No trajectories are stored: each step makes its own pair of
neighbouring grid levels from ground-truth clips.

1. Latents x0 (B, F, C, h, w) of engine clips, their keys and prompts (as in teacher training).
2. A shifted grid of ``grid_steps`` levels (``models.sampling.sigma_grid``): 1 = σ_0 > σ_1 > … > σ_N = 0. Each
   clip draws an index n < N; its frames are noised to x_n at σ_n. The teacher-forcing layout [clean | noisy]
   of training is kept: ground-truth context frames (at the sampler's ``context_sigma``), noisy targets.
3. One guided teacher ODE step (classifier-free guidance on the prompt against the teacher's null prompt,
   ``models.sampling.denoise``; then ``losses.ode_step``) takes x_n to x_{n+1} at σ_{n+1}.
4. Target: the EMA student's x0 prediction at (x_{n+1}, σ_{n+1}) — at σ_{n+1} = 0 the teacher's result itself.
5. Loss: ``losses.consistency_loss`` between the student's x0 prediction at (x_n, σ_n) and that target.

The exported model directory is the teacher's config with ``sampling.steps`` = the student's step count and
guidance off (the guidance is distilled in), so ``WorldModel.from_pretrained`` plays it as it is.

    worldloop distill cd --teacher runs/teacher/model --student-steps 2 --out runs/cd
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from worldloop.distill.data.clips import ClipSource
from worldloop.distill.stages import losses
from worldloop.distill.stages.run import (
    JsonlLog,
    Progress,
    RunDir,
    RunError,
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
from worldloop.distill.stages.teacher import load_vae, teacher_inputs
from worldloop.models import checkpoint
from worldloop.models.config import ModelConfig
from worldloop.models.dit import DiT
from worldloop.models.kv_cache import PromptKV
from worldloop.models.sampling import ModelFn, add_noise, denoise, sigma_grid, x0_from_v
from worldloop.models.text import PromptEmbedding, PromptEncoder

STAGE = "cd"


@dataclass(frozen=True)
class CDObjective:
    grid_steps: int = 48  # levels of the teacher's trajectory grid
    guidance: float = 1.0  # classifier-free guidance scale of the teacher step (1 = off)
    shift: float = 5.0  # timestep shift of the grid (the teacher's sampler shift)

    def __post_init__(self) -> None:
        if not 2 <= self.grid_steps <= 1000:
            raise ValueError(f"--grid-steps {self.grid_steps} is out of range 2..1000")
        if self.guidance < 0 or self.shift <= 0:
            raise ValueError("--guidance must be >= 0 and --shift > 0")


# ----------------------------------------------------------------------------------------------------------
# Pieces the distillation stages share


def load_dit(path: Path, device: torch.device) -> tuple[ModelConfig, DiT]:
    """A model directory's DiT in float32, with its EMA weights when present (what the directory plays)."""
    files = checkpoint.load_model(path)
    dit = DiT(files.config)
    use_ema = files.dit_ema is not None
    weights = files.dit_ema if use_ema else files.dit
    checkpoint.load_into(dit, weights, path / (checkpoint.EMA_FILE if use_ema else checkpoint.DIT_FILE))
    return files.config, dit.to(device)


def student_config(config: ModelConfig, steps: int, first_frame_steps: int) -> ModelConfig:
    """The student's config: the teacher's, sampling with ``steps`` steps (the first frame with more) and no
    guidance (the student learns the guided teacher)."""
    if config.dit.bidirectional:
        raise ValueError("the student must be causal; pass the causal teacher (a bidirectional teacher can "
                         "only be the real score of `distill dmd`)")
    if not 1 <= steps <= 2:
        raise ValueError(f"--student-steps must be 1 or 2, got {steps}")
    sampling = dataclasses.replace(config.sampling, steps=steps, guidance=1.0,
                                   first_frame_steps=max(steps, first_frame_steps))
    return config.replace(sampling=sampling)


def check_compatible(config: ModelConfig, other: ModelConfig, path: Path, *, same_dit: bool) -> None:
    """``other`` (read from ``path``) must share the latent space, and with ``same_dit`` the architecture."""
    space = (config.vae, config.height, config.width)
    if (other.vae, other.height, other.width) != space:
        raise RunError(f"{path}: its frames or autoencoder differ from the student's ({config.name})")
    if same_dit and dataclasses.replace(other.dit, bidirectional=False) != config.dit:
        raise RunError(f"{path}: its DiT architecture differs from the student's")


def frozen(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


def clip_model_fn(dit: DiT, keys: torch.Tensor, context_sigma: torch.Tensor) -> ModelFn:
    """``model_fn(x, σ, prompt, context) -> v`` for full clips x (B, F, C, h, w) at one σ per clip (B,),
    in the teacher-forcing layout [context | x] (a bidirectional DiT takes no context)."""

    def model_fn(x: torch.Tensor, sigma: torch.Tensor, prompt: PromptKV, context: torch.Tensor
                 ) -> torch.Tensor:
        per_frame = sigma[:, None].expand(-1, x.shape[1])
        if dit.cfg.bidirectional:
            return dit(x, per_frame, keys, prompt)
        return dit(x, per_frame, keys, prompt, context=context, context_sigma=context_sigma)

    return model_fn


def noisy_context(latents: torch.Tensor, sigma_c: float, noise: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Context frames as the cache holds them: re-noised to the sampler's ``context_sigma`` (B, F)."""
    sigma = torch.full(latents.shape[:2], sigma_c, device=latents.device)
    return (losses.add_noise(latents, noise, sigma) if sigma_c > 0 else latents), sigma


@torch.no_grad()
def guided_x0(dit: DiT, x: torch.Tensor, sigma: torch.Tensor, keys: torch.Tensor, prompt: PromptEmbedding,
              context: torch.Tensor, context_sigma: torch.Tensor, guidance: float) -> torch.Tensor:
    """A frozen model's x0 prediction for clips, with classifier-free guidance on the prompt."""
    cond = dit.prompt_kv(prompt.tokens, prompt.mask)
    null = dit.null_prompt_kv(x.shape[0]) if guidance != 1.0 else None
    return denoise(clip_model_fn(dit, keys, context_sigma), x, sigma, cond, context, guidance, null)


def export_student(out: Path, config: ModelConfig, dit: DiT, ema_dit: nn.Module, vae: nn.Module, *,
                   stage: str, step: int, meta: dict[str, Any]) -> Path:
    """The student's model directory: weights (fp32), EMA (bf16, what plays) and the teacher's autoencoder."""
    return checkpoint.save_model(out, config, dit, vae, dit_ema=ema_dit,
                                 metadata={"stage": stage, "step": step,
                                           "student_steps": config.sampling.steps, **meta})


# ----------------------------------------------------------------------------------------------------------
# The consistency objective


@dataclass
class CDDraws:
    """The random numbers of one step: grid index per clip (B,), noise of the targets and of the context."""

    index: torch.Tensor
    noise: torch.Tensor
    context_noise: torch.Tensor


def draw(objective: CDObjective, shape: torch.Size, generator: torch.Generator, device: torch.device
         ) -> CDDraws:
    index = torch.randint(0, objective.grid_steps, (shape[0],), generator=generator, device=device)
    noise = torch.randn(shape, generator=generator, device=device)
    return CDDraws(index, noise, torch.randn(shape, generator=generator, device=device))


class StudentX0(nn.Module):
    """The student's x0 prediction for noisy clips at one σ per clip (a module, so DDP can wrap it)."""

    def __init__(self, dit: DiT) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, keys: torch.Tensor, tokens: torch.Tensor,
                mask: torch.Tensor, context: torch.Tensor, context_sigma: torch.Tensor) -> torch.Tensor:
        prompt = self.dit.prompt_kv(tokens, mask)
        v = clip_model_fn(self.dit, keys, context_sigma)(x, sigma, prompt, context)
        return x0_from_v(x, v, sigma)


def cd_loss(student: nn.Module, teacher: DiT, ema: DiT, x0: torch.Tensor, keys: torch.Tensor,
            prompt: PromptEmbedding, grid: torch.Tensor, d: CDDraws, objective: CDObjective,
            context_sigma: float) -> torch.Tensor:
    """Steps 2–5 of the module docstring for one batch; ``student`` is a ``StudentX0`` (possibly wrapped)."""
    sigma, sigma_next = grid[d.index], grid[d.index + 1]
    x = add_noise(x0, d.noise, sigma)
    context, ctx_sigma = noisy_context(x0, context_sigma, d.context_noise)
    teacher_x0 = guided_x0(teacher, x, sigma, keys, prompt, context, ctx_sigma, objective.guidance)
    x_next = losses.ode_step(x, teacher_x0, sigma, sigma_next)
    ema_x0 = guided_x0(ema, x_next, sigma_next, keys, prompt, context, ctx_sigma, 1.0)
    student_x0 = student(x, sigma, keys, prompt.tokens, prompt.mask, context, ctx_sigma)
    return losses.consistency_loss(student_x0, ema_x0, x_next, sigma_next)


# ----------------------------------------------------------------------------------------------------------
# The training loop


def train_cd(config: ModelConfig, cfg: TrainConfig, objective: CDObjective, ddp: Distributed, *,
             teacher_dir: Path, resume: bool = False, prompt_encoder: PromptEncoder | None = None,
             clips: ClipSource | None = None) -> TrainResult:
    """Distil the teacher in ``teacher_dir`` into a student with ``config`` (see ``student_config``) and
    export it to ``<out>/model``. Stops early (and saves) on SIGTERM; ``clips``/``prompt_encoder`` replace
    the run's data source and encoder (tests use fakes)."""
    run = RunDir(Path(cfg.out))
    settings = settings_dict(stage=STAGE, model=config, train=cfg, objective=objective,
                             teacher=str(teacher_dir))
    run.prepare(resume, settings, write=ddp.is_main)
    teacher_config, teacher = load_dit(teacher_dir, ddp.device)
    check_compatible(config, teacher_config, teacher_dir, same_dit=True)
    frozen(teacher)
    vae = frozen(load_vae(config, teacher_dir).to(ddp.device))
    student = copy.deepcopy(teacher).requires_grad_(True)
    ema = EMA(student, cfg.ema_decay)
    optimizer = make_optimizer(student, cfg, ddp.device)
    step = 0
    if resume:
        step = load_checkpoint(run.checkpoint, stage=STAGE, settings=settings, modules={"dit": student},
                               emas={"dit": ema}, optimizer=optimizer)
    model = wrap_model(StudentX0(student), cfg, ddp)
    encoder = prompt_encoder or PromptEncoder(config.dit.max_prompt_tokens, device=ddp.device)
    clips = clips or make_clip_source(cfg, config, ddp.device, ddp.rank, cfg.clip_frames)
    grid = sigma_grid(objective.grid_steps, objective.shift).to(ddp.device)
    batch_size = local_batch_size(cfg.batch_size, ddp)
    log, progress = JsonlLog(run.log, ddp.is_main), Progress(step, cfg.steps, "distill cd", ddp.is_main)
    meta = {"teacher": str(teacher_dir), "grid_steps": objective.grid_steps, "guidance": objective.guidance}

    def save() -> None:
        if ddp.is_main:
            save_checkpoint(run.checkpoint, stage=STAGE, step=step, settings=settings,
                            modules={"dit": student}, emas={"dit": ema}, optimizer=optimizer)
            export_student(run.model, config, student, ema.module, vae, stage=STAGE, step=step, meta=meta)

    with StopSignal() as stop:
        while step < cfg.steps and not any_rank(stop.requested, ddp):
            started = time.perf_counter()
            x0, keys, prompt = teacher_inputs(clips, vae, encoder, step, batch_size, ddp.device)
            data_seconds = time.perf_counter() - started
            d = draw(objective, x0.shape, step_generator(cfg.seed, step, ddp.rank, ddp.device), ddp.device)
            with autocast(ddp.device, cfg.bf16):
                loss = cd_loss(model, teacher, ema.module, x0, keys, prompt, grid, d, objective,
                               config.sampling.context_sigma)
            grad_norm = optimizer_step(loss, model, optimizer, lr_at(step, cfg), cfg.grad_clip)
            ema.update(student)
            step += 1
            progress.update(x0.shape[0] * x0.shape[1] * ddp.world_size, data_seconds, loss=loss.item())
            if step % cfg.log_every == 0 or step == cfg.steps:
                log.write(step=step, loss=loss.item(), grad_norm=grad_norm, lr=lr_at(step - 1, cfg),
                          sigma_mean=grid[d.index].mean().item(), frames_per_s=progress.rate(),
                          data_share=progress.data_share())
                progress.reset_rate()
            if step % cfg.checkpoint_every == 0:
                save()
    progress.close()
    save()
    return TrainResult(run.model, step, student)
