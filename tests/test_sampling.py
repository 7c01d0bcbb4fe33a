"""Sampling functions against hand-computed values and an exact fake model."""

from __future__ import annotations

import pytest
import torch

from worldloop.models.sampling import (
    SampleEvent,
    add_noise,
    denoise,
    randn_rows,
    sample_frame,
    shift_sigma,
    sigma_grid,
    v_from_x0_eps,
    x0_from_v,
)


def test_sigma_grid_values() -> None:
    assert sigma_grid(1, 5.0).tolist() == [1.0, 0.0]
    assert torch.allclose(sigma_grid(2, 5.0), torch.tensor([1.0, 5 / 6, 0.0]))  # 5·0.5 / (1 + 4·0.5)
    # shift 3, 4 steps: σ = 1, .75, .5, .25 → 3σ/(1+2σ) = 1, 0.9, 0.75, 0.5
    assert torch.allclose(sigma_grid(4, 3.0), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    assert torch.allclose(sigma_grid(3, 1.0), torch.tensor([1.0, 2 / 3, 1 / 3, 0.0]))
    assert shift_sigma(0.2, 4.0).item() == pytest.approx(0.8 / 1.6)
    with pytest.raises(ValueError):
        sigma_grid(0, 3.0)


def test_conversions_hand_values() -> None:
    x0, eps, sigma = torch.tensor([[2.0]]), torch.tensor([[-1.0]]), torch.tensor([0.25])
    x = add_noise(x0, eps, sigma)
    assert x.item() == pytest.approx(0.75 * 2 - 0.25)  # 1.25
    v = v_from_x0_eps(x0, eps)
    assert v.item() == -3.0
    assert x0_from_v(x, v, sigma).item() == pytest.approx(1.25 + 0.75)  # = x0
    rows = add_noise(torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([0.0, 1.0]))
    assert rows.tolist() == [[1, 1, 1], [0, 0, 0]]  # σ applies per batch row


def oracle(x0: torch.Tensor, calls: list) -> callable:
    """A model that knows x0: v = (x - x0)/σ, so every denoise step predicts x0 exactly."""

    def model_fn(x: torch.Tensor, sigma: torch.Tensor, cond: object, cache: object) -> torch.Tensor:
        calls.append((sigma.clone(), cond))
        return (x - x0) / sigma.view(-1, 1)

    return model_fn


def test_denoise_with_guidance() -> None:
    x, sigma = torch.tensor([[1.0]]), torch.tensor([0.5])

    def model_fn(x: torch.Tensor, sigma: torch.Tensor, cond: float, cache: object) -> torch.Tensor:
        return torch.full_like(x, cond)

    assert denoise(model_fn, x, sigma, 2.0, None).item() == pytest.approx(1 - 0.5 * 2)
    # v = v_null + 3·(v_cond - v_null) = 0.5 + 3·1.5 = 5 → x0 = 1 - 0.5·5
    assert denoise(model_fn, x, sigma, 2.0, None, guidance=3.0, null_cond=0.5).item() == pytest.approx(-1.5)
    with pytest.raises(ValueError, match="null_cond"):
        denoise(model_fn, x, sigma, 2.0, None, guidance=3.0)


def test_sample_frame_renoises_between_steps_and_rows_sample_as_alone() -> None:
    x0 = torch.tensor([[3.0], [-2.0]])
    calls: list = []
    events: list[SampleEvent] = []
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    sigmas = torch.stack([sigma_grid(2, 5.0), torch.tensor([1.0, 0.0, 0.0])])  # row 1 takes one step
    out = sample_frame(oracle(x0, calls), torch.ones(2, 1), sigmas, "c", None, gens, callback=events.append)
    assert torch.allclose(out, x0)
    assert len(calls) == 2 and [e.step for e in events] == [0, 1]
    assert torch.allclose(calls[1][0], torch.tensor([5 / 6, 0.0]))
    # Re-noising drew exactly one sample from row 0's generator and none from row 1's.
    assert torch.equal(gens[1].get_state(), torch.Generator().manual_seed(2).get_state())
    expected = torch.Generator().manual_seed(1)
    torch.randn((1,), generator=expected)
    assert torch.equal(gens[0].get_state(), expected.get_state())


def test_randn_rows_is_per_generator() -> None:
    a = randn_rows([torch.Generator().manual_seed(5)], (4,), "cpu")
    b = randn_rows([torch.Generator().manual_seed(9), torch.Generator().manual_seed(5)], (4,), "cpu")
    assert torch.equal(a[0], b[1])
    zero = randn_rows([torch.Generator().manual_seed(5)] * 2, (4,), "cpu", rows=[1])
    assert zero[0].abs().sum() == 0
