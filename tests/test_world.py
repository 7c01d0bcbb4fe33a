"""The built-in world: sizes, determinism, motion and collision, the explorer, themes and their prompts."""

from __future__ import annotations

import dataclasses
import math
from collections import deque

import pytest
import torch

from worldloop.distill.world import (
    THEMES,
    Explorer,
    World,
    WorldConfig,
    WorldParams,
    describe,
    rollout,
    sample_params,
    theme_from_prompt,
)
from worldloop.distill.world.themes import THEME_TABLE, colour_name
from worldloop.models.keys import parse_keys

pytestmark = pytest.mark.usefixtures("single_thread")


def _distance_to_walls(world: World) -> torch.Tensor:
    """(B,) Euclidean distance from each camera to the nearest wall tile (an independent check)."""
    g = world.grid.shape[-1]
    r = torch.arange(g).view(1, g, 1).float()
    c = torch.arange(g).view(1, 1, g).float()
    x, y = world.pos[:, 0].view(-1, 1, 1), world.pos[:, 1].view(-1, 1, 1)
    dx = torch.clamp(torch.maximum(c - x, x - (c + 1)), min=0)
    dy = torch.clamp(torch.maximum(r - y, y - (r + 1)), min=0)
    dist = torch.sqrt(dx ** 2 + dy ** 2).masked_fill(world.grid == 0, float("inf"))
    return dist.flatten(1).min(1).values


@pytest.mark.parametrize("size", [(63, 64), (64, 62), (62, 64), (258, 128), (64, 300), (0, 64), (-64, 64)])
def test_bad_sizes_are_rejected(size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="even number from 64 to 256"):
        World([0], *size)


def test_frames_have_the_asked_size_and_are_deterministic_per_seed() -> None:
    keys = torch.tensor([parse_keys("w"), parse_keys("w+e")])
    a = World([5, 6], height=64, width=96)
    b = World([5, 6], height=64, width=96)
    fa, fb = a.next_frame(keys), b.next_frame(keys)
    assert fa.shape == (2, 64, 96, 3) and fa.dtype == torch.uint8
    assert torch.equal(fa, fb)
    # A world's frames depend on its own seed, not on the rest of the batch.
    alone = World([6], height=64, width=96)
    assert torch.equal(alone.next_frame(keys[1:]), fa[1:])
    assert not torch.equal(fa[0], fa[1])
    assert fa.float().std() > 10  # a picture, not a flat colour


def test_maze_is_connected_with_rooms_and_loops() -> None:
    world = World(list(range(6)), 64, 64)
    for b in range(6):
        grid = world.grid[b]
        open_tiles = {(r, c) for r, c in (grid == 0).nonzero().tolist()}
        start = tuple(int(v) for v in torch.floor(world.pos[b]).long().flip(0))
        seen, todo = {start}, deque([start])
        while todo:
            r, c = todo.popleft()
            for n in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if n in open_tiles and n not in seen:
                    seen.add(n)
                    todo.append(n)
        assert seen == open_tiles
        assert (grid[0] > 0).all() and (grid[-1] > 0).all() and (grid[:, 0] > 0).all()


@pytest.mark.parametrize("spec", ["w", "s", "a", "d", "q", "e", "none", "w+a", "w+s", "s+d+e"])
def test_each_key_moves_or_turns_as_specified(spec: str) -> None:
    cfg = WorldConfig()
    world = World([3], 64, 64, config=cfg)
    a0 = 0.3
    world.set_poses(torch.tensor([[1.5, 1.5, a0]]))  # a maze cell centre: one step in any direction is free
    world.move(torch.tensor([parse_keys(spec)]))
    held = set(spec.split("+"))
    turn = cfg.turn_rate * (("e" in held) - ("q" in held))
    a1 = a0 + turn
    fwd, side = ("w" in held) - ("s" in held), ("d" in held) - ("a" in held)
    norm = max(1.0, math.hypot(fwd, side))
    dx = cfg.move_speed * (fwd * math.cos(a1) - side * math.sin(a1)) / norm
    dy = cfg.move_speed * (fwd * math.sin(a1) + side * math.cos(a1)) / norm
    x, y, a = world.poses[0].tolist()
    assert x == pytest.approx(1.5 + dx, abs=1e-5) and y == pytest.approx(1.5 + dy, abs=1e-5)
    assert math.remainder(a - a1, 2 * math.pi) == pytest.approx(0.0, abs=1e-5)
    assert not world.collided[0]
    if spec == "w":  # forward moves exactly one step along the heading
        assert math.hypot(x - 1.5, y - 1.5) == pytest.approx(cfg.move_speed, abs=1e-5)
        assert math.atan2(y - 1.5, x - 1.5) == pytest.approx(a0, abs=1e-4)


def test_no_walking_through_walls() -> None:
    cfg = WorldConfig()
    world = World(list(range(10)), 64, 64, config=cfg)
    g = torch.Generator().manual_seed(0)
    scripts = ["w", "w+a", "w+d", "s", "a", "d", "w+q", "s+e"]
    collided = 0
    for t in range(240):
        if t < 120:  # drive straight into walls with every key combination
            keys = torch.tensor([parse_keys(scripts[(b + t // 40) % len(scripts)]) for b in range(10)])
        else:
            keys = torch.randint(0, 64, (10,), generator=g)
        world.move(keys)
        collided += int(world.collided.sum())
        assert (_distance_to_walls(world) >= cfg.radius - 1e-4).all()
    assert collided > 50  # the test did push against walls


def test_explorer_moves_keeps_off_walls_and_is_deterministic() -> None:
    def run(frames: int) -> tuple[torch.Tensor, torch.Tensor, World]:
        world = World(list(range(20, 26)), 64, 64)
        explorer = Explorer(world.seeds)
        keys, path = [], torch.zeros(world.batch_size)
        for _ in range(frames):
            keys.append(explorer.act(world))
            before = world.pos.clone()
            world.move(keys[-1])
            path += (world.pos - before).norm(dim=1)
            assert not world.collided.any()
            assert (_distance_to_walls(world) >= world.config.radius - 1e-4).all()
        return torch.stack(keys, 1), path, world

    keys, path, _ = run(120)
    again, _, _ = run(30)
    assert torch.equal(keys[:, :30], again)
    assert (path > 3).all()  # tiles walked
    forward = (keys & parse_keys("w")) > 0
    assert forward.float().mean() > 0.4  # forward-biased
    assert len(set(keys.flatten().tolist())) >= 5  # turns, strafes and pauses too


def test_rollout_returns_clips_and_checks_keys() -> None:
    clip = rollout(range(3), n_frames=4)
    assert clip.frames.shape == (3, 4, 64, 64, 3) and clip.keys.shape == (3, 4)
    assert clip.poses.shape == (3, 4, 3) and len(clip.prompts) == len(clip.params) == 3
    scripted = rollout([0], 3, keys=torch.tensor([[parse_keys("q")] * 3]))
    assert scripted.keys.tolist() == [[parse_keys("q")] * 3]
    with pytest.raises(ValueError, match="shape"):
        rollout([0], 3, keys=torch.zeros(1, 2, dtype=torch.long))


def test_themes_look_different() -> None:
    params = [sample_params(s, theme) for theme in THEMES for s in range(2)]
    frames = World(params, 64, 64).render().float()
    means = frames.mean(dim=(1, 2)).view(len(THEMES), 2, 3).mean(1)  # mean colour per theme
    dist = torch.cdist(means, means) + torch.eye(len(THEMES)) * 1e9
    assert dist.min() > 12, dist.min()


def test_every_theme_option_renders_and_has_words() -> None:
    params = []
    for theme in THEME_TABLE.values():
        base = sample_params(0, theme.name)
        for field in ("walls", "accents", "floors", "ceilings"):
            for surface in getattr(theme, field):
                key = {"walls": "wall", "accents": "accent", "floors": "floor", "ceilings": "ceiling"}[field]
                params.append(dataclasses.replace(base, **{key: surface}))
    frames = World(params, 64, 64).render()
    assert frames.shape[0] == len(params)
    for p in params:
        assert theme_from_prompt(describe(p)) == p.theme


def test_prompt_follows_the_parameters() -> None:
    for seed in range(30):
        p = sample_params(seed)
        assert describe(p) == describe(sample_params(seed))  # deterministic
        assert theme_from_prompt(describe(p)) == p.theme
        assert WorldParams.from_dict(p.to_dict()) == p
    p = sample_params(1, "dungeon")
    assert "dungeon" in describe(p) and describe(p).startswith("a ")
    prompts = {describe(sample_params(1, t)) for t in THEMES}
    assert len(prompts) == len(THEMES)
    red_walls = dataclasses.replace(p, wall=dataclasses.replace(p.wall, color=(0.8, 0.1, 0.1)))
    assert colour_name((0.8, 0.1, 0.1)) == "red" and "red" in describe(red_walls)
    assert describe(red_walls) != describe(p)
    thick, thin = dataclasses.replace(p, fog_density=0.35), dataclasses.replace(p, fog_density=0.03)
    assert "dense" in describe(thick) and "faint" in describe(thin)
    assert describe(dataclasses.replace(p, ambient=1.0)) != describe(dataclasses.replace(p, ambient=0.1))
    with pytest.raises(ValueError, match="unknown theme"):
        sample_params(0, "moon base")
    with pytest.raises(ValueError):
        theme_from_prompt("a quiet meadow")
