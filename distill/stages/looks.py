"""The bank of looks a model with a surface memory starts a new prompt from (``models.surface_memory.Looks``).

For each of the built-in world's themes, a few training worlds (seeds below the held-out range), chosen so
that every wall, floor and ceiling pattern the theme allows is among them: the explorer walks each for
``frames`` frames (the engine's ``rollout``), and a surface memory writes every frame at the engine's own
pose and column depth (the truth, so the texture lands where it belongs). What the memory then holds — per
texel the mean relative detail and the fog-free colour, and the fog — is that world's look, keyed by the
sentence vector of its prompt. ``worldloop looks`` writes it into a model directory
(``models.surface_memory.LOOKS_FILE``).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from worldloop.distill.data.clips import downsample, render_scale
from worldloop.distill.world.rollout import rollout
from worldloop.distill.world.themes import THEME_TABLE, THEMES, WorldParams, sample_params
from worldloop.models import surface_memory as sm
from worldloop.models.config import CameraConfig
from worldloop.models.text import PromptEncoder

FOG_FRAMES = 16  # frames the fog is fitted on
FIRST_SEED = 700_000_000  # the bank's worlds are drawn from here up (training seeds, below the held-out ones)


def _shows(p: WorldParams) -> set[tuple[str, str]]:
    """The (surface, pattern) pairs a world shows."""
    return {("wall", p.wall.pattern), ("floor", p.floor.pattern), ("ceiling", p.ceiling.pattern)}


def bank_worlds(per_theme: int) -> list[WorldParams]:
    """At least ``per_theme`` worlds of every theme, and as many more as it takes for every wall, floor and
    ceiling pattern the theme allows to be among them: from ``FIRST_SEED`` on, a world is taken when it shows
    a pattern none taken before it did (then, with all shown, any world up to ``per_theme``)."""
    if per_theme < 1:
        raise ValueError(f"--per-theme must be at least 1, got {per_theme}")
    worlds = []
    for t, name in enumerate(THEMES):
        theme = THEME_TABLE[name]
        patterns = ({("wall", s.pattern) for s in theme.walls} | {("floor", s.pattern) for s in theme.floors}
                    | {("ceiling", s.pattern) for s in theme.ceilings})
        seen: set[tuple[str, str]] = set()
        chosen: list[WorldParams] = []
        for seed in range(FIRST_SEED + t * 100_000, FIRST_SEED + (t + 1) * 100_000):
            p = sample_params(seed, name)
            if _shows(p) - seen or (seen >= patterns and len(chosen) < per_theme):
                chosen.append(p)
                seen |= _shows(p)
            if seen >= patterns and len(chosen) >= per_theme:
                break
        worlds += chosen
    return worlds


@torch.no_grad()
def build_looks(camera: CameraConfig, height: int, width: int, worlds: list[WorldParams], frames: int,
                encoder: PromptEncoder) -> sm.Looks:
    """The look of each of ``worlds`` after the explorer's ``frames`` frames through it (the engine's
    ``rollout`` at ``height`` × ``width``, each frame written as ``camera``'s surface memory writes it, at
    the engine's pose and depth; the fog fitted on the first ``FOG_FRAMES``, as a stream's on its context)."""
    if camera.surface_memory <= 0:
        raise ValueError("the model keeps no surface memory (camera.surface_memory 0): looks are of no use")
    if frames < 2:
        raise ValueError(f"--frames must be at least 2, got {frames}")
    scale = render_scale(height, width)
    clip = rollout(worlds, frames, height=height * scale, width=width * scale, depth_columns=width)
    assert clip.depths is not None
    sky = torch.tensor([p.has_sky for p in worlds])
    texels, sigma = camera.surface_memory, camera.memory_sigma

    def image(t: int) -> torch.Tensor:  # frame t of every world, (K, 3, H, W) in [-1, 1]
        return downsample(clip.frames[:, t], scale).permute(0, 3, 1, 2).float() / 127.5 - 1

    memory = sm.empty(clip.poses[:, 0], texels)
    if camera.memory_colour > 0:
        first = min(FOG_FRAMES, frames)
        images = torch.stack([image(t) for t in range(first)], 1)
        memory = memory._replace(fog=torch.stack([
            sm.fit_fog(images[i], clip.depths[i, :first], sky[i].expand(first), camera, sigma)
            for i in range(len(worlds))]))
    for t in tqdm(range(frames), desc="looks", unit="frame", disable=None):
        memory = sm.write(memory._replace(pose=clip.poses[:, t]), image(t), clip.depths[:, t], sky, camera,
                          texels, sigma)
    prompts = encoder.encode(list(clip.prompts)).tokens[:, 0]
    return sm.looks_of(memory, prompts)
