"""The patch critic of the adversarial terms (``train vae --adversarial-weight``, ``distill truth
--adversarial-weight``).

A ``models.vae.PatchDiscriminator`` learns with the hinge loss to tell engine frames from generated ones;
the generator (the decoder in ``train vae``, the DiT through the frozen decoder in ``distill truth``) gets
−D(fake) scaled by the adaptive weight of Esser et al. 2021: ‖∇L_rec‖ / ‖∇L_adv‖ at the generator's last
layer, times the option, so the term stays in scale with the reconstruction loss whatever its magnitude.
Regression alone draws the mean of the frames it cannot tell apart — a blur; the critic charges for it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from worldloop.distill.stages.run import RunDir
from worldloop.distill.stages.runtime import Distributed
from worldloop.models.vae import PatchDiscriminator, discriminator_hinge_loss, generator_adversarial_loss

CRITIC_OPTIMIZER = "critic_optimizer.pt"  # the critic's optimizer state, beside checkpoint.pt


class Critic:
    """The patch critic, its optimizer and the generator's adversarial term (see the module docstring)."""

    def __init__(self, last_layer: nn.Parameter, weight: float, channels: int, lr: float,
                 ddp: Distributed, seed: int = 0) -> None:
        if weight <= 0 or channels < 1:
            raise ValueError("the critic needs an adversarial weight > 0 and >= 1 channel")
        with torch.random.fork_rng(devices=[]):  # its own seed: a run and its resumed twin start alike
            torch.manual_seed(seed)
            self.net = PatchDiscriminator(channels).to(ddp.device)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=lr, betas=(0.5, 0.9), weight_decay=0.0)
        self.weight, self.ddp, self.last_layer = weight, ddp, last_layer

    def generator_term(self, recon_loss: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, float]:
        """λ·(−D(fake)) with the adaptive weight λ; the critic's own weights get no gradient from it."""
        self.net.requires_grad_(False)
        adv = generator_adversarial_loss(self.net(fake.float()))
        self.net.requires_grad_(True)
        g_rec = torch.autograd.grad(recon_loss, self.last_layer, retain_graph=True)[0]
        g_adv = torch.autograd.grad(adv, self.last_layer, retain_graph=True)[0]
        weight = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach() * self.weight
        if self.ddp.enabled:  # one weight on every rank
            dist.all_reduce(weight)
            weight = weight / self.ddp.world_size
        return weight * adv, float(weight)

    def train_step(self, real: torch.Tensor, fake: torch.Tensor, lr: float) -> float:
        """One hinge-loss update of the critic on engine frames vs (detached) generated frames."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss = discriminator_hinge_loss(self.net(real.float()), self.net(fake.detach().float()))
        loss.backward()
        if self.ddp.enabled:
            for p in self.net.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.ddp.world_size
        self.optimizer.step()
        return float(loss.detach())

    def save(self, run: RunDir) -> None:
        """The optimizer's state beside ``checkpoint.pt`` (the network is one of the stage's modules)."""
        torch.save(self.optimizer.state_dict(), run.root / CRITIC_OPTIMIZER)

    def load(self, run: RunDir) -> None:
        self.optimizer.load_state_dict(torch.load(run.root / CRITIC_OPTIMIZER, weights_only=True))
