"""Image metrics for evaluation: pure functions on float image batches.

Every function takes images as float tensors ``(B, 3, H, W)`` with values in ``[0, data_range]`` and returns
one value per image, so callers can average, bin over time or compare against a baseline as they like.
``from_uint8`` converts the ``(B, H, W, 3)`` uint8 frames that the engine and ``WorldModel.next_frame``
produce.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

# Rec. 601 luma weights (the ones SSIM and most sharpness measures are usually quoted with).
_LUMA = (0.299, 0.587, 0.114)


def from_uint8(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` (numpy or torch) → float ``(B, 3, H, W)`` in ``[0, 1]``."""
    t = torch.as_tensor(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (B, H, W, 3), got {tuple(t.shape)} {t.dtype}")
    return t.permute(0, 3, 1, 2).float() / 255.0


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image, ``(B,)``."""
    _check_pair(a, b)
    return (a.double() - b.double()).pow(2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image ``(B,)``: ``10·log10(R² / MSE)``; ``inf`` if identical."""
    err = mse(a, b)
    return (10.0 * torch.log10(data_range**2 / err)).float()  # err == 0 → +inf


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size), sums to 1


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image, ``(B,)`` (Wang et al. 2004, Gaussian 11×11 window, σ=1.5).

    Computed per channel over valid window positions (no padding) and averaged; the window shrinks to the
    image size for images smaller than ``window``. Identical images give exactly 1.
    """
    _check_pair(a, b)
    size = min(window, a.shape[-2], a.shape[-1])
    c = a.shape[1]
    x, y = a.double(), b.double()
    kernel = _gaussian_window(size, sigma, torch.float64).to(x.device).expand(c, 1, size, size)
    blur = lambda t: F.conv2d(t, kernel, groups=c)
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).float()


def luminance(x: torch.Tensor) -> torch.Tensor:
    """RGB ``(B, 3, H, W)`` → luma ``(B, 1, H, W)``."""
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def sharpness(x: torch.Tensor) -> torch.Tensor:
    """Variance of the Laplacian of the luma per image, ``(B,)``: falls as frames blur."""
    lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    response = F.conv2d(luminance(x.double()), lap.to(x.device).view(1, 1, 3, 3))
    return response.flatten(1).var(1, unbiased=False).float()


class ColourStats(NamedTuple):
    """Per-image colour statistics: channel means and deviations ``(B, 3)``, mean saturation ``(B,)``."""

    mean: torch.Tensor
    std: torch.Tensor
    saturation: torch.Tensor


def colour_stats(x: torch.Tensor) -> ColourStats:
    """Channel mean/std and mean HSV saturation ``(max − min) / max`` (0 where the pixel is black)."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W), got {tuple(x.shape)}")
    flat = x.double().flatten(2)  # (B, 3, H·W)
    top, bottom = x.double().amax(1), x.double().amin(1)
    sat = torch.where(top > 0, (top - bottom) / top.clamp_min(1e-12), torch.zeros_like(top))
    std = flat.std(2, unbiased=False)
    return ColourStats(flat.mean(2).float(), std.float(), sat.flatten(1).mean(1).float())


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"expected two image batches of the same shape (B, C, H, W), got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
