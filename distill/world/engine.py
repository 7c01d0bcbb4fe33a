"""The built-in world: a batch of first-person maze worlds stepped by held keys and rendered in torch.

    world = World(seeds, height=64, width=64, device="cuda")   # or WorldParams from sample_params
    world.reset()
    frames = world.next_frame(keys)          # keys: (B,) long bitmasks (models.keys) -> (B, H, W, 3) uint8
    world.poses, world.collided        # (B, 3) x, y, angle; (B,) bool

Motion per frame (``WorldConfig``): turn first by ``turn_degrees`` per held turn key, then move
``move_speed`` tiles along the resulting heading and strafe axis (diagonals are normalised, so W+A is as fast
as W). Collision keeps a square of half-size ``radius`` around the camera out of every wall tile, one axis at
a time, so the camera slides along walls and never comes closer to a wall than ``radius``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from worldloop.distill.world import maze
from worldloop.distill.world.hashing import uniform
from worldloop.distill.world.raycast import Scene, View, cast, column_rays, render
from worldloop.distill.world.skies import SKIES
from worldloop.distill.world.textures import PATTERNS, Pattern, bake
from worldloop.distill.world.themes import WorldParams, describe, retheme, sample_params
from worldloop.models.keys import KEYS

_BIT = {name: 1 << i for i, name in enumerate(KEYS)}


@dataclass(frozen=True)
class WorldConfig:
    maze_cells: int = 8  # the map is (2n+1)² tiles
    fov_degrees: float = 70.0  # horizontal
    move_speed: float = 0.1  # tiles per frame
    turn_degrees: float = 4.0  # per frame
    radius: float = 0.25  # the camera's distance margin from walls, in tiles
    texture_size: int | None = None  # texels per tile edge (a power of two ≥ 16); None: by frame size
    light_res: int = 4  # light-map texels per tile edge
    pixel_chunk: int = 1 << 21  # pixels rendered at once, to bound memory

    @property
    def turn_rate(self) -> float:
        return math.radians(self.turn_degrees)


def check_size(height: int, width: int) -> None:
    """Frames are 64–256 pixels each way, even (video encoders need even sizes)."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"frame {name} must be an integer, got {value!r}")
        if not 64 <= value <= 256 or value % 2:
            raise ValueError(f"frame {name} must be an even number from 64 to 256, got {value}")


def _as_params(worlds: Sequence[int | WorldParams], theme: str | None) -> list[WorldParams]:
    params = [w if isinstance(w, WorldParams) else sample_params(int(w), theme) for w in worlds]
    if not params:
        raise ValueError("a World needs at least one seed or WorldParams")
    return params


class World:
    """A batch of worlds on one device; see the module docstring."""

    def __init__(self, worlds: Sequence[int | WorldParams], height: int = 64, width: int = 64,
                 device: torch.device | str = "cpu", config: WorldConfig | None = None,
                 theme: str | None = None) -> None:
        check_size(height, width)
        config = config or WorldConfig()
        if config.texture_size is None:  # sharper textures for larger frames
            config = dataclasses.replace(config, texture_size=32 if max(height, width) <= 96 else 64)
        t = config.texture_size
        if t < 16 or t & (t - 1):
            raise ValueError(f"texture_size must be a power of two ≥ 16, got {t}")
        self.config = config
        self.params = _as_params(worlds, theme)
        self.prompts = [describe(p) for p in self.params]
        self.height, self.width, self.device = height, width, torch.device(device)
        self.view = View(height, width, math.radians(self.config.fov_degrees))
        self.seeds = torch.tensor([p.seed for p in self.params], dtype=torch.long, device=self.device)
        self.scene = self._build_scene()
        self.reset()

    @property
    def batch_size(self) -> int:
        return len(self.params)

    def _values(self, fn: Callable[[WorldParams], Any], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.tensor([fn(p) for p in self.params], dtype=dtype, device=self.device)

    def _build_scene(self) -> Scene:
        cfg, p, dev, t = self.config, self.params, self.device, self.config.texture_size
        grid = maze.carve(self.seeds, cfg.maze_cells, self._values(lambda q: q.rooms, torch.long),
                          self._values(lambda q: q.loops), self._values(lambda q: q.accent_rate))
        chunk = 256  # worlds baked at once: float textures are 16× the size of the uint8 atlas
        atlas = torch.cat([self._bake_atlas(list(range(i, min(i + chunk, self.batch_size))))
                           for i in range(0, self.batch_size, chunk)])
        light = maze.light_map(grid, self.seeds, self._values(lambda q: q.lamps, torch.long),
                               self._values(lambda q: q.lamp_power), self._values(lambda q: q.ambient),
                               cfg.light_res)
        return Scene(grid=grid.flatten(1), size=grid.shape[-1], atlas=atlas, tex=t,
                     light=light.flatten(1).contiguous(), light_res=cfg.light_res,
                     fog_color=self._values(lambda q: q.fog_color),
                     fog_density=self._values(lambda q: q.fog_density),
                     torch_power=self._values(lambda q: q.torch),
                     sky=torch.tensor([q.has_sky for q in p], device=dev))

    def _bake_atlas(self, worlds: list[int]) -> torch.Tensor:
        """The texture atlas of some worlds: (len(worlds), 4, 11·T²) uint8, see ``raycast.Scene``."""
        t, dev = self.config.texture_size, self.device
        tint = torch.tensor([self.params[i].light_color for i in worlds], device=dev)
        atlas = torch.zeros(len(worlds), 11 * t * t, 4, dtype=torch.uint8, device=dev)
        for salt, surface in enumerate(("wall", "accent", "floor", "ceiling")):
            sky = [self.params[i].has_sky and surface == "ceiling" for i in worlds]
            for wide in (False, True):  # a sky is a panorama (T × 8T) in the ceiling slot
                rows = [k for k, s in enumerate(sky) if s == wide]
                if not rows:
                    continue
                size = (t, 8 * t) if wide else (t, t)
                tex = self._bake(surface, [worlds[k] for k in rows], size, salt, SKIES if wide else PATTERNS)
                glow = tex[..., 3:]
                albedo = tex[..., :3] * (tint[rows, None, :] * (1 - glow) + glow)  # tint the lit texels
                texels = torch.cat([albedo.clamp(0, 2) * 127.5, glow * 255], -1).round().to(torch.uint8)
                atlas[rows, salt * t * t: salt * t * t + size[0] * size[1]] = texels
        return atlas.transpose(1, 2).contiguous()

    def _bake(self, surface: str, idx: list[int], size: tuple[int, int], salt: int,
              table: dict[str, Pattern]) -> torch.Tensor:
        s = [getattr(self.params[i], surface) for i in idx]
        return bake([x.pattern for x in s], torch.tensor([x.color for x in s], device=self.device),
                    torch.tensor([x.detail for x in s], device=self.device),
                    torch.tensor([x.scale for x in s], device=self.device), self.seeds[idx], size, salt,
                    table,
                    wall=surface in ("wall", "accent"))

    @property
    def grid(self) -> torch.Tensor:
        """(B, G, G) long map tiles: 0 empty, 1 wall, 2 accent wall."""
        return self.scene.grid.view(-1, self.scene.size, self.scene.size)

    @property
    def poses(self) -> torch.Tensor:
        """(B, 3) float: x, y (tiles), angle (radians in [0, 2π))."""
        return torch.cat([self.pos, self.angle[:, None]], dim=1)

    def reset(self) -> None:
        """Put every camera back at its seed's start cell, facing its most open direction (± a jitter)."""
        n = self.config.maze_cells
        self.pos = maze.start_cells(self.seeds, n).to(self.device)
        self.angle = torch.zeros(self.batch_size, device=self.device)
        quarter = torch.arange(4, device=self.device) * (math.pi / 2)
        open_dir = self.probe(quarter).argmax(1)
        jitter = (uniform(self.seeds, 99) - 0.5) * 0.6
        self.angle = torch.remainder(quarter[open_dir] + jitter, 2 * math.pi)
        self.collided = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        self.frame_index = 0

    def set_poses(self, poses: torch.Tensor) -> None:
        """Place the cameras (B, 3); ValueError if a camera would be within ``radius`` of a wall."""
        poses = poses.to(self.device, torch.float32)
        if poses.shape != (self.batch_size, 3):
            raise ValueError(f"poses must have shape ({self.batch_size}, 3), got {tuple(poses.shape)}")
        if _blocked(self.grid, poses[:, 0], poses[:, 1], self.config.radius).any():
            raise ValueError("a pose is inside a wall or closer to it than the collision radius")
        self.pos, self.angle = poses[:, :2].clone(), torch.remainder(poses[:, 2], 2 * math.pi)

    def rethemed(self, themes: Sequence[str]) -> World:
        """A new World of the same mazes, size and config, each world in ``themes[i]`` (``themes.retheme``),
        its camera at the same pose: what the engine shows after a prompt switch names another theme."""
        if len(themes) != self.batch_size:
            raise ValueError(f"expected {self.batch_size} themes, got {len(themes)}")
        other = World([retheme(p, t) for p, t in zip(self.params, themes, strict=True)], self.height,
                      self.width, self.device, self.config)
        other.set_poses(self.poses)
        return other

    def probe(self, offsets: torch.Tensor) -> torch.Tensor:
        """Distance to the nearest wall along heading + offset ((K,) or (B, K) radians) → (B, K) tiles."""
        offsets = offsets.to(self.device)
        a = self.angle[:, None] + (offsets.view(1, -1) if offsets.dim() == 1 else offsets)
        rays = torch.stack([torch.cos(a), torch.sin(a)], dim=-1)
        return cast(self.scene.grid, self.scene.size, self.pos, rays).dist

    def column_depths(self, columns: int) -> torch.Tensor:
        """Perpendicular distance (tiles) to the wall seen through ``columns`` evenly spaced screen columns
        (their centres, across the field of view) → (B, columns): the depth of a frame, column by column."""
        rays = column_rays(self.angle, View(1, columns, self.view.fov))
        return cast(self.scene.grid, self.scene.size, self.pos, rays).dist

    def move(self, keys: torch.Tensor) -> None:
        """Apply held keys (B,) to the poses without rendering."""
        keys = torch.as_tensor(keys, device=self.device).long().view(-1)
        if keys.shape[0] != self.batch_size:
            raise ValueError(f"expected {self.batch_size} key states, got {keys.shape[0]}")
        self.pos, self.angle, self.collided = move(self.grid, self.pos, self.angle, keys, self.config)
        self.frame_index += 1

    def next_frame(self, keys: torch.Tensor) -> torch.Tensor:
        """Apply held keys (B,) and render the resulting frames (B, H, W, 3) uint8."""
        self.move(keys)
        return self.render()

    def render(self) -> torch.Tensor:
        """Frames for the current poses: (B, H, W, 3) uint8."""
        chunk = max(1, self.config.pixel_chunk // (self.height * self.width))
        out = [render(self.scene.select(slice(i, i + chunk)), self.pos[i: i + chunk],
                      self.angle[i: i + chunk], self.view) for i in range(0, self.batch_size, chunk)]
        return out[0] if len(out) == 1 else torch.cat(out)


def _blocked(grid: torch.Tensor, x: torch.Tensor, y: torch.Tensor, radius: float) -> torch.Tensor:
    """(B,) bool: the square of half-size ``radius`` around (x, y) overlaps a wall tile."""
    g = grid.shape[-1]
    flat = grid.view(grid.shape[0], -1)
    hit = torch.zeros_like(x, dtype=torch.bool)
    for dx in (-radius, radius):
        for dy in (-radius, radius):
            cx = torch.floor(x + dx).long().clamp(0, g - 1)
            cy = torch.floor(y + dy).long().clamp(0, g - 1)
            hit |= flat.gather(1, (cy * g + cx)[:, None])[:, 0] > 0
    return hit


def move(grid: torch.Tensor, pos: torch.Tensor, angle: torch.Tensor, keys: torch.Tensor,
         config: WorldConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One frame of motion → (pos (B, 2), angle (B,), collided (B,) bool)."""
    def held(name: str) -> torch.Tensor:
        return ((keys & _BIT[name]) > 0).float()

    angle = torch.remainder(angle + config.turn_rate * (held("turn_right") - held("turn_left")), 2 * math.pi)
    fwd, side = held("forward") - held("back"), held("right") - held("left")
    norm = torch.sqrt(fwd ** 2 + side ** 2).clamp(min=1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    dx = config.move_speed * (fwd * cos - side * sin) / norm
    dy = config.move_speed * (fwd * sin + side * cos) / norm
    x, y = pos[:, 0], pos[:, 1]
    block_x = (dx != 0) & _blocked(grid, x + dx, y, config.radius)
    x = torch.where(block_x, x, x + dx)
    block_y = (dy != 0) & _blocked(grid, x, y + dy, config.radius)
    y = torch.where(block_y, y, y + dy)
    return torch.stack([x, y], dim=1), angle, block_x | block_y
