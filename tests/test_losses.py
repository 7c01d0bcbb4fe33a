"""Training objectives against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from distill import losses


def test_add_noise_interpolates_per_frame() -> None:
    x0 = torch.ones(1, 2, 1, 1, 1)  # (B, F, C, h, w)
    noise = torch.full_like(x0, 3.0)
    sigma = torch.tensor([[0.0, 0.25]])
    xt = losses.add_noise(x0, noise, sigma)
    # frame 0 is clean; frame 1: 0.75·1 + 0.25·3 = 1.5
    assert xt.flatten().tolist() == [1.0, 1.5]
    with pytest.raises(ValueError):
        losses.add_noise(x0, noise, torch.zeros(1, 3))


def test_flow_matching_loss_hand_computed() -> None:
    x0 = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1, 1)
    noise = torch.tensor([0.5, 2.0]).view(1, 2, 1, 1, 1)
    v_pred = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1, 1)
    # targets ε − x0 = [-0.5, 3.0]; squared errors [0.25, 4.0]
    assert losses.flow_matching_loss(v_pred, x0, noise).item() == pytest.approx(2.125)
    weighted = losses.flow_matching_loss(v_pred, x0, noise, frame_weight=torch.tensor([[1.0, 3.0]]))
    assert weighted.item() == pytest.approx((0.25 + 3 * 4.0) / 4)
    exact = losses.velocity_target(x0, noise)
    assert losses.flow_matching_loss(exact, x0, noise).item() == 0.0


def test_exact_velocity_recovers_clean_frames() -> None:
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 2, 2, generator=g), torch.randn(2, 3, 4, 2, 2, generator=g)
    sigma = torch.rand(2, 3, generator=g)
    xt = losses.add_noise(x0, noise, sigma)
    v = losses.velocity_target(x0, noise)
    recovered = xt - sigma.view(2, 3, 1, 1, 1) * v  # x0 = x_σ − σ·v
    assert torch.allclose(recovered, x0, atol=1e-6)


def test_shift_and_sigma_sampling() -> None:
    s = torch.tensor([0.0, 0.5, 1.0])
    assert losses.shift_sigma(s, 3.0).tolist() == pytest.approx([0.0, 0.75, 1.0])  # 1.5 / 2 = 0.75
    assert torch.equal(losses.shift_sigma(s, 1.0), s)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = losses.sample_sigmas((4000,), shift=3.0, generator=g1)
    assert torch.equal(a, losses.sample_sigmas((4000,), shift=3.0, generator=g2))
    assert 0.0 < a.min() and a.max() < 1.0
    unshifted = losses.sample_sigmas((4000,), generator=torch.Generator().manual_seed(5))
    assert unshifted.median().item() == pytest.approx(0.5, abs=0.03)
    assert a.median().item() == pytest.approx(0.75, abs=0.03)  # the shift maps the median 0.5 → 0.75


def test_dropout_mask_rate() -> None:
    mask = losses.dropout_mask(10_000, 0.1, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and 0.08 < mask.float().mean().item() < 0.12
    assert not losses.dropout_mask(8, 0.0).any() and losses.dropout_mask(8, 1.0).all()
    with pytest.raises(ValueError):
        losses.dropout_mask(8, 1.5)
