"""Stage 3: short self-forcing distribution-matching distillation (``worldloop distill dmd``).

DESIGN §6.3. The student (a CD student, or the teacher itself) generates clips the way it plays: frame by
frame through ``WorldModel.rollout_latents``, the one rollout loop, with the inference cache policy (window,
sink, context noise, the extra steps of the first frame). Two scores judge the generated clips:

- the real score: the frozen teacher (or a bidirectional teacher given with ``--real``) with classifier-free
  guidance on the prompt;
- the fake score: a critic initialised from the teacher and trained by flow matching on the student's clips,
  so it tracks the student's current distribution.

One iteration (``dmd_step``):
1. Rollout of B streams of F frames (keys and prompts from engine clips). Every frame after the first stops
   at a sampled exit step k ∈ 1..S of the student's S steps; the newest ``grad_frames`` frames carry gradients
   through their last denoising step only; cache writes never do (gradients stop at the cache).
2. Every ``critic_steps``-th iteration, a generator update: the clip is re-noised to one σ per clip
   (uniform in [min_sigma, max_sigma], shifted), both scores predict x0 in the teacher-forcing layout
   [generated clip | noisy clip], and ``losses.dmd_generator_loss`` applies (fake x0 − real x0) /
   mean|x − real x0| to the newest frames through a stop-gradient MSE target.
3. Every iteration, a critic update: ``losses.critic_loss`` (flow matching) on the detached clip at per-frame
   σ from the same range.

Keep it short (a few hundred iterations): over-trained DMD students lose motion.

    worldloop distill dmd --teacher runs/teacher/model --student runs/cd/model --iterations 300 --out runs/dmd
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from worldloop.distill.data.clips import ClipBatch, ClipSource
from worldloop.distill.stages import losses, shared
from worldloop.distill.stages.loop import Stage, Step, prepare_run, train
from worldloop.distill.stages.run import RunError, settings_dict
from worldloop.distill.stages.runtime import (
    EMA,
    Distributed,
    TrainConfig,
    TrainResult,
    autocast,
    lr_at,
    make_optimizer,
    optimizer_step,
)
from worldloop.models.config import ModelConfig
from worldloop.models.dit import DiT
from worldloop.models.keys import keys_to_tensor
from worldloop.models.sampling import add_noise, shift_sigma
from worldloop.models.text import PromptEmbedding, PromptEncoder
from worldloop.models.world_model import Session, WorldModel

STAGE = "dmd"


@dataclass(frozen=True)
class DMDObjective:
    guidance: float = 1.0  # classifier-free guidance scale of the real score (1 = off)
    critic_steps: int = 5  # critic updates per generator update
    critic_lr: float = 2e-5
    grad_frames: int = 2  # newest frames of each rollout that carry the generator's gradient
    min_sigma: float = 0.02  # re-noising range (before the shift) of the DMD and critic noise levels
    max_sigma: float = 0.98
    shift: float = 5.0

    def __post_init__(self) -> None:
        if self.critic_steps < 1 or self.grad_frames < 1:
            raise ValueError("--critic-steps and --grad-frames must be >= 1")
        if not 0.0 < self.min_sigma < self.max_sigma < 1.0:
            raise ValueError("the re-noising range needs 0 < --min-sigma < --max-sigma < 1")
        if self.guidance < 0 or self.shift <= 0 or not 0 < self.critic_lr < 1:
            raise ValueError("--guidance must be >= 0, --shift > 0 and --critic-lr in (0, 1)")


@dataclass
class DMDDraws:
    """The random numbers of one iteration: the exit step, each stream's seed, σ (B,) and ε of the DMD
    re-noising, σ (B, F) and ε of the critic's flow matching, ε of the context noise."""

    exit_steps: int
    seeds: list[int]
    sigma: torch.Tensor
    noise: torch.Tensor
    critic_sigma: torch.Tensor
    critic_noise: torch.Tensor
    context_eps: torch.Tensor


def draw(objective: DMDObjective, student_steps: int, shape: tuple[int, ...], generator: torch.Generator,
         device: torch.device) -> DMDDraws:
    """Draws for clips of latents of ``shape`` (B, F, C, h, w), in a fixed order."""
    o = objective

    def levels(size: tuple[int, ...]) -> torch.Tensor:
        u = torch.rand(size, generator=generator, device=device)
        return shift_sigma(o.min_sigma + (o.max_sigma - o.min_sigma) * u, o.shift)

    exit_steps = int(torch.randint(1, student_steps + 1, (1,), generator=generator, device=device))
    seeds = torch.randint(0, 2**31 - 1, (shape[0],), generator=generator, device=device).tolist()
    sigma, noise = levels(shape[:1]), torch.randn(shape, generator=generator, device=device)
    critic_sigma, critic_noise = levels(shape[:2]), torch.randn(shape, generator=generator, device=device)
    context_eps = torch.randn(shape, generator=generator, device=device)
    return DMDDraws(exit_steps, seeds, sigma, noise, critic_sigma, critic_noise, context_eps)


def self_forcing_rollout(wm: WorldModel, sessions: Sequence[Session], prompts: Sequence[str],
                         keys: torch.Tensor, seeds: Sequence[int], exit_steps: int, grad_frames: int,
                         prompt: PromptEmbedding | None = None) -> torch.Tensor:
    """The sessions restarted with new prompts and seeds and rolled out by ``wm`` over keys (B, F) → latents
    (B, F, C, h, w), the last ``grad_frames`` frames with gradients.

    The first frame takes the config's ``first_frame_steps`` as in play; later frames take ``exit_steps``
    (for a 1–2-step student, stopping the student's grid after k steps is the k-step grid). ``prompt``, the
    encoded ``prompts``: the frames with gradients attend to the student's K/V of it computed with
    gradients, so the generator loss reaches the cross-attention projections as well.
    """
    wm.steps = exit_steps
    for session, text, seed in zip(sessions, prompts, seeds, strict=True):
        wm.reset(session, prompt=text, seed=seed)
    prompt_kv = None
    if grad_frames and prompt is not None:
        prompt_kv = wm.dit.prompt_kv(prompt.tokens.to(wm.device), prompt.mask.to(wm.device))
    return wm.rollout_latents(sessions, keys, grad_frames=grad_frames, prompt=prompt_kv)


def generator_loss(x: torch.Tensor, keys: torch.Tensor, prompt: PromptEmbedding, real: DiT, critic: DiT,
                   d: DMDDraws, objective: DMDObjective, context_sigma: float) -> torch.Tensor:
    """Step 2 of the module docstring: the DMD loss of the newest ``grad_frames`` frames of ``x``."""
    clip = x.detach()
    context, context_sigmas = shared.noisy_context(clip, context_sigma, d.context_eps)
    noisy = add_noise(clip, d.noise, d.sigma)
    real_x0 = shared.guided_x0(real, noisy, d.sigma, keys, prompt, context, context_sigmas,
                               objective.guidance)
    fake_x0 = shared.guided_x0(critic, noisy, d.sigma, keys, prompt, context, context_sigmas, 1.0)
    g = objective.grad_frames
    return losses.dmd_generator_loss(x[:, -g:], fake_x0[:, -g:], real_x0[:, -g:])


def critic_flow_loss(critic: DiT, x: torch.Tensor, keys: torch.Tensor, prompt: PromptEmbedding, d: DMDDraws,
                     context_sigma: float) -> torch.Tensor:
    """Step 3: the critic's flow-matching loss on the generated clip, teacher-forcing layout."""
    clip = x.detach()
    context, context_sigmas = shared.noisy_context(clip, context_sigma, d.context_eps)
    noisy = add_noise(clip, d.critic_noise, d.critic_sigma)
    v = critic(noisy, d.critic_sigma, keys, critic.prompt_kv(prompt.tokens, prompt.mask), context=context,
               context_sigma=context_sigmas)
    return losses.critic_loss(v, clip, d.critic_noise)


@dataclass
class DMDModels:
    """What one iteration works on: the student inside its WorldModel (and one session per stream), the
    critic, the real score."""

    wm: WorldModel
    sessions: list[Session]
    critic: DiT
    real: DiT
    ema: EMA
    optimizer: torch.optim.Optimizer


def dmd_step(m: DMDModels, prompts: Sequence[str], keys: torch.Tensor, prompt: PromptEmbedding, d: DMDDraws,
             objective: DMDObjective, cfg: TrainConfig, iteration: int) -> dict[str, float]:
    """One iteration (steps 1–3); returns what it measured."""
    device, context_sigma = m.wm.device, m.wm.config.sampling.context_sigma
    train_generator = iteration % objective.critic_steps == 0
    multi_hot = keys_to_tensor(keys, device=device)
    lr = lr_at(iteration, cfg)
    record: dict[str, float] = {"exit_steps": d.exit_steps, "lr": lr}
    with autocast(device, cfg.bf16):
        x = self_forcing_rollout(m.wm, m.sessions, prompts, keys, d.seeds, d.exit_steps,
                                 objective.grad_frames if train_generator else 0, prompt)
        if train_generator:
            gen_loss = generator_loss(x, multi_hot, prompt, m.real, m.critic, d, objective, context_sigma)
    if train_generator:
        record["generator_grad_norm"] = optimizer_step(gen_loss, m.wm.dit, m.optimizer, lr, cfg.grad_clip)
        record["generator_loss"] = gen_loss.item()
        m.ema.update(m.wm.dit)
    with autocast(device, cfg.bf16):
        loss = critic_flow_loss(m.critic, x, multi_hot, prompt, d, context_sigma)
    critic_lr = objective.critic_lr * lr / cfg.lr  # the same warm-up
    record["critic_grad_norm"] = optimizer_step(loss, m.critic, m.optimizer, critic_lr, cfg.grad_clip)
    record["critic_loss"] = loss.item()
    return record


def load_models(config: ModelConfig, cfg: TrainConfig, device: torch.device, teacher_dir: Path,
                student_dir: Path | None, real_dir: Path | None, encoder: PromptEncoder
                ) -> tuple[DMDModels, nn.Module]:
    """Student (in a WorldModel, one cache slot per stream), critic and real score; and the autoencoder."""
    teacher_config, critic = shared.load_dit(teacher_dir, device)
    shared.check_compatible(config, teacher_config, teacher_dir, same_dit=True)
    if real_dir is None:
        real = shared.frozen(copy.deepcopy(critic))
    else:
        real_config, real = shared.load_dit(real_dir, device)
        shared.check_compatible(config, real_config, real_dir, same_dit=False)
        shared.frozen(real)
    source = student_dir or teacher_dir
    student_source_config, student = shared.load_dit(source, device)
    shared.check_compatible(config, student_source_config, source, same_dit=True)
    vae = shared.frozen(shared.load_vae(config, teacher_dir).to(device))
    wm = WorldModel(config, student, vae, encoder, device=device, max_sessions=cfg.batch_size,
                    steps=config.sampling.steps, precision="fp32")
    sessions = [wm.new_session("", seed=0) for _ in range(cfg.batch_size)]
    ema = EMA(student, cfg.ema_decay)
    optimizer = make_optimizer(nn.ModuleDict({"student": student, "critic": critic}), cfg, device)
    return DMDModels(wm, sessions, critic.train(), real, ema, optimizer), vae


class DMDStage(Stage):
    """The student rolled out through its ``WorldModel``, judged by the real score and a trained critic."""

    name, title = STAGE, "distill dmd"
    export_at_checkpoints = True

    def __init__(self, config: ModelConfig, cfg: TrainConfig, objective: DMDObjective, ddp: Distributed,
                 settings: dict[str, Any], *, teacher_dir: Path, student_dir: Path | None,
                 real_dir: Path | None, prompt_encoder: PromptEncoder | None,
                 clips: ClipSource | None) -> None:
        super().__init__(cfg, ddp, settings)
        self.config, self.objective = config, objective
        self.device = device = ddp.device
        self.encoder = prompt_encoder or PromptEncoder(config.dit.max_prompt_tokens, device=device)
        self.m, self.vae = load_models(config, cfg, device, teacher_dir, student_dir, real_dir, self.encoder)
        self.trained = self.m.wm.dit
        self.modules = {"student": self.m.wm.dit, "critic": self.m.critic}
        self.emas, self.optimizer = {"student": self.m.ema}, self.m.optimizer
        self.clips = clips or shared.make_clip_source(cfg, config, device, 0, cfg.clip_frames)
        self.meta: dict[str, Any] = {"teacher": settings["teacher"], "student": settings["student"],
                                     "real": settings["real"], "guidance": objective.guidance}
        self.latent_shape = (cfg.batch_size, cfg.clip_frames, config.latent_channels, *config.latent_size)

    def batch(self, iteration: int) -> tuple[ClipBatch, PromptEmbedding]:
        clips = self.clips.batch(iteration, self.cfg.batch_size)
        return clips, self.encoder.encode(clips.prompts).to(self.device)

    def step(self, iteration: int, batch: tuple[ClipBatch, PromptEmbedding]) -> Step:
        (clips, prompt), cfg = batch, self.cfg
        d = draw(self.objective, self.config.sampling.steps, self.latent_shape, self.generator(iteration),
                 self.device)
        record = dmd_step(self.m, clips.prompts, clips.keys.to(self.device), prompt, d, self.objective, cfg,
                          iteration)
        return Step(cfg.batch_size * cfg.clip_frames, record["critic_loss"], record,
                    log_now="generator_loss" in record)

    def export(self, iteration: int, out: Path) -> None:
        shared.export_student(out, self.config, self.m.wm.dit, self.m.ema.module, self.vae, stage=STAGE,
                       iteration=iteration, meta=self.meta)


def train_dmd(config: ModelConfig, cfg: TrainConfig, objective: DMDObjective, ddp: Distributed, *,
              teacher_dir: Path, student_dir: Path | None = None, real_dir: Path | None = None,
              resume: bool = False, prompt_encoder: PromptEncoder | None = None,
              clips: ClipSource | None = None) -> TrainResult:
    """Run DMD on a student with ``config`` (``shared.student_config``), initialised from ``student_dir``
    (default: the teacher), and export it to ``<out>/model``. One process; stops (and saves) on SIGTERM."""
    if ddp.enabled:
        raise RunError("distill dmd runs in one process (its self-forcing rollout is not data-parallel)")
    if objective.grad_frames > cfg.clip_frames:
        raise ValueError(f"--grad-frames {objective.grad_frames} exceeds --clip-frames {cfg.clip_frames}")
    sources = {"teacher": str(teacher_dir), "student": str(student_dir or teacher_dir),
               "real": str(real_dir or teacher_dir)}
    settings = settings_dict(stage=STAGE, model=config, train=cfg, objective=objective, **sources)
    run = prepare_run(cfg, settings, resume, ddp)
    stage = DMDStage(config, cfg, objective, ddp, settings, teacher_dir=teacher_dir, student_dir=student_dir,
                     real_dir=real_dir, prompt_encoder=prompt_encoder, clips=clips)
    return train(stage, cfg, ddp, run, resume=resume)
