"""Choosing and loading the world model for the app's commands (play, gradio, rollout).

A command names a model directory (``--model DIR``) or a preset with random weights (``--preset NAME``). With
neither it uses the shipped model in ``assets/default/``; commands meant to work out of the box fall back to
the ``default`` preset with random weights when that is not shipped, and say loudly that the weights are
untrained.
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from worldloop.app.errors import UserError
from worldloop.models.checkpoint import read_config
from worldloop.models.config import PRESETS, ModelConfig, preset

if TYPE_CHECKING:  # the model stack (torch, transformers) loads only when a command builds a model
    from worldloop.models.world_model import WorldModel



def shipped_asset(name: str) -> Path:
    """``assets/NAME``: the package data of ``worldloop.assets`` when installed, the repository's folder
    in an editable install (``pyproject.toml`` maps ``worldloop.assets`` to ``assets/``)."""
    spec = importlib.util.find_spec("worldloop.assets")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / name).is_dir():
            return Path(folder) / name
    return Path(__file__).resolve().parent.parent / "assets" / name  # the same place, by layout


DEFAULT_MODEL_DIR = shipped_asset("default")
FALLBACK_PRESET = "default"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options every model-serving command shares: where the weights come from, device and steps."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="DIR", help="model directory (default: assets/default)")
    source.add_argument("--preset", choices=sorted(PRESETS), help="a preset with RANDOM weights")
    parser.add_argument("--device", default="cpu", help="torch device for the model (default: %(default)s)")
    parser.add_argument("--steps", type=int, help="denoising steps per frame (default: the model's)")


@dataclass(frozen=True)
class ModelChoice:
    """Where the weights come from: a model directory (trained) or a preset (random weights)."""

    config: ModelConfig
    path: Path | None = None
    preset: str | None = None

    @property
    def trained(self) -> bool:
        return self.path is not None

    @property
    def source(self) -> str:
        return str(self.path) if self.path is not None else f"preset {self.preset} (random weights)"

    def warning(self) -> str | None:
        """A loud warning for random weights, None for a trained model."""
        if self.trained:
            return None
        return (f"WARNING: the model has RANDOM, UNTRAINED weights (preset {self.preset!r}): the pictures "
                "are noise. Everything else (model speed, cache, streaming, controls) is real.")


def choose_model(model: str | Path | None, preset_name: str | None, *, fallback: bool) -> ModelChoice:
    """Resolve ``--model``/``--preset``; ``fallback`` allows random weights when assets/default is missing."""
    if model is not None and preset_name is not None:
        raise UserError("give either --model DIR or --preset NAME, not both")
    if preset_name is not None:
        return ModelChoice(preset(preset_name), preset=preset_name)
    if model is not None:
        path = Path(model)
        if not path.is_dir():
            raise UserError(f"no model directory at {path}")
        return ModelChoice(read_config(path)[0], path=path)
    if (DEFAULT_MODEL_DIR / "config.json").is_file():
        return ModelChoice(read_config(DEFAULT_MODEL_DIR)[0], path=DEFAULT_MODEL_DIR)
    if not fallback:
        raise UserError(f"the trained model is not shipped yet ({DEFAULT_MODEL_DIR} is missing); "
                                "pass --model DIR, or --preset NAME for random weights")
    return ModelChoice(preset(FALLBACK_PRESET), preset=FALLBACK_PRESET)


def load_model(choice: ModelChoice, *, device: str = "cpu", steps: int | None = None, seed: int = 0,
               max_sessions: int = 8) -> WorldModel:
    """Build the ``WorldModel`` for a choice (random weights are drawn from ``seed``)."""
    from worldloop.models.world_model import WorldModel

    if choice.path is not None:
        return WorldModel.from_pretrained(choice.path, steps=steps, device=device, max_sessions=max_sessions)
    return WorldModel.from_config(choice.config, seed=seed, device=device, max_sessions=max_sessions,
                                  steps=steps)
