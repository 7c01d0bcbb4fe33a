"""Training objectives: pure functions of tensors, each tested against hand-computed values.

Rectified flow (DESIGN §5): ``x_σ = (1 − σ)·x0 + σ·ε`` and the network predicts the velocity ``v = ε − x0``.
The teacher trains every frame of a clip at its own noise level σ (diffusion forcing / teacher forcing), so
σ has shape ``(B, F)`` and broadcasts over each frame's latent ``(C, h, w)``.

Noise levels are drawn logit-normal (Esser et al. 2024, "Scaling Rectified Flow Transformers", §3.1) and
then shifted with the same timestep shift the sampler uses (``σ' = sσ / (1 + (s − 1)σ)``), which moves
training mass towards the high noise levels a few-step sampler visits.

Distillation (DESIGN §6.2–3) adds three objectives and the one ODE step they need:

- consistency distillation: ``ode_step`` moves x from σ_n to σ_{n+1} along the teacher's x0 prediction (the
  rectified-flow Euler/DDIM step); ``consistency_loss`` regresses the student's x0 at σ_n onto the EMA
  student's x0 at σ_{n+1} (at σ_{n+1} = 0, onto the teacher's step result itself: the boundary condition);
- distribution matching (Yin et al. 2024, "One-step Diffusion with Distribution Matching Distillation"):
  ``dmd_gradient`` is (fake x0 − real x0) divided by the mean |x − real x0| of each sample, and
  ``dmd_generator_loss`` applies it through a stop-gradient MSE target;
- ``critic_loss``: flow matching of the critic (the fake score) on the generator's detached samples.
"""

from __future__ import annotations

import torch

from worldloop.models import sampling


def _per_frame(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """σ of shape (B,) or (B, F) → broadcastable against ``like`` (B, [F,] C, h, w)."""
    if like.shape[: sigma.ndim] != sigma.shape:
        raise ValueError(f"noise levels {tuple(sigma.shape)} do not match the leading dims of "
                         f"{tuple(like.shape)}")
    return sigma.reshape(*sigma.shape, *([1] * (like.ndim - sigma.ndim))).to(like.dtype)


def sample_sigmas(shape: tuple[int, ...], *, shift: float = 1.0, mean: float = 0.0, std: float = 1.0,
                  generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Logit-normal noise levels ``sigmoid(mean + std·n)``, then shifted; values in (0, 1)."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    n = torch.randn(shape, generator=generator, device=device)
    return sampling.shift_sigma(torch.sigmoid(mean + std * n), shift)


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


def frame_losses(v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                 target: str = "v") -> torch.Tensor:
    """Per-frame mean squared error (B, F) in float32, of the velocity (``target="v"``) or of the clean frame
    it implies (``"x0"``: x̂0 = x_σ − σ·v, so the error is σ·(v − v*) and the loss σ²·‖v − v*‖²)."""
    err = (v_pred.float() - velocity_target(x0.float(), noise.float())).square().flatten(2).mean(-1)
    if target == "v":
        return err
    if target == "x0":
        return err * sigma.float().square()
    raise ValueError(f"unknown loss target {target!r} (v or x0)")


def key_change_split(frame_loss: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-frame loss (B, F) over frames whose keys (B, F, K) differ from the frame before, and over
    frames whose keys stayed the same (the first frame of a clip has no before and counts in neither);
    NaN where no frame falls in a group. Where the model ignores the keys and extrapolates motion, the first
    group's loss stays above the second's."""
    changed = (keys[:, 1:] != keys[:, :-1]).any(-1)
    later = frame_loss[:, 1:].detach()

    def mean(mask: torch.Tensor) -> torch.Tensor:
        return later[mask].mean() if bool(mask.any()) else torch.tensor(float("nan"))

    return mean(changed), mean(~changed)


def dropout_mask(batch: int, p: float, *, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool (batch,): True where a sample's condition is dropped (replaced by the null condition)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    return torch.rand(batch, generator=generator, device=device) < p


def ode_step(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
             ) -> torch.Tensor:
    """One rectified-flow ODE step from σ to σ_next along the predicted x0 (σ > 0; per sample or frame).

    With ε̂ = (x − (1 − σ)·x0) / σ the implied noise, x_next = (1 − σ')·x0 + σ'·ε̂ = x0 + (σ'/σ)·(x − x0):
    the Euler step x + (σ' − σ)·v of the velocity v = (x − x0)/σ.
    """
    ratio = _per_frame(sigma_next, x) / _per_frame(sigma, x)
    return x0 + ratio * (x - x0)


def consistency_loss(student_x0: torch.Tensor, ema_x0: torch.Tensor, x_next: torch.Tensor,
                     sigma_next: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the student's x0 and the stop-gradient target, in float32.

    The target is the EMA student's x0 at σ_next, or where σ_next = 0 the teacher's step result ``x_next``
    itself (the consistency function is the identity at σ = 0).
    """
    at_data = _per_frame(sigma_next, x_next) == 0
    target = torch.where(at_data, x_next.float(), ema_x0.float()).detach()
    return (student_x0.float() - target).square().mean()


def dmd_gradient(x: torch.Tensor, fake_x0: torch.Tensor, real_x0: torch.Tensor, eps: float = 1e-6
                 ) -> torch.Tensor:
    """The distribution-matching gradient (fake_x0 − real_x0) / mean|x − real_x0|, normaliser per sample.

    Dividing by the real score's mean error keeps the step size the same across noise levels (DMD eq. 8).
    """
    x, fake_x0, real_x0 = x.detach().float(), fake_x0.detach().float(), real_x0.detach().float()
    normaliser = (x - real_x0).abs().flatten(1).mean(1).clamp_min(eps)  # (B,)
    return (fake_x0 - real_x0) / _per_frame(normaliser, x)


def dmd_generator_loss(x: torch.Tensor, fake_x0: torch.Tensor, real_x0: torch.Tensor, eps: float = 1e-6
                       ) -> torch.Tensor:
    """0.5·mean((x − sg(x − g))²) with g = ``dmd_gradient``: its gradient with respect to x is g / x.numel().

    The value is 0.5·mean(g²), a measure of the remaining mismatch; only its gradient trains the generator.
    """
    grad = dmd_gradient(x, fake_x0, real_x0, eps)
    target = (x.detach().float() - grad).detach()
    return 0.5 * (x.float() - target).square().mean()


def critic_loss(v_pred: torch.Tensor, generated: torch.Tensor, noise: torch.Tensor,
                frame_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Flow matching of the critic on the generator's samples (detached: the critic never moves them)."""
    return flow_matching_loss(v_pred, generated.detach(), noise, frame_weight)
