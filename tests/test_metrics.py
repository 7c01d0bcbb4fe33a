"""Image metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from worldloop.distill.eval import metrics


def _rand(seed: int, shape: tuple[int, ...] = (2, 3, 16, 16)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_identical_images_give_infinite_psnr_and_unit_ssim() -> None:
    x = _rand(0)
    assert torch.isinf(metrics.psnr(x, x)).all()
    assert torch.equal(metrics.ssim(x, x), torch.ones(2))


def test_psnr_of_known_mse() -> None:
    a = torch.zeros(1, 3, 8, 8)
    b = torch.full((1, 3, 8, 8), 0.1)  # MSE = 0.01 → 10·log10(1 / 0.01) = 20 dB
    assert metrics.psnr(a, b).item() == pytest.approx(20.0, abs=1e-5)
    # the same error on a 0..255 scale: MSE = 25.5² → 20 dB too
    assert metrics.psnr(a * 255, b * 255, data_range=255.0).item() == pytest.approx(20.0, abs=1e-4)
    assert metrics.mse(a, b).item() == pytest.approx(0.01)


def test_ssim_of_constant_images_is_the_luminance_term() -> None:
    # flat images have no variance or covariance, so SSIM = (2·μx·μy + C1) / (μx² + μy² + C1)
    a, b = torch.full((1, 3, 12, 12), 0.5), torch.full((1, 3, 12, 12), 0.25)
    c1 = 0.01**2
    expected = (2 * 0.5 * 0.25 + c1) / (0.5**2 + 0.25**2 + c1)
    assert metrics.ssim(a, b).item() == pytest.approx(expected, rel=1e-6)


def test_ssim_orders_by_degradation_and_handles_small_images() -> None:
    x = _rand(1, (1, 3, 6, 6))  # smaller than the 11×11 window
    slight = (x + 0.02 * _rand(2, x.shape)).clamp(0, 1)
    heavy = _rand(3, x.shape)
    assert 1.0 > metrics.ssim(x, slight).item() > metrics.ssim(x, heavy).item()


def test_sharpness_is_zero_for_flat_and_known_for_a_checkerboard() -> None:
    assert metrics.sharpness(torch.full((1, 3, 8, 8), 0.7)).item() == pytest.approx(0.0, abs=1e-12)
    board = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2).float()
    grey = board.expand(1, 3, 8, 8)  # luma = board; Laplacian = ±4 everywhere inside → variance 16
    assert metrics.sharpness(grey).item() == pytest.approx(16.0, rel=1e-5)
    blurred = torch.nn.functional.avg_pool2d(grey, 3, 1, 1)
    assert metrics.sharpness(blurred).item() < 16.0


def test_colour_stats() -> None:
    img = torch.zeros(1, 3, 2, 2)
    img[0, 0] = 1.0  # pure red everywhere
    img[0, 1, 0, 0] = 1.0  # one yellow pixel
    stats = metrics.colour_stats(img)
    assert stats.mean[0].tolist() == pytest.approx([1.0, 0.25, 0.0])
    assert stats.std[0].tolist() == pytest.approx([0.0, math.sqrt(0.25 * 0.75), 0.0])
    assert stats.saturation.item() == pytest.approx(1.0)
    assert metrics.colour_stats(torch.full((1, 3, 2, 2), 0.5)).saturation.item() == 0.0


def test_from_uint8_and_shape_checks() -> None:
    frames = np.zeros((2, 4, 5, 3), dtype=np.uint8)
    frames[..., 2] = 255
    x = metrics.from_uint8(frames)
    assert x.shape == (2, 3, 4, 5) and x[:, 2].eq(1).all() and x[:, :2].eq(0).all()
    with pytest.raises(ValueError):
        metrics.from_uint8(frames.astype(np.float32))
    with pytest.raises(ValueError):
        metrics.psnr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))
