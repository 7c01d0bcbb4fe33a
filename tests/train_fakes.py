"""Fakes for the training tests: a synthetic clip source and a hash-based prompt encoder (no MiniLM load).

``FakeClips`` follows the ``ClipSource`` contract (``distill/data/clips.py``): clips are a pure function of
(seed, rank, step); each clip is a coloured pattern that scrolls by its keys, so keys matter to the frames.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from worldloop.distill.data.clips import ClipBatch
from worldloop.models import checkpoint
from worldloop.models.config import ModelConfig
from worldloop.models.dit import DiT
from worldloop.models.text import TEXT_DIM, PromptEmbedding
from worldloop.models.vae import LatentAutoencoder


class FakeClips:
    def __init__(self, height: int, width: int, frames: int, seed: int = 0, rank: int = 0) -> None:
        self.height, self.width, self.frames = height, width, frames
        self.seed, self.rank = seed, rank

    def batch(self, step: int, size: int) -> ClipBatch:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.rank * 104_729 + step)
        base = torch.randint(0, 256, (size, 3, 4, 4), generator=g).float()
        image = torch.nn.functional.interpolate(base, (self.height, self.width), mode="bilinear")
        keys = torch.randint(0, 64, (size, self.frames), generator=g)
        shift = torch.cumsum((keys & 1) - ((keys >> 1) & 1), dim=1)  # forward/back scroll the picture
        cols = (torch.arange(self.width) - shift[..., None]) % self.width  # (B, F, W)
        index = cols[:, :, None, None, :].expand(size, self.frames, 3, self.height, self.width)
        frames = image[:, None].expand(-1, self.frames, -1, -1, -1).gather(-1, index)  # (B, F, 3, H, W)
        themes = torch.randint(0, 3, (size,), generator=g)
        prompts = [f"a fake world number {int(t)}" for t in themes]
        return ClipBatch(frames.permute(0, 1, 3, 4, 2).round().to(torch.uint8), keys, prompts, themes)


class FakePromptEncoder:
    """``PromptEncoder.encode`` without the sentence model: token vectors derived from a hash of the text."""

    def __init__(self, max_tokens: int, device: torch.device | str = "cpu") -> None:
        self.max_tokens, self.device = max_tokens, torch.device(device)

    def encode(self, prompts: list[str]) -> PromptEmbedding:
        rows = []
        for p in prompts:
            seed = int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little") % 2**62
            rows.append(torch.randn(self.max_tokens, TEXT_DIM, generator=torch.Generator().manual_seed(seed)))
        mask = torch.ones(len(prompts), self.max_tokens, dtype=torch.bool)
        return PromptEmbedding(torch.stack(rows).to(self.device), mask.to(self.device))


def random_model_dir(config: ModelConfig, path: Path, seed: int = 0) -> Path:
    """A model directory with random (seeded) weights, e.g. as the autoencoder source of a teacher run."""
    torch.manual_seed(seed)
    return checkpoint.save_model(path, config, DiT(config), LatentAutoencoder(config),
                                 metadata={"stage": "test"})


def perturbed_model_dir(config: ModelConfig, path: Path, seed: int) -> Path:
    """Random weights with the zero-initialised layers perturbed too, so every layer matters (a stand-in
    teacher for distillation tests)."""
    torch.manual_seed(seed)
    dit = DiT(config)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    return checkpoint.save_model(path, config, dit, LatentAutoencoder(config), metadata={"stage": "test"})
