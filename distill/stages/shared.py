"""What several training stages use, so that no stage imports another: the run's clip source and its inputs
(latents, keys, prompts), model directories in and out (autoencoder, DiT, student config and export), and
the teacher-forcing prediction of a frozen model with guidance (``guided_x0``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from worldloop.distill.data.clips import ClipBatch, ClipPool, ClipSource, EpisodeClips, WorldClips
from worldloop.distill.stages.run import RunError
from worldloop.distill.stages.runtime import TrainConfig
from worldloop.models import checkpoint
from worldloop.models.camera import with_reprojector
from worldloop.models.config import CameraConfig, ModelConfig
from worldloop.models.dit import DiT, key_flow_of, warp, widen_to_warp
from worldloop.models.keys import keys_to_tensor
from worldloop.models.kv_cache import PromptKV
from worldloop.models.sampling import ModelFn, add_noise, denoise
from worldloop.models.text import PromptEmbedding, PromptEncoder
from worldloop.models.vae import LatentAutoencoder, to_unit


def make_clip_source(cfg: TrainConfig, config: ModelConfig, device: torch.device, rank: int, frames: int,
                     random_keys: float = 0.0, key_hold: int = 1, depth_columns: int = 0,
                     still: float = 0.0) -> ClipSource:
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
                          depth_columns=depth_columns, still=still)
    source = WorldClips(config.height, config.width, max(2 * frames, 16), device, seed=cfg.seed, rank=rank,
                        random_keys=random_keys, key_hold=key_hold, depth_columns=depth_columns,
                        still=still)
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


def fit_key_flow(dit: DiT, vae: LatentAutoencoder, clips: ClipSource, device: torch.device, *,
                 batches: int = 12, batch_size: int = 8, iterations: int = 300, lr: float = 0.05,
                 log: Callable[[str], None] = print) -> dict[str, float]:
    """Fit a warp DiT's key flow prior (``DiT.key_flow``) to the engine: the per-key flow fields that best
    carry each frame's latent to the next (the sum of the held keys' fields), as MSE of the warped latent.

    ``batches`` batches of clips are encoded once and cycled. The fit runs coarse to fine (latents box-blurred
    over 5, then 3, then 1 pixels), since a motion of 1–2 latent pixels is beyond the reach of the gradient
    of sharp texture. Returns the latent MSE of copying the previous frame and of the fitted warp on one more
    batch; the DiT's ``key_flow`` is set to the fit."""
    if dit.key_flow is None:
        raise ValueError("only a warp DiT has a key flow prior")
    pairs = []
    for i in range(batches + 1):
        batch = clips.batch(i, batch_size)
        z = encode_clips(vae, batch.frames.to(device))
        keys = keys_to_tensor(batch.keys, device=device)
        pairs.append((z[:, :-1].flatten(0, 1), z[:, 1:].flatten(0, 1), keys[:, 1:].flatten(0, 1)))
    held_out = pairs.pop()
    field = dit.key_flow.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([field], lr=lr)

    def moved(before: torch.Tensor, keys: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return warp(before[:, None], key_flow_of(keys, f)[:, None])[:, 0]

    for it in range(iterations):
        before, after, keys = pairs[it % len(pairs)]
        width = 5 if it < iterations // 3 else 3 if it < 2 * iterations // 3 else 1
        loss = F.mse_loss(moved(_box_blur(before, width), keys, field), _box_blur(after, width))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (it + 1) % 100 == 0:
            log(f"key flow fit {it + 1}/{iterations}: latent MSE {loss.item():.4f} (blur {width})")
    with torch.no_grad():
        before, after, keys = held_out
        result = {"copy_mse": F.mse_loss(before, after).item(),
                  "warp_mse": F.mse_loss(moved(before, keys, field), after).item()}
        dit.key_flow.copy_(field.to(dit.key_flow.dtype))
    log(f"key flow prior: held-out latent MSE {result['copy_mse']:.4f} copying the last frame, "
        f"{result['warp_mse']:.4f} warped by the held keys' flow")
    return result


def start_key_flow(dit: DiT, vae: LatentAutoencoder, cfg: TrainConfig, config: ModelConfig,
                   device: torch.device, source: ClipSource | None = None) -> dict[str, float] | None:
    """A new run's warp DiT whose key flow prior is still zero (trained from scratch, or converted from a
    delta DiT) gets it fitted on clips of ``source``, by default the run's data source under another seed
    (so the run's own batches stay as they were); returns the fit's figures, or None when there was nothing
    to fit."""
    if dit.key_flow is None or bool(dit.key_flow.detach().abs().sum() > 0):
        return None
    source = source or make_clip_source(dataclasses.replace(cfg, seed=cfg.seed + 1, pool_clips=0), config,
                                        device, 0, 12, random_keys=0.3)
    return fit_key_flow(dit, vae, source, device)


def depth_targets(batch: ClipBatch, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's per-frame log wall depth at ``columns`` column centres (B·F, columns) and sky flags (B·F,),
    from clips rendered with ``depth_columns`` a multiple of ``columns``."""
    if batch.depths is None or batch.sky is None:
        raise RunError("the depth network needs the built-in world's depths (clips with depth_columns)")
    depths = batch.depths.float()
    step = depths.shape[-1] // columns
    if step * columns != depths.shape[-1]:
        raise RunError(f"clips carry {depths.shape[-1]} depth columns, not a multiple of {columns}")
    # The centre of a group of `step` columns lies between its two middle columns (or on the middle one).
    centre = depths.unflatten(-1, (columns, step))[..., (step - 1) // 2: step // 2 + 1].mean(-1)
    frames = depths.shape[1]
    return centre.clamp_min(1e-2).log().flatten(0, 1), batch.sky.repeat_interleave(frames)


def fit_depth(dit: DiT, vae: LatentAutoencoder, clips: ClipSource, device: torch.device, *,
              batches: int = 48, batch_size: int = 8, iterations: int = 1500, lr: float = 3e-3,
              log: Callable[[str], None] = print) -> dict[str, float]:
    """Fit a reprojecting DiT's depth network (``DiT.reprojector``, ``models.camera``) to the engine: each
    latent column's log wall depth (MSE) and the sky flag (logistic), on ``batches`` batches of clips encoded
    once, mirrored left-right at random. Returns the held-out log-depth RMSE (and that of predicting the mean)
    and sky accuracy on one more batch; marks the network fitted."""
    reprojector = dit.reprojector
    if reprojector is None:
        raise ValueError("only a reprojecting DiT (camera.reproject) has a depth network")
    columns = dit.latent_size[1]
    latents, depths, skies = [], [], []
    for i in range(batches + 1):
        batch = clips.batch(i, batch_size)
        latents.append(encode_clips(vae, batch.frames.to(device)).flatten(0, 1))
        d, sky = depth_targets(batch, columns)
        depths.append(d.to(device))
        skies.append(sky.to(device).float())
    test = latents.pop(), depths.pop(), skies.pop()
    z, d, sky = torch.cat(latents), torch.cat(depths), torch.cat(skies)
    net = reprojector.depth_net.float().train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=iterations, pct_start=0.05)
    g = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        for it in range(iterations):
            idx = torch.randint(0, len(z), (64,), generator=g).to(device)
            flip = (torch.rand(64, generator=g) < 0.5).to(device)
            zi = torch.where(flip.view(-1, 1, 1, 1), z[idx].flip(3), z[idx])
            di = torch.where(flip.view(-1, 1), d[idx].flip(1), d[idx])
            pred, logit = net(zi)
            loss = F.mse_loss(pred, di) + 0.1 * F.binary_cross_entropy_with_logits(logit, sky[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if (it + 1) % 250 == 0:
                log(f"depth fit {it + 1}/{iterations}: loss {loss.item():.4f}")
    net.eval()
    with torch.no_grad():
        pred, logit = net(test[0])
        result = {"log_depth_rmse": (pred - test[1]).square().mean().sqrt().item(),
                  "mean_rmse": (test[1] - d.mean()).square().mean().sqrt().item(),
                  "sky_accuracy": ((logit > 0).float() == test[2]).float().mean().item()}
        reprojector.fitted.fill_(1.0)
    log(f"depth network: held-out log-depth RMSE {result['log_depth_rmse']:.3f} (the mean's "
        f"{result['mean_rmse']:.3f}), sky {result['sky_accuracy']:.3f} right")
    return result


def start_depth(dit: DiT, vae: LatentAutoencoder, cfg: TrainConfig, config: ModelConfig,
                device: torch.device) -> dict[str, float] | None:
    """A new run's reprojecting DiT whose depth network is not fitted yet gets it fitted on built-in world
    clips under another seed; returns the fit's figures, or None when there was nothing to fit."""
    if dit.reprojector is None or bool(dit.reprojector.fitted > 0):
        return None
    if cfg.episodes:
        raise RunError("the depth network is fitted on the built-in world (its depths); this run reads "
                       "recorded episodes")
    source = WorldClips(config.height, config.width, 12, device, seed=cfg.seed + 2, random_keys=0.3,
                        depth_columns=config.width)
    return fit_depth(dit, vae, source, device)


def _box_blur(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if width <= 1 else F.avg_pool2d(x, width, 1, width // 2, count_include_pad=False)


def load_vae(config: ModelConfig, path: Path) -> LatentAutoencoder:
    """The autoencoder of a model directory; its latent shape and frames must match ``config``."""
    vae_config, _ = checkpoint.read_config(path)
    checkpoint.check_autoencoder(config, vae_config, path)
    vae = LatentAutoencoder(config)
    checkpoint.load_into(vae, checkpoint.load_model(path, need_dit=False).vae, path / checkpoint.VAE_FILE)
    return vae


def load_dit(path: Path, device: torch.device, prediction: str | None = None,
             camera: CameraConfig | None = None) -> tuple[ModelConfig, DiT]:
    """A model directory's DiT in float32, with its EMA weights when present (what the directory plays).

    ``prediction`` "warp" turns a "delta" DiT into a warp DiT that computes the same (``as_prediction``);
    ``camera`` replaces the start's camera section; with ``reproject`` on where the start's was off, it
    turns a "delta" DiT into a reprojecting one with an unfitted depth network
    (``models.camera``) and a zero output layer: its base is now the moved previous frame, and the change it
    had learned to add moves the frame a second time (the stage-3 student so converted scored 28.7 / 18.7 /
    8.7 dB at horizons 1 / 4 / 16; with the zero layer, the reprojection alone, 30.2 / 25.1 / 20.0). The
    config returned is then the converted one."""
    files = checkpoint.load_model(path)
    config = files.config
    if prediction is not None and prediction != config.dit.prediction:
        config = config.replace(dit=dataclasses.replace(config.dit, prediction=prediction))
    convert = camera is not None and camera.reproject and not config.camera.reproject
    if convert and config.dit.prediction != "delta":
        raise RunError(f"--reproject moves a \"delta\" DiT's previous frame; {path} predicts "
                       f"{config.dit.prediction!r}")
    if camera is not None:
        config = config.replace(camera=camera)
    dit = DiT(config)
    use_ema = files.dit_ema is not None
    weights = as_prediction(files.dit_ema if use_ema else files.dit, files.config, config)
    if convert:
        weights = with_reprojector(weights, config)
        head = ("final.linear.weight", "final.linear.bias")
        weights |= {name: torch.zeros_like(weights[name]) for name in head}
    elif config.camera.reproject:  # a reprojecting start from before the moved frame was an input
        weights = with_reprojector(weights, config)
    checkpoint.load_into(dit, weights, path / (checkpoint.EMA_FILE if use_ema else checkpoint.DIT_FILE))
    return config, dit.to(device)


def as_prediction(tensors: dict[str, torch.Tensor], source: ModelConfig, target: ModelConfig
                  ) -> dict[str, torch.Tensor]:
    """DiT weights saved under ``source``'s output for a DiT of ``target``'s: unchanged when the outputs
    agree; a "delta" DiT becomes a "warp" DiT with zero flow (the same model until the flow trains)."""
    have, want = source.dit.prediction, target.dit.prediction
    if have == want:
        return tensors
    if (have, want) != ("delta", "warp"):
        raise RunError(f"a {have!r}-predicting DiT cannot start a {want!r}-predicting one "
                       "(only delta → warp)")
    return widen_to_warp(tensors, target)


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
