"""Clips from the built-in world in one call: frames, keys, poses, prompts and params for a batch of seeds.

    clip = rollout(range(1000, 1256), n_frames=16, height=64, width=64, device="cuda")
    clip.frames (B, T, H, W, 3) uint8, clip.keys (B, T), clip.prompts, clip.params

Frame t shows the world after keys[t] were applied to the pose of frame t − 1 (of the start, for t = 0), the
same convention as ``WorldModel.next_frame``: each frame carries the keys that led to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from worldloop.distill.world.engine import World, WorldConfig
from worldloop.distill.world.explorer import Explorer, ExplorerConfig
from worldloop.distill.world.themes import WorldParams


@dataclass(frozen=True)
class Rollout:
    frames: torch.Tensor  # (B, T, H, W, 3) uint8
    keys: torch.Tensor  # (B, T) long bitmasks
    poses: torch.Tensor  # (B, T, 3) float: x, y, angle shown in each frame
    collided: torch.Tensor  # (B, T) bool: the move into that frame hit a wall
    prompts: list[str]
    params: list[WorldParams]
    depths: torch.Tensor | None = None  # (B, T, depth_columns) float: each frame's wall depth per column


def rollout(worlds: Sequence[int | WorldParams], n_frames: int, keys: torch.Tensor | None = None,
            height: int = 64, width: int = 64, device: torch.device | str = "cpu",
            config: WorldConfig | None = None, theme: str | None = None,
            explorer: ExplorerConfig | None = None, depth_columns: int = 0) -> Rollout:
    """Run worlds (seeds or params) for ``n_frames`` under ``keys`` (B, T), or under the explorer if None;
    with ``depth_columns`` also each frame's wall depth through that many columns (``column_depths``)."""
    if n_frames < 1:
        raise ValueError(f"n_frames must be positive, got {n_frames}")
    world = World(worlds, height, width, device, config, theme)
    b = world.batch_size
    if keys is not None:
        keys = torch.as_tensor(keys, dtype=torch.long, device=world.device)
        if keys.shape != (b, n_frames):
            raise ValueError(f"keys must have shape ({b}, {n_frames}), got {tuple(keys.shape)}")
    policy = Explorer(world.seeds, explorer) if keys is None else None
    frames = torch.empty(b, n_frames, height, width, 3, dtype=torch.uint8, device=world.device)
    used = torch.empty(b, n_frames, dtype=torch.long, device=world.device)
    poses = torch.empty(b, n_frames, 3, device=world.device)
    collided = torch.empty(b, n_frames, dtype=torch.bool, device=world.device)
    depths = torch.empty(b, n_frames, depth_columns, device=world.device) if depth_columns else None
    for t in range(n_frames):
        used[:, t] = policy.act(world) if policy is not None else keys[:, t]
        frames[:, t] = world.next_frame(used[:, t])
        poses[:, t], collided[:, t] = world.poses, world.collided
        if depths is not None:
            depths[:, t] = world.column_depths(depth_columns)
    return Rollout(frames, used, poses, collided, world.prompts, world.params, depths)
