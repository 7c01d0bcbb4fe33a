"""scripts/demo_gif.py on a tiny model directory with random weights: the tour as a GIF of [engine | model]
under a caption row, at 15 FPS, 2× the model's frame size."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from worldloop.app.commands.world import read_key_script
from worldloop.models.checkpoint import save_model
from worldloop.models.config import ModelConfig
from worldloop.models.dit import DiT
from worldloop.models.vae import LatentAutoencoder

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("single_thread")]
REPO = Path(__file__).resolve().parent.parent


def _script():  # scripts/ is not a package
    spec = importlib.util.spec_from_file_location("demo_gif", REPO / "scripts" / "demo_gif.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tour_is_about_six_seconds_with_a_prompt_switch_before_its_end(tiny_config: ModelConfig) -> None:
    demo = _script()
    frames = sum(n for n, _ in read_key_script(demo.TOUR))
    assert 5 <= frames / tiny_config.fps <= 7 and demo.SWITCH_SECONDS < frames / tiny_config.fps


def test_demo_gif_plays_the_tour_beside_the_engine(tmp_path: Path, tiny_config: ModelConfig) -> None:
    torch.manual_seed(0)
    model = save_model(tmp_path / "model", tiny_config, DiT(tiny_config), LatentAutoencoder(tiny_config))
    out = tmp_path / "demo.gif"
    demo = _script()
    assert demo.main(["--model", str(model), "--out", str(out), "--seed", "2"]) == 0

    frames = sum(n for n, _ in read_key_script(demo.TOUR))  # 180 at 30 FPS → 90 at 15
    stride = tiny_config.fps // 15
    gif = Image.open(out)
    shown = [(np.asarray(f.convert("RGB")), f.info["duration"]) for f in ImageSequence.Iterator(gif)]
    h, w = tiny_config.height, tiny_config.width
    assert len(shown) == frames // stride
    assert shown[0][0].shape == (2 * (h + demo.CAPTION), 2 * (2 * w + 2), 3)  # 2×, caption row on top
    assert sum(d for _, d in shown) == round(1000 * frames / tiny_config.fps)  # 15 FPS on average
    # the engine's half under the caption is a rendered world, and it moves under the tour's keys
    left = [f[2 * demo.CAPTION:, : 2 * w].astype(np.float32) for f, _ in shown]
    assert left[0].std() > 5 and np.abs(left[0] - left[20]).mean() > 5
    assert shown[0][0][: 2 * demo.CAPTION].std() > 5  # the caption's text
