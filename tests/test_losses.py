"""Training objectives against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from worldloop.distill.stages import losses
from worldloop.models.sampling import add_noise, shift_sigma


def test_add_noise_interpolates_per_frame() -> None:
    x0 = torch.ones(1, 2, 1, 1, 1)  # (B, F, C, h, w)
    noise = torch.full_like(x0, 3.0)
    sigma = torch.tensor([[0.0, 0.25]])
    xt = add_noise(x0, noise, sigma)
    # frame 0 is clean; frame 1: 0.75·1 + 0.25·3 = 1.5
    assert xt.flatten().tolist() == [1.0, 1.5]
    with pytest.raises(ValueError):
        add_noise(x0, noise, torch.zeros(1, 3))


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
    xt = add_noise(x0, noise, sigma)
    v = losses.velocity_target(x0, noise)
    recovered = xt - sigma.view(2, 3, 1, 1, 1) * v  # x0 = x_σ − σ·v
    assert torch.allclose(recovered, x0, atol=1e-6)


def test_shift_and_sigma_sampling() -> None:
    s = torch.tensor([0.0, 0.5, 1.0])
    assert shift_sigma(s, 3.0).tolist() == pytest.approx([0.0, 0.75, 1.0])  # 1.5 / 2 = 0.75
    assert torch.equal(shift_sigma(s, 1.0), s)
    assert not hasattr(losses, "shift_sigma")  # one shift, the sampler's (models.sampling)
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


def _clip(*values: float) -> torch.Tensor:
    """Per-sample scalars → (B, F=1, C=1, h=1, w=1)."""
    return torch.tensor(values).view(-1, 1, 1, 1, 1)


def test_ode_step_hand_computed_and_exact_on_straight_paths() -> None:
    x, x0 = _clip(3.0, 3.0), _clip(1.0, 1.0)
    # v = (3 − 1) / 0.5 = 4; Euler: 3 + (0.25 − 0.5)·4 = 2. To σ' = 0 the step lands on x0.
    out = losses.ode_step(x, x0, torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.0]))
    assert out.flatten().tolist() == [2.0, 1.0]
    g = torch.Generator().manual_seed(0)
    clean, eps = torch.randn(2, 3, 4, 2, 2, generator=g), torch.randn(2, 3, 4, 2, 2, generator=g)
    sigma, nxt = torch.tensor([0.9, 0.6]), torch.tensor([0.7, 0.1])
    stepped = losses.ode_step(add_noise(clean, eps, sigma), clean, sigma, nxt)
    assert torch.allclose(stepped, add_noise(clean, eps, nxt), atol=1e-6)


def test_consistency_loss_hand_computed_with_the_boundary() -> None:
    student = _clip(1.0, 2.0).requires_grad_()
    ema = _clip(0.5, 7.0).requires_grad_()
    x_next = _clip(5.0, 4.0)
    # sample 0 (σ' = 0.5) targets the EMA's 0.5; sample 1 (σ' = 0) the teacher's step result 4.
    loss = losses.consistency_loss(student, ema, x_next, torch.tensor([0.5, 0.0]))
    assert loss.item() == pytest.approx((0.5**2 + 2.0**2) / 2)
    loss.backward()
    assert student.grad.flatten().tolist() == pytest.approx([0.5, -2.0])  # 2·(s − t) / 2
    assert ema.grad is None  # the target is a stop-gradient


def test_dmd_gradient_and_generator_loss_hand_computed() -> None:
    x = torch.tensor([[1.0, 3.0], [2.0, 2.0]]).view(2, 1, 1, 1, 2).requires_grad_()
    real = torch.tensor([[0.0, 1.0], [2.0, 1.0]]).view(2, 1, 1, 1, 2)
    fake = torch.tensor([[1.0, 1.0], [0.0, 3.0]]).view(2, 1, 1, 1, 2)
    # normalisers mean|x − real|: sample 0 (1 + 2) / 2 = 1.5, sample 1 (0 + 1) / 2 = 0.5
    # gradients (fake − real) / normaliser: [1, 0] / 1.5 = [2/3, 0], [−2, 2] / 0.5 = [−4, 4]
    grad = losses.dmd_gradient(x, fake, real)
    assert grad.flatten().tolist() == pytest.approx([2 / 3, 0.0, -4.0, 4.0])
    loss = losses.dmd_generator_loss(x, fake, real)
    assert loss.item() == pytest.approx(0.5 * ((2 / 3) ** 2 + 16 + 16) / 4)
    loss.backward()
    assert x.grad.flatten().tolist() == pytest.approx([2 / 3 / 4, 0.0, -1.0, 1.0])  # g / numel
    same = losses.dmd_generator_loss(x, real, real)
    assert same.item() == 0.0  # fake score = real score: nothing to match


def test_critic_loss_is_flow_matching_on_detached_samples() -> None:
    generated = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1, 1).requires_grad_()
    noise = torch.tensor([0.5, 2.0]).view(1, 2, 1, 1, 1)
    v_pred = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1, 1).requires_grad_()
    loss = losses.critic_loss(v_pred, generated, noise)
    assert loss.item() == pytest.approx(2.125)  # targets [-0.5, 3]: squared errors [0.25, 4]
    loss.backward()
    assert generated.grad is None and v_pred.grad.flatten().tolist() == pytest.approx([0.5, -2.0])
