"""Evaluation helpers trained on engine frames: an inverse-dynamics model and a theme classifier.

- ``InverseDynamics``: two consecutive frames → logits of the keys held between them (multi-label, one
  sigmoid per key of ``models.keys.KEYS``). Applied to generated frames it measures whether the world model
  obeys the keys.
- ``ThemeClassifier``: one frame → logits over the world's themes. Applied after a prompt switch it
  measures prompt adherence; its confidence over a long rollout measures drift.

Both are small CNNs (a few ms per frame on the CPU). The IDM does not look at the frames' appearance but at a
cost volume (FlowNet's correlation layer, Dosovitskiy et al. 2015, with absolute differences): for every
small displacement (dx, dy), how well the next frame matches the previous one shifted by it, per pixel.
Turning shows as a uniform horizontal shift, walking as expansion, strafing as parallax; a plain CNN on the
stacked frames instead memorised the training worlds' looks and stayed at chance on held-out seeds.
Each trained helper is a directory with ``config.json`` (``EvaluatorConfig``) and ``weights.safetensors``;
``worldloop train idm|classifier`` trains one (``distill/stages/helpers.py``) and reports its accuracy on
held-out seeds of the engine.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from worldloop.models.checkpoint import CheckpointError
from worldloop.models.keys import NUM_KEYS
from worldloop.models.vae import to_unit

Kind = Literal["idm", "classifier"]


@dataclass(frozen=True)
class EvaluatorConfig:
    kind: Kind
    height: int
    width: int
    labels: tuple[str, ...]  # key names (idm) or theme names (classifier)
    channels: tuple[int, ...] = (32, 64, 64)  # idm: first stage at full resolution; then stride 2 each
    hidden: int = 128
    pool: int = 1  # idm: frames are average-pooled by this factor before the cost volume
    shift_x: int = 3  # idm: displacements −shift_x…shift_x pixels (after pooling)
    shift_y: int = 2

    @property
    def displacements(self) -> int:
        return (2 * self.shift_x + 1) * (2 * self.shift_y + 1)


def cost_volume(prev: torch.Tensor, nxt: torch.Tensor, shift_x: int, shift_y: int) -> torch.Tensor:
    """(B, 3, H, W) ×2 → (B, D, H, W): −mean |next − prev shifted by (dx, dy)| per displacement, centred."""
    h, w = prev.shape[-2:]
    padded = F.pad(prev, (shift_x, shift_x, shift_y, shift_y), mode="replicate")
    cost = [-(nxt - padded[..., dy: dy + h, dx: dx + w]).abs().mean(1)
            for dy in range(2 * shift_y + 1) for dx in range(2 * shift_x + 1)]
    c = torch.stack(cost, 1)
    return c - c.mean(1, keepdim=True)  # only the relative match of displacements matters


class EvaluatorNet(nn.Module):
    """IDM: cost volume → 3×3 convolutions; classifier: strided convolutions on RGB. Both: 4×4 pool, MLP."""

    def __init__(self, config: EvaluatorConfig) -> None:
        super().__init__()
        self.config = config
        idm = config.kind == "idm"
        layers: list[nn.Module] = []
        c_in = config.displacements if idm else 3
        for i, c_out in enumerate(config.channels):
            stride = 1 if idm and i == 0 else 2
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.ReLU()]
            if not idm:
                layers += [nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c_in * 16, config.hidden), nn.ReLU(),
                                  nn.Linear(config.hidden, len(config.labels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """IDM: x (B, 6, H, W) = [prev | next]; classifier: x (B, 3, H, W). Frames in [-1, 1] → logits."""
        c = self.config
        if c.kind == "idm":
            x = F.avg_pool2d(x, c.pool) if c.pool > 1 else x
            x = 4.0 * cost_volume(x[:, :3], x[:, 3:], c.shift_x, c.shift_y)  # differences are small: rescale
        return self.head(self.features(x))  # (B, labels)


def idm_input(prev: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    """Two frames float (B, 3, H, W) in [-1, 1] → the IDM input (B, 6, H, W)."""
    return torch.cat([prev, nxt], dim=1)


@torch.no_grad()
def predict_keys(model: EvaluatorNet, frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames (F, H, W, 3) of one stream → key probabilities (F − 1, NUM_KEYS) for each transition."""
    x = to_unit(frames).to(_device(model))
    return torch.sigmoid(model(idm_input(x[:-1], x[1:])))


@torch.no_grad()
def predict_themes(model: EvaluatorNet, frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames (B, H, W, 3) → theme probabilities (B, themes)."""
    return torch.softmax(model(to_unit(frames).to(_device(model))), dim=-1)


def key_accuracy(probs: torch.Tensor, keys: torch.Tensor) -> dict[str, float]:
    """Multi-label accuracy of key probabilities (N, NUM_KEYS) against bitmasks (N,).

    ``exact``: all keys right; ``per_key``: mean over keys and samples; ``chance_per_key``: the per-key
    accuracy of always predicting each key's majority value (what a model that ignores frames gets).
    """
    bits = (keys.long().unsqueeze(-1) >> torch.arange(NUM_KEYS, device=keys.device)) & 1  # (N, K)
    pred = (probs > 0.5).long()
    rate = bits.float().mean(0)
    return {
        "exact": (pred == bits).all(-1).float().mean().item(),
        "per_key": (pred == bits).float().mean().item(),
        "chance_per_key": torch.maximum(rate, 1 - rate).mean().item(),
    }


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------------------------------------
# Saving and loading


def save_evaluator(model: EvaluatorNet, path: Path, metrics: dict[str, float] | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    info = {"config": asdict(model.config), "metrics": metrics or {}}
    (path / "config.json").write_text(json.dumps(info, indent=2))
    save_file({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()},
              str(path / "weights.safetensors"))


def load_evaluator(path: Path | str, kind: Kind, device: torch.device | str = "cpu") -> EvaluatorNet:
    """Load a helper saved by ``save_evaluator``; a one-line ``CheckpointError`` names file and problem."""
    path = Path(path)
    try:
        info = json.loads((path / "config.json").read_text())
        raw = info["config"]
        raw = {**raw, "labels": tuple(raw["labels"]), "channels": tuple(raw["channels"])}
        config = EvaluatorConfig(**raw)
    except FileNotFoundError:
        hint = f"train one with `worldloop train {kind}`"
        raise CheckpointError(f"{path / 'config.json'}: no such file ({hint})") from None
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path / 'config.json'}: not an evaluator config ({err})") from None
    if config.kind != kind:
        raise CheckpointError(f"{path} holds a '{config.kind}' model, not '{kind}'")
    model = EvaluatorNet(config)
    try:
        model.load_state_dict(load_file(str(path / "weights.safetensors")))
    except (OSError, RuntimeError) as err:
        raise CheckpointError(f"{path / 'weights.safetensors'}: {str(err).splitlines()[0]}") from None
    return model.to(device).eval()
