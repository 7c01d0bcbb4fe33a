"""The player's keys: a multi-hot set of held keys, shared by the world, the model and every client.

A key state is a bitmask ``int`` (bit i set ⇔ ``KEYS[i]`` held) or, inside the model, a float multi-hot
vector of length ``len(KEYS)``. No key held is the no-op.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

KEYS: tuple[str, ...] = ("forward", "back", "left", "right", "turn_left", "turn_right")
NUM_KEYS = len(KEYS)
ALL_KEYS_MASK = (1 << NUM_KEYS) - 1

# Single-letter aliases used by key scripts and the browser (WASD for moving, Q/E or arrows for turning).
ALIASES: dict[str, str] = {
    "w": "forward", "s": "back", "a": "left", "d": "right", "q": "turn_left", "e": "turn_right",
    "up": "forward", "down": "back", "arrowup": "forward", "arrowdown": "back",
    "arrowleft": "turn_left", "arrowright": "turn_right",
}


def parse_keys(spec: str | Iterable[str] | int) -> int:
    """Turn ``"forward+turn_left"``, ``"w+a"``, ``["w", "q"]``, ``""``/``"none"`` or a bitmask into a bitmask.

    Raises ``ValueError`` naming the bad key.
    """
    if isinstance(spec, bool):
        raise ValueError(f"key state must be a bitmask or key names, got {spec!r}")
    if isinstance(spec, int):
        if not 0 <= spec <= ALL_KEYS_MASK:
            raise ValueError(f"key bitmask {spec} out of range 0..{ALL_KEYS_MASK}")
        return spec
    names = [s for s in spec.replace(",", "+").split("+")] if isinstance(spec, str) else list(spec)
    mask = 0
    for raw in names:
        name = str(raw).strip().lower()
        if name in ("", "none", "noop", "no-op"):
            continue
        name = ALIASES.get(name, name)
        if name not in KEYS:
            known = ", ".join(KEYS)
            raise ValueError(f"unknown key {raw!r}; known keys: {known} (aliases: WASD, Q/E, arrows)")
        mask |= 1 << KEYS.index(name)
    return mask


def key_names(mask: int) -> list[str]:
    return [k for i, k in enumerate(KEYS) if mask >> i & 1]


def keys_to_tensor(
    masks: Iterable[int] | torch.Tensor, device: torch.device | str | None = None
) -> torch.Tensor:
    """Bitmasks (any shape) → float multi-hot (..., NUM_KEYS)."""
    values = masks if isinstance(masks, torch.Tensor) else list(masks)
    m = torch.as_tensor(values, dtype=torch.long, device=device)
    bits = torch.arange(NUM_KEYS, device=m.device)
    return ((m.unsqueeze(-1) >> bits) & 1).float()


def tensor_to_keys(multi_hot: torch.Tensor) -> torch.Tensor:
    """Multi-hot (..., NUM_KEYS) with values in {0,1} (or probabilities, thresholded at 0.5) → bitmasks."""
    bits = (multi_hot > 0.5).long()
    return (bits << torch.arange(NUM_KEYS, device=bits.device)).sum(-1)
