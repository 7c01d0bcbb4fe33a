"""The cached rollout as a check: a clip run frame by frame against a ``KVCache``, to compare with the DiT's
full teacher-forcing forward over the same clip (they must agree within rounding; ``worldloop gpu-check``
measures it on CUDA under flex-attention, and tests/test_dit.py on the CPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worldloop.models.config import ModelConfig
from worldloop.models.dit import DiT
from worldloop.models.kv_cache import KVCache, PromptKV


@torch.no_grad()
def cached_rollout(dit: DiT, config: ModelConfig, noisy: torch.Tensor, sigma: torch.Tensor,
                   keys: torch.Tensor, clean: torch.Tensor, prompt: PromptKV, *, fused: bool = False,
                   slots: Sequence[int] | None = None, dtype: torch.dtype = torch.float32, start: int = 0
                   ) -> torch.Tensor:
    """Velocities (B, F, C, h, w) of ``noisy`` frames at σ (B, F), each against the cache of the clean
    frames before it. ``fused``: clean frame i − 1 rides along with noisy frame i in one forward (what
    ``WorldModel`` does); else each clean frame gets a cache pass of its own after its noisy frame. ``slots``:
    the cache slots used (default 0…B−1, in a cache of max(slots) + 1). ``start``: the first frame's index
    (a later part of a stream; frames before ``sink`` are sink frames)."""
    b, f = noisy.shape[:2]
    device = noisy.device
    slots = list(range(b)) if slots is None else list(slots)
    cache = KVCache.for_model(config, max_sessions=max(slots) + 1, device=device, dtype=dtype)
    cache.set_prompt(slots, prompt)
    zeros, outs = torch.zeros(b, 1, device=device), []
    for i in range(f):
        frame = torch.full((b, 1), start + i, device=device)
        view = cache.view(slots)
        if fused and i > 0:  # [clean i − 1 | noisy i]: the cache pass fused into the next forward
            prev, prev_keys = clean[:, i - 1: i], keys[:, i - 1: i]
            x = torch.cat([prev, noisy[:, i: i + 1]], 1)
            s = torch.cat([zeros, sigma[:, i: i + 1]], 1)
            out = dit.forward_cached(x, s, keys[:, i - 1: i + 1], torch.cat([frame - 1, frame], 1), 1,
                                     view.prompt, view)
            cache.append(slots, frame - 1, out.k, out.v_cache, prev, prev_keys, zeros)
        else:
            out = dit.forward_cached(noisy[:, i: i + 1], sigma[:, i: i + 1], keys[:, i: i + 1], frame, 0,
                                     view.prompt, view)
        outs.append(out.v)
        if not fused:
            view = cache.view(slots)
            ctx = dit.forward_cached(clean[:, i: i + 1], zeros, keys[:, i: i + 1], frame, 1, view.prompt,
                                     view)
            cache.append(slots, frame, ctx.k, ctx.v_cache, clean[:, i: i + 1], keys[:, i: i + 1], zeros)
    return torch.cat(outs, 1)
