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
5. Loss: the per-frame flow-matching error (``losses.frame_losses``), target v = ε − x0; for an x0-predicting
   DiT (``dit.prediction = "x0"``) the error of the clean frame it implies (σ²-weighted). The log splits it
   into frames right after a key change and the rest (``loss_key_change`` / ``loss_key_steady``).

A ``bidirectional`` DiT (config flag, ``--bidirectional``; a distillation teacher) has no clean context: the
whole clip is noisy at per-frame σ under full attention.

    worldloop train teacher --preset default --vae runs/vae/model --iterations 20000 --out runs/teacher
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from worldloop.distill.data.clips import ClipBatch, ClipSource, WorldClips
from worldloop.distill.data.media import save_png_grid
from worldloop.distill.stages import losses
from worldloop.distill.stages.loop import Stage, Step, prepare_run, train
from worldloop.distill.stages.run import RunDir, RunError, settings_dict
from worldloop.distill.stages.runtime import EMA, Distributed, TrainConfig, TrainResult
from worldloop.distill.stages.shared import (
    as_prediction,
    batch_inputs,
    load_vae,
    make_clip_source,
    start_key_flow,
)
from worldloop.distill.world.engine import WorldConfig
from worldloop.models import checkpoint
from worldloop.models.config import ModelConfig
from worldloop.models.dit import Aux, DiT, drop_keys
from worldloop.models.media import write_video
from worldloop.models.sampling import add_noise
from worldloop.models.text import PromptEmbedding, PromptEncoder
from worldloop.models.vae import LatentAutoencoder
from worldloop.models.world_model import WorldModel

STAGE = "teacher"


@dataclass(frozen=True)
class TeacherObjective:
    shift: float = 3.0  # timestep shift of the training noise levels (the sampler's is config.sampling.shift)
    sigma_mean: float = 0.0  # logit-normal location
    sigma_std: float = 1.0  # logit-normal scale
    context_noise: float = 0.7  # clean context is re-noised to σ_c ~ U(0, context_noise)
    key_dropout: float = 0.1  # per frame
    prompt_dropout: float = 0.1  # per clip
    random_keys: float = 0.1  # data: fraction of frames whose keys are random instead of the explorer's
    key_hold: int = 1  # data: a random key state, once drawn, is held for 1..key_hold frames
    depth_weight: float = 0.0  # auxiliary loss: log depth per token column, from the engine (needs aux_heads)
    motion_weight: float = 0.0  # auxiliary loss: camera motion since the last frame, from the engine's poses

    @property
    def auxiliary(self) -> bool:
        return self.depth_weight > 0 or self.motion_weight > 0

    def __post_init__(self) -> None:
        if self.key_hold < 1:
            raise ValueError(f"--key-hold must be at least 1, got {self.key_hold}")
        if self.depth_weight < 0 or self.motion_weight < 0:
            raise ValueError("--depth-weight and --motion-weight must be ≥ 0")
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
    context_eps: torch.Tensor
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
    context_eps = torch.randn(shape, generator=generator, device=device)
    return TeacherDraws(sigma, noise, context_sigma, context_eps, drop_keys, drop_prompt)


@dataclass
class AuxTargets:
    """The engine's truth for the auxiliary heads: log depth per token column (B, F, w/p); camera motion
    (B, F, 3) from the frame before, in its camera frame and in units of one frame's full move/turn; and
    ``valid`` (B, F), False for the first frame of a clip (no frame before it)."""

    depth: torch.Tensor
    motion: torch.Tensor
    valid: torch.Tensor


def aux_targets(poses: torch.Tensor, depths: torch.Tensor) -> AuxTargets:
    """Targets from a clip's poses (B, F, 3: x, y, heading) and column depths (B, F, D)."""
    world = WorldConfig()
    step = poses[:, 1:, :2] - poses[:, :-1, :2]
    heading = poses[:, :-1, 2]
    cos, sin = torch.cos(heading), torch.sin(heading)
    forward = (step[..., 0] * cos + step[..., 1] * sin) / world.move_speed
    strafe = (-step[..., 0] * sin + step[..., 1] * cos) / world.move_speed
    turn = torch.remainder(poses[:, 1:, 2] - heading + math.pi, 2 * math.pi) - math.pi
    motion = torch.stack([forward, strafe, turn / world.turn_rate], -1)
    motion = torch.cat([torch.zeros_like(motion[:, :1]), motion], 1)
    valid = torch.ones(poses.shape[:2], dtype=torch.bool, device=poses.device)
    valid[:, 0] = False
    return AuxTargets(depths.clamp_min(1e-2).log(), motion, valid)


def aux_loss(aux: Aux, target: AuxTargets, objective: TeacherObjective) -> torch.Tensor:
    """Weighted mean squared errors of the auxiliary heads (depth on every frame, motion where valid)."""
    depth = (aux.depth - target.depth).square().mean()
    motion = (aux.motion - target.motion).square().mean(-1)
    motion = (motion * target.valid).sum() / target.valid.sum().clamp_min(1)
    return objective.depth_weight * depth + objective.motion_weight * motion


class TeacherLoss(nn.Module):
    """The teacher-forcing objective as a module (DDP hooks ``forward``); see the module docstring."""

    def __init__(self, dit: DiT, objective: TeacherObjective | None = None) -> None:
        super().__init__()
        self.dit = dit
        self.objective = objective or TeacherObjective()

    def forward(self, x0: torch.Tensor, keys: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                d: TeacherDraws, aux: AuxTargets | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x0 (B, F, C, h, w) latents, keys (B, F, K) multi-hot, prompt tokens (B, T, 384) and mask (B, T);
        returns the per-frame losses (B, F), and with ``aux`` targets also the auxiliary loss."""
        x_t = add_noise(x0, d.noise, d.sigma)
        given = drop_keys(keys, d.drop_keys)
        prompt = self.dit.prompt_kv(tokens, mask & ~d.drop_prompt[:, None])
        context = None if self.dit.cfg.bidirectional else add_noise(x0, d.context_eps, d.context_sigma)
        out = self.dit(x_t, d.sigma, given, prompt, context=context,
                       context_sigma=None if context is None else d.context_sigma, return_aux=aux is not None)
        v, predicted = out if aux is not None else (out, None)
        target = "v" if self.dit.cfg.prediction == "v" else "x0"  # x0 and delta DiTs: the clean frame's error
        frame_loss = losses.frame_losses(v, x0, d.noise, d.sigma, target)
        if aux is None:
            return frame_loss
        return frame_loss, aux_loss(predicted, aux, self.objective)


@dataclass
class TeacherBatch:
    """An iteration's inputs: latents (B, F, C, h, w), multi-hot keys (B, F, K), the prompts' embedding and,
    with auxiliary heads, their targets."""

    latents: torch.Tensor
    keys: torch.Tensor
    prompt: PromptEmbedding
    aux: AuxTargets | None


class TeacherStage(Stage):
    """The DiT (from scratch or ``--init-from``) on latents of the run's clips (frozen autoencoder)."""

    name, title = STAGE, "train teacher"

    def __init__(self, config: ModelConfig, cfg: TrainConfig, objective: TeacherObjective, ddp: Distributed,
                 settings: dict[str, Any], *, vae: LatentAutoencoder, resume: bool, init_from: Path | None,
                 prompt_encoder: PromptEncoder | None, clips: ClipSource | None) -> None:
        super().__init__(cfg, ddp, settings)
        self.config, self.objective, self.vae = config, objective, vae
        torch.manual_seed(cfg.seed)
        self.dit = DiT(config).to(ddp.device)
        self.ema = self.trains("dit", self.dit)
        previous = 0
        if init_from is not None:  # a resumed run still counts the iterations of the model it started from
            previous = iterations_of(init_from) if resume else init_weights(self.dit, self.ema, init_from)
        self.meta = {"init_from": str(init_from) if init_from else None, "previous_steps": previous}
        if objective.auxiliary and not config.dit.aux_heads:
            raise RunError("--depth-weight/--motion-weight need a DiT with auxiliary heads (dit.aux_heads)")
        self.model = self.wrap(TeacherLoss(self.dit, objective))
        self.encoder = prompt_encoder or PromptEncoder(config.dit.max_prompt_tokens, device=ddp.device)
        columns = config.latent_size[1] // config.dit.patch_size if objective.auxiliary else 0
        self.clips = clips or make_clip_source(cfg, config, ddp.device, ddp.rank, cfg.clip_frames,
                                               objective.random_keys, objective.key_hold, columns)
        fit = None if resume else start_key_flow(self.dit, vae, cfg, config, ddp.device, clips)
        if fit is not None:  # the EMA starts from the fitted prior too
            self.ema.module.load_state_dict(self.dit.state_dict())
            self.meta["key_flow_fit"] = fit

    def batch(self, iteration: int) -> TeacherBatch:
        clip = self.clips.batch(iteration, self.batch_size).to(self.ddp.device)
        x0, keys, prompt = batch_inputs(clip, self.vae, self.encoder, self.ddp.device)
        aux = None
        if self.objective.auxiliary:
            if clip.poses is None or clip.depths is None:
                raise RunError("the auxiliary heads need the built-in world's poses and depths "
                               "(not recorded episodes)")
            aux = aux_targets(clip.poses, clip.depths)
        return TeacherBatch(x0, keys, prompt, aux)

    def step(self, iteration: int, batch: TeacherBatch) -> Step:
        x0, keys, prompt = batch.latents, batch.keys, batch.prompt
        draws = draw(self.objective, x0.shape, self.generator(iteration), self.ddp.device)
        record: dict[str, float | torch.Tensor] = {}
        with self.autocast():
            out = self.model(x0, keys, prompt.tokens, prompt.mask, draws, batch.aux)
        frame_loss, aux = out if batch.aux is not None else (out, None)
        loss = frame_loss.mean()
        if aux is not None:
            record["aux_loss"] = aux.detach()
            loss = loss + aux
        grad_norm = self.update(loss, self.model, iteration)
        shown = frame_loss.mean().item()
        after_change, steady = losses.key_change_split(frame_loss, keys)
        return Step(x0.shape[0] * x0.shape[1], shown, {"loss": shown, "grad_norm": grad_norm,
                                                        "lr": self.lr(iteration),
                                                        "sigma_mean": draws.sigma.mean(),
                                                        "loss_key_change": after_change,
                                                        "loss_key_steady": steady, **record})

    def samples(self, iteration: int, batch: Any, run: RunDir) -> None:
        self.export(iteration, run.model)  # the model the pictures show
        write_samples(run.samples, self.config, self.ema.module, self.vae, self.encoder, iteration,
                      self.ddp.device)

    def export(self, iteration: int, out: Path) -> None:
        export(out, self.config, self.dit, self.ema.module, self.vae, iteration, self.meta)


def train_teacher(config: ModelConfig, cfg: TrainConfig, objective: TeacherObjective, ddp: Distributed, *,
                  vae_from: Path | None, resume: bool = False, init_from: Path | None = None,
                  prompt_encoder: PromptEncoder | None = None,
                  clips: ClipSource | None = None) -> TrainResult:
    """Train the DiT teacher and export a model directory. Stops early (and saves) on SIGTERM.

    ``prompt_encoder`` shares a loaded encoder; ``clips`` replaces the run's data source (tests use fakes).
    """
    settings = settings_dict(stage=STAGE, model=config, train=cfg, objective=objective)
    run = prepare_run(cfg, settings, resume, ddp)
    source = vae_from or init_from
    if source is None:
        raise RunError("the teacher needs an autoencoder: pass --vae MODEL_DIR (from `worldloop train vae`)")
    vae = load_vae(config, source).to(ddp.device).eval().requires_grad_(False)
    stage = TeacherStage(config, cfg, objective, ddp, settings, vae=vae, resume=resume, init_from=init_from,
                         prompt_encoder=prompt_encoder, clips=clips)
    return train(stage, cfg, ddp, run, resume=resume)


def iterations_of(path: Path) -> int:
    """Optimizer updates behind a model directory: its own and those of the model it was started from.

    (Model directories record them as ``step`` and ``previous_steps``, the format's names.)"""
    _, metadata = checkpoint.read_config(path)
    return int(metadata.get("step", 0)) + int(metadata.get("previous_steps", 0))


def init_weights(dit: DiT, ema: EMA, path: Path) -> int:
    """--init-from: DiT and EMA weights (any dtype) from a model directory; returns its iterations."""
    files = checkpoint.load_model(path)
    ema_state = files.dit_ema if files.dit_ema is not None else files.dit
    raw, ema_state = (as_prediction(t, files.config, dit.config) for t in (files.dit, ema_state))
    checkpoint.load_into(dit, raw, path / checkpoint.DIT_FILE)
    checkpoint.load_into(ema.module, ema_state, path / checkpoint.EMA_FILE)
    ema.updates = 10_000  # a warm average: use the full decay from the first update
    return iterations_of(path)


def export(out: Path, config: ModelConfig, dit: DiT, ema_dit: nn.Module, vae: LatentAutoencoder,
           iteration: int, meta: dict[str, Any]) -> Path:
    """The model directory: DiT (fp32), EMA (bf16, what ships and what --init-from carries), autoencoder."""
    return checkpoint.save_model(out, config, dit, vae, dit_ema=ema_dit,
                                 metadata={"stage": STAGE, "step": iteration, **meta})


@torch.no_grad()
def write_samples(folder: Path, config: ModelConfig, ema_dit: nn.Module, vae: LatentAutoencoder,
                  encoder: PromptEncoder, iteration: int, device: torch.device, frames: int = 32) -> None:
    """A held-out engine clip continued by the EMA model through ``WorldModel``: MP4 engine | model, PNGs."""
    world = WorldClips(config.height, config.width, config.dit.sink + 2 + frames, device, held_out=True)
    clip: ClipBatch = world.batch(0, 1)
    wm = WorldModel(config, copy.deepcopy(ema_dit), copy.deepcopy(vae), encoder, device=device,
                    max_sessions=1)
    context_frames = config.dit.sink + 2
    engine = clip.frames[0].cpu().numpy()
    session = wm.new_session(clip.prompts[0], seed=iteration, first_frames=engine[:context_frames],
                             first_keys=clip.keys[0, :context_frames].cpu().numpy())
    generated = [wm.next_frame([session], [int(k)])[0] for k in clip.keys[0, context_frames:].tolist()]
    side = [torch.cat([torch.from_numpy(e), torch.from_numpy(g)], 1).numpy()
            for e, g in zip(engine[context_frames:], generated, strict=True)]
    write_video(folder / f"teacher_{iteration:07d}.mp4", side, config.fps)
    pick = list(range(0, frames, max(1, frames // 8)))[:8]
    strips = [engine[context_frames:][pick], np.stack(generated)[pick]]
    save_png_grid(folder / f"teacher_{iteration:07d}.png", strips)
