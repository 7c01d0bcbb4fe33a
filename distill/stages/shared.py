"""What several training stages use: the run's clip source.

(Stage code never imports another stage: what two stages share lives here or in ``runtime``/``run``.)
"""

from __future__ import annotations

from pathlib import Path

import torch

from worldloop.distill.data.clips import ClipPool, ClipSource, EpisodeClips, WorldClips
from worldloop.distill.stages.runtime import TrainConfig
from worldloop.models.config import ModelConfig


def make_clip_source(cfg: TrainConfig, config: ModelConfig, device: torch.device, rank: int, frames: int,
                     random_keys: float = 0.0) -> ClipSource:
    """The training data of a run: recorded episodes (``cfg.episodes``), else the built-in world.

    World clips are pooled (``cfg.pool_clips``, default 256 on the CPU, 4096 on a GPU): building a world
    and stepping the explorer cost a fixed time per batch and per frame, more than a training step.
    """
    if cfg.episodes:
        return EpisodeClips(Path(cfg.episodes), config.height, config.width, frames, seed=cfg.seed, rank=rank)
    pool = cfg.pool_clips if cfg.pool_clips >= 0 else (256 if device.type == "cpu" else 4096)
    if pool == 0:
        return WorldClips(config.height, config.width, frames, device, seed=cfg.seed, rank=rank,
                          random_keys=random_keys)
    source = WorldClips(config.height, config.width, max(2 * frames, 16), device, seed=cfg.seed, rank=rank,
                        random_keys=random_keys)
    return ClipPool(source, pool, frames, chunk=max(32, pool // 8), refresh_every=cfg.pool_refresh,
                    seed=cfg.seed, rank=rank)
