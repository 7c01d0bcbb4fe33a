"""Rectified-flow sampling as pure functions (no scheduler objects, no state shared between sessions).

Forward process: x_σ = (1 - σ)·x0 + σ·ε, σ ∈ [0, 1]. The network predicts the velocity v = ε - x0, so x0 = x_σ
- σ·v. Timestep shift (Esser et al., "Scaling Rectified Flow Transformers", 2024): σ' = sσ / (1 + (s-1)σ).
Few-step students sample on the shifted grid and re-noise each x0 prediction with fresh noise to the next σ.

Every function takes ``model_fn(x, sigma, cond, cache) -> v`` with x (B, …) and σ (B,); ``cond`` and ``cache``
are passed through untouched, so the same functions serve the cached rollout and any full-clip model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor, Any, Any], Tensor]


@dataclass
class SampleEvent:
    """Passed to a sampling callback after each denoising step: the step, its σ (B,) and the x0 prediction."""

    step: int
    sigma: Tensor
    x0: Tensor


def shift_sigma(sigma: Tensor | float, shift: float) -> Tensor:
    """σ' = sσ / (1 + (s-1)σ): more of the grid at high noise for s > 1."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return (shift * sigma / (1 + (shift - 1) * sigma)).float()


def sigma_grid(steps: int, shift: float) -> Tensor:
    """``steps`` + 1 noise levels from 1 down to 0: the uniform grid 1, 1 - 1/n, …, 0, shifted.

    With shift 5: 1 step → [1, 0]; 2 steps → [1, 0.8333, 0].
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def _per_row(values: Tensor, x: Tensor) -> Tensor:
    """(B,) → (B, 1, …) broadcastable against x (bool stays bool, numbers take x's dtype)."""
    values = values if values.dtype == torch.bool else values.to(x.dtype)
    return values.to(x.device).reshape(-1, *([1] * (x.dim() - 1)))


def x0_from_v(x: Tensor, v: Tensor, sigma: Tensor) -> Tensor:
    """x0 = x_σ - σ·v, σ per batch row."""
    return x - _per_row(sigma, x) * v


def v_from_x0_eps(x0: Tensor, eps: Tensor) -> Tensor:
    """The velocity target v = ε - x0."""
    return eps - x0


def add_noise(x0: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    """x_σ = (1 - σ)·x0 + σ·ε, σ per batch row (B,) or per frame (B, F) of x0 (B, [F,] C, h, w)."""
    if x0.shape[: sigma.dim()] != sigma.shape:
        raise ValueError(f"noise levels {tuple(sigma.shape)} do not match the leading dims of "
                         f"{tuple(x0.shape)}")
    s = sigma.to(device=x0.device, dtype=x0.dtype).reshape(*sigma.shape, *([1] * (x0.dim() - sigma.dim())))
    return (1 - s) * x0 + s * eps


def randn_rows(generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device | str,
               rows: Sequence[int] | None = None) -> Tensor:
    """Standard normal noise (B, *shape), row i drawn from ``generators[i]`` (CPU generators, so a session's
    noise does not depend on the device or on which other sessions share its batch). Rows not in ``rows`` are
    zero and draw nothing."""
    wanted = set(range(len(generators)) if rows is None else rows)
    out = [torch.randn(tuple(shape), generator=g) if i in wanted else torch.zeros(tuple(shape))
           for i, g in enumerate(generators)]
    return torch.stack(out).to(device)


def denoise(model_fn: ModelFn, x: Tensor, sigma: Tensor, cond: Any, cache: Any, guidance: float = 1.0,
            null_cond: Any = None) -> Tensor:
    """One network evaluation → x0. With ``guidance`` ≠ 1, classifier-free guidance (Ho & Salimans, 2022):
    v = v_null + g·(v_cond - v_null); the conditional call runs first."""
    v = model_fn(x, sigma, cond, cache)
    if guidance != 1.0:
        if null_cond is None:
            raise ValueError("classifier-free guidance needs null_cond")
        v_null = model_fn(x, sigma, null_cond, cache)
        v = v_null + guidance * (v - v_null)
    return x0_from_v(x, v, sigma)


def sample_frame(model_fn: ModelFn, noise: Tensor, sigmas: Tensor, cond: Any, cache: Any,
                 generator: Sequence[torch.Generator], *, guidance: float = 1.0, null_cond: Any = None,
                 callback: Callable[[SampleEvent], None] | None = None) -> Tensor:
    """Sample x0 for a batch from ``noise`` (B, …) on the grid ``sigmas``: (K+1,) shared or (B, K+1) per row.

    Step k denoises at σ_k and re-noises the x0 prediction with fresh noise from each row's generator to
    σ_{k+1} (1. denoise, 2. stop if σ_{k+1} = 0, 3. x ← (1-σ_{k+1})·x0 + σ_{k+1}·ε). A row whose grid is
    shorter ends with zeros; it is left unchanged (and draws no noise) once its σ reaches 0, so rows sample
    exactly as alone.
    """
    b = noise.shape[0]
    sigmas = sigmas.to(torch.float32)
    sigmas = sigmas.expand(b, -1) if sigmas.dim() == 1 else sigmas
    x, x0 = noise, noise
    for k in range(sigmas.shape[1] - 1):
        active = sigmas[:, k] > 0
        if not bool(active.any()):
            break
        sigma = sigmas[:, k].to(noise.device)
        new_x0 = denoise(model_fn, x, sigma, cond, cache, guidance, null_cond)
        x0 = torch.where(_per_row(active, x0), new_x0, x0)
        if callback is not None:
            callback(SampleEvent(k, sigma, x0))
        nxt = sigmas[:, k + 1]
        renoise = [i for i in range(b) if active[i] and nxt[i] > 0]
        if renoise:
            eps = randn_rows(generator, noise.shape[1:], noise.device, renoise).to(noise.dtype)
            mask = torch.zeros(b, dtype=torch.bool).index_fill_(0, torch.tensor(renoise), True)
            x = torch.where(_per_row(mask, x), add_noise(x0, eps, nxt), x)
    return x0
