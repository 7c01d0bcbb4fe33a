"""The cached rollout as a check: a clip run frame by frame against a ``KVCache``, to compare with the DiT's
full teacher-forcing forward over the same clip (they must agree within rounding; ``worldloop gpu-check``
measures it on CUDA under flex-attention, and the tests on the CPU).
"""

from __future__ import annotations

import torch

from worldloop.models.config import ModelConfig
from worldloop.models.dit import DiT
from worldloop.models.kv_cache import KVCache, PromptKV


@torch.no_grad()
def cached_rollout(dit: DiT, config: ModelConfig, noisy: torch.Tensor, sigma: torch.Tensor,
                   keys: torch.Tensor, clean: torch.Tensor, prompt: PromptKV) -> torch.Tensor:
    """Velocities (B, F, C, h, w) of ``noisy`` frames at σ (B, F), each step against the cache of the clean
    frames before it; after each noisy frame its clean frame is written as context (unfused cache pass)."""
    b, f = noisy.shape[:2]
    device = noisy.device
    cache = KVCache.for_model(config, max_sessions=b, device=device)
    slots = list(range(b))
    cache.set_prompt(slots, prompt)
    zeros, outs = torch.zeros(b, 1, device=device), []
    for i in range(f):
        frame, frame_keys = torch.full((b, 1), i, device=device), keys[:, i: i + 1]
        view = cache.view(slots)
        outs.append(dit.forward_cached(noisy[:, i: i + 1], sigma[:, i: i + 1], frame_keys, frame, 0,
                                       view.prompt, view).v)
        ctx = dit.forward_cached(clean[:, i: i + 1], zeros, frame_keys, frame, 1, view.prompt, view)
        cache.append(slots, frame, ctx.k, ctx.v_cache, clean[:, i: i + 1], frame_keys, zeros)
    return torch.cat(outs, 1)
