"""The built-in world: batched first-person maze worlds rendered in torch — training data and ground truth.

    from worldloop.distill.world import World, Explorer, rollout, sample_params, describe, THEMES
    clip = rollout(range(256), n_frames=16, height=64, width=64, device="cuda")  # frames, keys, prompts...

Modules: ``engine`` (World, motion, collision), ``raycast`` (the renderer), ``maze`` (layouts, light maps),
``textures`` and ``skies`` (procedural patterns), ``themes`` (themes, WorldParams, prompts), ``explorer``
(the scripted key policy), ``rollout`` (clips in one call), ``hashing`` (counter-based random numbers).
"""

from worldloop.distill.world.engine import World, WorldConfig, check_size
from worldloop.distill.world.explorer import Explorer, ExplorerConfig
from worldloop.distill.world.rollout import Rollout, rollout
from worldloop.distill.world.themes import (
    THEMES,
    Surface,
    WorldParams,
    describe,
    retheme,
    sample_params,
    theme_from_prompt,
)

__all__ = [
    "THEMES", "Explorer", "ExplorerConfig", "Rollout", "Surface", "World", "WorldConfig", "WorldParams",
    "check_size", "describe", "retheme", "rollout", "sample_params", "theme_from_prompt",
]
