"""Stage 2: causal consistency distillation of the teacher into a 1–2-step student (``worldloop distill cd``).

DESIGN §6.2. The student starts as a copy of the teacher and learns to jump from any level of the teacher's
trajectory grid straight to the clean frame. No trajectories are stored: each iteration makes its own pair
of neighbouring grid levels from ground-truth clips.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from worldloop.distill.data.clips import ClipSource
from worldloop.distill.stages import losses, shared
from worldloop.distill.stages.loop import Stage, Step, prepare_run, train
from worldloop.distill.stages.run import settings_dict
from worldloop.distill.stages.runtime import Distributed, TrainConfig, TrainResult
from worldloop.models.config import ModelConfig
from worldloop.models.dit import DiT
from worldloop.models.sampling import add_noise, sigma_grid, x0_from_v
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


@dataclass
class CDDraws:
    """The random numbers of one iteration: grid index per clip (B,), noise of the targets and the context."""

    index: torch.Tensor
    noise: torch.Tensor
    context_eps: torch.Tensor


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
        v = shared.clip_model_fn(self.dit, keys, context_sigma)(x, sigma, prompt, context)
        return x0_from_v(x, v, sigma)


def cd_loss(student: nn.Module, teacher: DiT, ema: DiT, x0: torch.Tensor, keys: torch.Tensor,
            prompt: PromptEmbedding, grid: torch.Tensor, d: CDDraws, objective: CDObjective,
            context_sigma: float) -> torch.Tensor:
    """Steps 2–5 of the module docstring for one batch; ``student`` is a ``StudentX0`` (possibly wrapped)."""
    sigma, sigma_next = grid[d.index], grid[d.index + 1]
    x = add_noise(x0, d.noise, sigma)
    context, context_sigmas = shared.noisy_context(x0, context_sigma, d.context_eps)
    teacher_x0 = shared.guided_x0(teacher, x, sigma, keys, prompt, context, context_sigmas,
                                  objective.guidance)
    x_next = losses.ode_step(x, teacher_x0, sigma, sigma_next)
    ema_x0 = shared.guided_x0(ema, x_next, sigma_next, keys, prompt, context, context_sigmas, 1.0)
    student_x0 = student(x, sigma, keys, prompt.tokens, prompt.mask, context, context_sigmas)
    return losses.consistency_loss(student_x0, ema_x0, x_next, sigma_next)


class CDStage(Stage):
    """The student (a copy of the teacher) regressed onto its EMA's x0 one guided teacher step further."""

    name, title = STAGE, "distill cd"
    export_at_checkpoints = True

    def __init__(self, config: ModelConfig, cfg: TrainConfig, objective: CDObjective, ddp: Distributed,
                 settings: dict[str, Any], *, teacher_dir: Path, prompt_encoder: PromptEncoder | None,
                 clips: ClipSource | None) -> None:
        super().__init__(cfg, ddp, settings)
        self.config, self.objective = config, objective
        teacher_config, self.teacher = shared.load_dit(teacher_dir, ddp.device)
        shared.check_compatible(config, teacher_config, teacher_dir, same_dit=True)
        shared.frozen(self.teacher)
        self.vae = shared.frozen(shared.load_vae(config, teacher_dir).to(ddp.device))
        self.student = copy.deepcopy(self.teacher).requires_grad_(True)
        self.ema = self.trains("dit", self.student)
        self.model = self.wrap(StudentX0(self.student))
        self.encoder = prompt_encoder or PromptEncoder(config.dit.max_prompt_tokens, device=ddp.device)
        self.clips = clips or shared.make_clip_source(cfg, config, ddp.device, ddp.rank, cfg.clip_frames)
        self.grid = sigma_grid(objective.grid_steps, objective.shift).to(ddp.device)
        self.meta = {"teacher": str(teacher_dir), "grid_steps": objective.grid_steps,
                     "guidance": objective.guidance}

    def batch(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor, PromptEmbedding]:
        return shared.clip_inputs(self.clips, self.vae, self.encoder, iteration, self.batch_size,
                                  self.ddp.device)

    def step(self, iteration: int, batch: tuple[torch.Tensor, torch.Tensor, PromptEmbedding]) -> Step:
        x0, keys, prompt = batch
        d = draw(self.objective, x0.shape, self.generator(iteration), self.ddp.device)
        with self.autocast():
            loss = cd_loss(self.model, self.teacher, self.ema.module, x0, keys, prompt, self.grid, d,
                           self.objective, self.config.sampling.context_sigma)
        grad_norm = self.update(loss, self.model, iteration)
        shown = loss.item()
        return Step(x0.shape[0] * x0.shape[1], shown, {"loss": shown, "grad_norm": grad_norm,
                                                        "lr": self.lr(iteration),
                                                        "sigma_mean": self.grid[d.index].mean()})

    def export(self, iteration: int, out: Path) -> None:
        shared.export_student(out, self.config, self.student, self.ema.module, self.vae, stage=STAGE,
                       iteration=iteration, meta=self.meta)


def train_cd(config: ModelConfig, cfg: TrainConfig, objective: CDObjective, ddp: Distributed, *,
             teacher_dir: Path, resume: bool = False, prompt_encoder: PromptEncoder | None = None,
             clips: ClipSource | None = None) -> TrainResult:
    """Distil the teacher in ``teacher_dir`` into a student with ``config`` (see ``shared.student_config``)
    and export it to ``<out>/model``. Stops early (and saves) on SIGTERM; ``clips``/``prompt_encoder``
    replace the run's data source and encoder (tests use fakes)."""
    settings = settings_dict(stage=STAGE, model=config, train=cfg, objective=objective,
                             teacher=str(teacher_dir))
    run = prepare_run(cfg, settings, resume, ddp)
    stage = CDStage(config, cfg, objective, ddp, settings, teacher_dir=teacher_dir,
                    prompt_encoder=prompt_encoder, clips=clips)
    return train(stage, cfg, ddp, run, resume=resume)
