"""What several training stages use, so that no stage imports another: the run's clip source and its inputs
(latents, keys, prompts), model directories in and out (autoencoder, DiT, student config and export), and
the teacher-forcing prediction of a frozen model with guidance (``guided_x0``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from worldloop.distill.data.clips import ClipBatch, ClipPool, ClipSource, EpisodeClips, WorldClips
from worldloop.distill.stages.run import RunError
from worldloop.distill.stages.runtime import TrainConfig
from worldloop.models import checkpoint
from worldloop.models.config import ModelConfig
from worldloop.models.dit import DiT
from worldloop.models.keys import keys_to_tensor
from worldloop.models.kv_cache import PromptKV
from worldloop.models.sampling import ModelFn, add_noise, denoise
from worldloop.models.text import PromptEmbedding, PromptEncoder
from worldloop.models.vae import LatentAutoencoder, to_unit


def make_clip_source(cfg: TrainConfig, config: ModelConfig, device: torch.device, rank: int, frames: int,
                     random_keys: float = 0.0, key_hold: int = 1, depth_columns: int = 0) -> ClipSource:
    """The training data of a run: recorded episodes (``cfg.episodes``), else the built-in world.

    World clips are pooled (``cfg.pool_clips``, default 256 on the CPU, 4096 on a GPU): building a world
    and stepping the explorer cost a fixed time per batch and per frame, more than a training step.
    """
    if cfg.episodes:
        return EpisodeClips(Path(cfg.episodes), config.height, config.width, frames, seed=cfg.seed, rank=rank)
    pool = cfg.pool_clips if cfg.pool_clips >= 0 else (256 if device.type == "cpu" else 4096)
    if pool == 0:
        return WorldClips(config.height, config.width, frames, device, seed=cfg.seed, rank=rank,
                          random_keys=random_keys, key_hold=key_hold,
                          depth_columns=depth_columns)
    source = WorldClips(config.height, config.width, max(2 * frames, 16), device, seed=cfg.seed, rank=rank,
                        random_keys=random_keys, key_hold=key_hold, depth_columns=depth_columns)
    return ClipPool(source, pool, frames, chunk=max(32, pool // 8), refresh_every=cfg.pool_refresh,
                    seed=cfg.seed, rank=rank)


def clip_inputs(clips: ClipSource, vae: LatentAutoencoder, encoder: PromptEncoder, iteration: int, size: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, PromptEmbedding]:
    """An iteration's clips as latents (B, F, C, h, w), multi-hot keys (B, F, K) and prompt embeddings."""
    return batch_inputs(clips.batch(iteration, size).to(device), vae, encoder, device)


def batch_inputs(batch: ClipBatch, vae: LatentAutoencoder, encoder: PromptEncoder, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, PromptEmbedding]:
    """A batch of clips as latents (B, F, C, h, w), multi-hot keys (B, F, K) and prompt embeddings."""
    prompt = encoder.encode(batch.prompts).to(device)
    return encode_clips(vae, batch.frames), keys_to_tensor(batch.keys, device=device), prompt


@torch.no_grad()
def encode_clips(vae: LatentAutoencoder, frames: torch.Tensor) -> torch.Tensor:
    """uint8 clips (B, F, H, W, 3) → latents (B, F, C, h, w) with the frozen autoencoder."""
    b, f = frames.shape[:2]
    z = vae.encode(to_unit(frames.flatten(0, 1)).to(vae.latent_scale.device))
    return z.float().view(b, f, *z.shape[1:])


def load_vae(config: ModelConfig, path: Path) -> LatentAutoencoder:
    """The autoencoder of a model directory; its latent shape and frames must match ``config``."""
    vae_config, _ = checkpoint.read_config(path)
    checkpoint.check_autoencoder(config, vae_config, path)
    vae = LatentAutoencoder(config)
    checkpoint.load_into(vae, checkpoint.load_model(path, need_dit=False).vae, path / checkpoint.VAE_FILE)
    return vae


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


def noisy_context(latents: torch.Tensor, context_sigma: float, eps: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Context frames as the cache holds them: re-noised to the sampler's ``context_sigma``; returns them with
    their σ per frame (B, F)."""
    sigma = torch.full(latents.shape[:2], context_sigma, device=latents.device)
    return (add_noise(latents, eps, sigma) if context_sigma > 0 else latents), sigma


@torch.no_grad()
def guided_x0(dit: DiT, x: torch.Tensor, sigma: torch.Tensor, keys: torch.Tensor, prompt: PromptEmbedding,
              context: torch.Tensor, context_sigma: torch.Tensor, guidance: float) -> torch.Tensor:
    """A frozen model's x0 prediction for clips, with classifier-free guidance on the prompt."""
    cond = dit.prompt_kv(prompt.tokens, prompt.mask)
    null = dit.null_prompt_kv(x.shape[0]) if guidance != 1.0 else None
    return denoise(clip_model_fn(dit, keys, context_sigma), x, sigma, cond, context, guidance, null)


def export_student(out: Path, config: ModelConfig, dit: DiT, ema_dit: nn.Module, vae: nn.Module, *,
                   stage: str, iteration: int, meta: dict[str, Any]) -> Path:
    """The student's model directory: weights (fp32), EMA (bf16, what plays) and the teacher's autoencoder."""
    return checkpoint.save_model(out, config, dit, vae, dit_ema=ema_dit,
                                 metadata={"stage": stage, "step": iteration,
                                           "student_steps": config.sampling.steps, **meta})
