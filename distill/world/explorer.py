"""A scripted explorer: the key policy that drives the built-in world for training data.

The explorer walks the maze from tile centre to tile centre and sprinkles in detours, all batched:
1. Route: on reaching its waypoint it picks the next open neighbour tile — straight on preferred, then the
   side with the longer free run ahead (the map's distance ahead), a U-turn only in a dead end. A camera
   that wandered off (after a detour) first goes back to the centre of its tile.
2. Steering: turn toward the waypoint; walk while it lies within ~30° of the heading (forward-biased, and
   turns happen away from walls, since waypoints are tile centres of open tiles).
3. Detours: now and then a sticky random action (look around, strafe, step back, pause, curve) is held
   for 4–24 frames.
4. Safety: keys whose move would touch a wall (the engine's own collision test) are replaced by a turn,
   so the camera never collides.
Random draws are ``hash(seed, frame, purpose)``: a world's keys depend on its seed only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from worldloop.distill.world.engine import World, move
from worldloop.distill.world.hashing import uniform
from worldloop.models.keys import parse_keys

# Detour actions and their weights.
DETOURS: tuple[tuple[str, float], ...] = (
    ("q", 1.0), ("e", 1.0), ("w+q", 0.7), ("w+e", 0.7), ("a", 0.6), ("d", 0.6), ("w+a", 0.5), ("w+d", 0.5),
    ("s", 0.5), ("none", 0.6),
)
_FORWARD, _TURN_LEFT, _TURN_RIGHT = parse_keys("w"), parse_keys("q"), parse_keys("e")
_STEPS = torch.tensor([[1, 0], [0, 1], [-1, 0], [0, -1]])  # east, south, west, north as (dx, dy)


@dataclass(frozen=True)
class ExplorerConfig:
    detour_rate: float = 0.02  # chance per frame of starting a detour
    detour_frames: tuple[int, int] = (4, 24)  # a detour's action is held this many frames (inclusive)
    straight_bias: float = 2.0  # preference for going straight on at a junction, against the free run
    walk_angle: float = 0.5  # walk while the waypoint is within this angle of the heading (radians)
    dead_band: float = 0.1  # no steering while the waypoint is within this angle (radians)
    reach: float = 0.3  # a waypoint closer than this (tiles) counts as reached


class Explorer:
    """Batched, deterministic key policy for a ``World``; call ``act(world)`` once per frame."""

    def __init__(self, seeds: torch.Tensor, config: ExplorerConfig | None = None) -> None:
        self.config = config or ExplorerConfig()
        self.seeds = seeds.long()
        dev = self.seeds.device
        weights = torch.tensor([w for _, w in DETOURS], device=dev)
        self._cdf = torch.cumsum(weights / weights.sum(), 0)
        self._detours = torch.tensor([parse_keys(k) for k, _ in DETOURS], device=dev)
        self._steps = _STEPS.to(dev)
        self.reset()

    def reset(self) -> None:
        b, dev = self.seeds.shape[0], self.seeds.device
        self.target: torch.Tensor | None = None  # (B, 2) waypoint, set from the first pose seen
        self.direction = torch.zeros(b, dtype=torch.long, device=dev)  # index into _STEPS of the last leg
        self.detour = torch.zeros(b, dtype=torch.long, device=dev)  # frames of detour left
        self.detour_keys = torch.zeros(b, dtype=torch.long, device=dev)
        self.frame = 0

    def act(self, world: World) -> torch.Tensor:
        """The key bitmasks (B,) to hold for the next frame."""
        cfg, t = self.config, self.frame
        self.frame += 1
        centre = torch.floor(world.pos) + 0.5
        if self.target is None:
            self.target = centre.clone()
            self.direction = torch.round(world.angle / (math.pi / 2)).long() % 4
        # 1. Route.
        off = (world.pos - self.target).norm(dim=1)
        self.target = torch.where((off > 1.5)[:, None], centre, self.target)
        reached = (world.pos - self.target).norm(dim=1) < cfg.reach
        self._next_leg(world, reached, t)
        # 2. Steering.
        to = self.target - world.pos
        error = torch.atan2(to[:, 1], to[:, 0]) - world.angle
        error = torch.remainder(error + math.pi, 2 * math.pi) - math.pi  # in [-π, π)
        dead = max(1.5 * world.config.turn_rate, cfg.dead_band)
        turn = torch.where(error > dead, _TURN_RIGHT, torch.where(error < -dead, _TURN_LEFT, 0))
        keys = turn | torch.where(error.abs() < cfg.walk_angle, _FORWARD, 0)
        # 3. Detours.
        start = (self.detour == 0) & (uniform(self.seeds, t, 4) < cfg.detour_rate)
        pick = torch.searchsorted(self._cdf, uniform(self.seeds, t, 5).unsqueeze(1)).squeeze(1)
        lo, hi = cfg.detour_frames
        chosen = self._detours[pick.clamp(max=len(DETOURS) - 1)]
        self.detour_keys = torch.where(start, chosen, self.detour_keys)
        self.detour = torch.where(start, lo + (uniform(self.seeds, t, 6) * (hi - lo + 1)).long(), self.detour)
        self.detour = torch.where(self._collides(world, self.detour_keys), 0, self.detour)
        keys = torch.where(self.detour > 0, self.detour_keys, keys)
        self.detour = (self.detour - 1).clamp(min=0)
        # 4. Safety.
        blocked = self._collides(world, keys)
        keys = torch.where(blocked, keys & (_TURN_LEFT | _TURN_RIGHT), keys)
        stuck = blocked & (keys == 0)  # facing the waypoint yet blocked: head for the tile centre first
        self.target = torch.where(stuck[:, None], centre, self.target)
        return keys

    @staticmethod
    def _collides(world: World, keys: torch.Tensor) -> torch.Tensor:
        return move(world.grid, world.pos, world.angle, keys, world.config)[2]

    def _next_leg(self, world: World, reached: torch.Tensor, t: int) -> None:
        """For worlds that ``reached`` their waypoint, pick the neighbour tile to walk to next."""
        g, b = world.grid.shape[-1], world.batch_size
        flat = world.grid.view(b, -1)
        tile = torch.floor(self.target).long()  # (B, 2) x, y
        run = torch.zeros(b, 4, device=world.device)
        still_open = torch.ones(b, 4, dtype=torch.bool, device=world.device)
        for k in range(1, 5):  # free tiles ahead in each direction, up to 4
            cell = (tile[:, None, :] + k * self._steps).clamp(0, g - 1)  # (B, 4, 2)
            free = flat.gather(1, cell[..., 1] * g + cell[..., 0]) == 0
            still_open &= free
            run += still_open.float()
        dirs = torch.arange(4, device=world.device)
        back = dirs == (self.direction[:, None] + 2) % 4
        score = run + self.config.straight_bias * (dirs == self.direction[:, None])
        score = score + uniform(self.seeds[:, None], t, 7, dirs) * 1.5 - 10 * back
        score = torch.where(run > 0, score, -100.0)
        choice = score.argmax(1)
        self.direction = torch.where(reached, choice, self.direction)
        step = self._steps[choice].float()
        self.target = torch.where(reached[:, None], self.target + step, self.target)
