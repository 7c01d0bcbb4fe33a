"""Counter-based random numbers: a pure function of (seed, counters), vectorised in torch.

Every random choice of the built-in world (maze, rooms, lights, textures, the explorer) is drawn as
``hash(seed, purpose, index, ...)`` instead of from a shared generator, so world *i* of a batch depends on its
own seed only — not on the batch size, the order of worlds or the device. The arithmetic is exact 32-bit
integer math held in int64 tensors (products are split into 16-bit halves so nothing overflows), hence CPU and
CUDA give identical bits.
"""

from __future__ import annotations

import torch

_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2³² for x in [0, 2³²) without int64 overflow."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + ((hi * (c & 0xFFFF)) << 16)) & _MASK


def _mix(x: torch.Tensor) -> torch.Tensor:
    # An xorshift-multiply finaliser: every input bit affects every output bit.
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash32(seed: torch.Tensor, *counters: torch.Tensor | int) -> torch.Tensor:
    """Hash a seed tensor and any number of broadcastable counters to int64 values in [0, 2³²)."""
    h = _mix((torch.as_tensor(seed, dtype=torch.long) & _MASK) ^ _GOLDEN)
    for c in counters:
        c = torch.as_tensor(c, dtype=torch.long, device=h.device) & _MASK
        h = _mix((h + _mul32(c, _GOLDEN) + 0x632BE5AB) & _MASK)
    return h


def uniform(seed: torch.Tensor, *counters: torch.Tensor | int) -> torch.Tensor:
    """Float32 values in [0, 1), exactly representable (24 random bits)."""
    return (hash32(seed, *counters) >> 8).float() * (1.0 / (1 << 24))


def randint(seed: torch.Tensor, high: int | torch.Tensor, *counters: torch.Tensor | int) -> torch.Tensor:
    """Integers in [0, high) (``high`` may be a tensor broadcastable to the result)."""
    return hash32(seed, *counters) % torch.as_tensor(high, dtype=torch.long, device=seed.device)
