"""The engine beside the model: ``worldloop rollout --beside-engine``.

A rollout from a world start begins with frames of a fresh built-in world; that world is the truth for what
the model should show next. ``EngineBeside`` keeps it running under the rollout's keys, one engine frame per
model frame, and ``side_by_side`` puts the two into one video frame, [engine | model], with a thin separator.
A prompt switch that names a theme re-themes the engine the way training clips switch (``World.rethemed``:
the same maze at the same pose in the new theme's look); a prompt that names none leaves its look alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from worldloop.app.starts import WorldStart, prompt_theme
from worldloop.streaming.session import StartFrames

if TYPE_CHECKING:
    from worldloop.distill.world.engine import World

PANELS = ("engine", "model")  # left to right
SEPARATOR = 2  # pixels between the panels (before --scale): even, so the frame stays even for H.264
SEPARATOR_COLOUR = (255, 255, 255)


class EngineBeside:
    """The built-in world a rollout started from, stepped by the same keys as the model.

    ``world`` renders at ``scale`` times the model's frame size (the engine's minimum is 64 px); frames are
    area-downsampled to the model's size, as the start frames and the training clips are."""

    def __init__(self, world: World, scale: int) -> None:
        self.world, self.scale = world, scale

    @classmethod
    def start(cls, world_start: WorldStart, prompt: str, seed: int) -> tuple[StartFrames, EngineBeside]:
        """The start frames of a world start and the engine that continues from the last of them."""
        frames, world = world_start.begin(prompt, seed)
        return frames, cls(world, world_start.scale)

    def next_frame(self, keys: int) -> np.ndarray:
        """Apply one frame's held keys (a bitmask) → the engine's frame, uint8 (H, W, 3)."""
        import torch

        from worldloop.distill.data.clips import downsample

        frame = self.world.next_frame(torch.tensor([keys], dtype=torch.long))
        return downsample(frame, self.scale)[0].cpu().numpy()

    def set_prompt(self, prompt: str) -> None:
        """Switch to the theme the prompt names (same maze, same pose); keep the look if it names none."""
        theme = prompt_theme(prompt)
        if theme is not None:
            self.world = self.world.rethemed([theme])


def world_prompts(seed: int, themes: tuple[str, str]) -> tuple[str, str]:
    """The prompts the built-in world gives a world start seeded by ``seed`` in ``themes[0]`` and the same
    maze re-themed to ``themes[1]``: what the model saw in training, for a demo that shows its best."""
    from worldloop.distill.world.themes import describe, retheme, sample_params

    params = sample_params(seed, themes[0])
    return describe(params), describe(retheme(params, themes[1]))


def side_by_side(left: np.ndarray, right: np.ndarray, separator: int = SEPARATOR) -> np.ndarray:
    """Two uint8 (H, W, 3) frames → (H, 2W + separator, 3): left | white bar | right."""
    if left.shape != right.shape:
        raise ValueError(f"panels differ in shape: {left.shape} and {right.shape}")
    bar = np.full((left.shape[0], separator, 3), SEPARATOR_COLOUR, dtype=np.uint8)
    return np.concatenate([left, bar, right], axis=1)


def side_by_side_width(width: int) -> int:
    """The width of a side-by-side frame of two panels ``width`` wide."""
    return 2 * width + SEPARATOR


def layout(beside: bool, width: int, scale: int) -> dict[str, object]:
    """The sidecar's description of a video frame: its panels left to right, their width and the separator's
    (pixels of the video)."""
    if not beside:
        return {"panels": ["model"], "panel_width": width * scale}
    return {"panels": list(PANELS), "panel_width": width * scale, "separator": SEPARATOR * scale}
