"""Training objectives: pure functions of tensors, each tested against hand-computed values.

Rectified flow (DESIGN §5): ``x_σ = (1 − σ)·x0 + σ·ε`` and the network predicts the velocity ``v = ε − x0``.
The teacher trains every frame of a clip at its own noise level σ (diffusion forcing / teacher forcing), so
σ has shape ``(B, F)`` and broadcasts over each frame's latent ``(C, h, w)``.

Noise levels are drawn logit-normal (Esser et al. 2024, "Scaling Rectified Flow Transformers", §3.1) and
then shifted with the same timestep shift the sampler uses (``σ' = sσ / (1 + (s − 1)σ)``), which moves
training mass towards the high noise levels a few-step sampler visits.
"""

from __future__ import annotations

import torch


def _per_frame(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """σ of shape (B,) or (B, F) → broadcastable against ``like`` (B, [F,] C, h, w)."""
    if like.shape[: sigma.ndim] != sigma.shape:
        raise ValueError(f"noise levels {tuple(sigma.shape)} do not match the leading dims of "
                         f"{tuple(like.shape)}")
    return sigma.reshape(*sigma.shape, *([1] * (like.ndim - sigma.ndim))).to(like.dtype)


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift ``σ' = sσ / (1 + (s − 1)σ)``; s = 1 is the identity, s > 1 favours high noise."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sample_sigmas(shape: tuple[int, ...], *, shift: float = 1.0, mean: float = 0.0, std: float = 1.0,
                  generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Logit-normal noise levels ``sigmoid(mean + std·n)``, then shifted; values in (0, 1)."""
    n = torch.randn(shape, generator=generator, device=device)
    return shift_sigma(torch.sigmoid(mean + std * n), shift)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_σ = (1 − σ)·x0 + σ·ε`` with σ per sample (B,) or per frame (B, F)."""
    s = _per_frame(sigma, x0)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow regression target ``v = ε − x0``."""
    return noise - x0


def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                       frame_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between the predicted velocity and ``ε − x0``, in float32.

    ``frame_weight`` (B, F), optional: per-frame weights (e.g. 0 for padded frames); the loss is the
    weighted mean over frames of each frame's mean squared error.
    """
    err = (v_pred.float() - velocity_target(x0.float(), noise.float())).square()
    if frame_weight is None:
        return err.mean()
    per_frame = err.flatten(frame_weight.ndim).mean(-1)  # (B, F)
    w = frame_weight.to(per_frame.dtype)
    return (per_frame * w).sum() / w.sum().clamp_min(1e-12)


def dropout_mask(batch: int, p: float, *, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool (batch,): True where a sample's condition is dropped (replaced by the null condition)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    return torch.rand(batch, generator=generator, device=device) < p
