"""``benchmarks/held_keys.py``: models hold one key from the engine's frames beside the engine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from worldloop.models.config import preset
from worldloop.models.world_model import WorldModel

pytestmark = pytest.mark.usefixtures("single_thread")


def _held_keys():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "held_keys.py"
    spec = importlib.util.spec_from_file_location("held_keys", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_held_keys_scores_every_model_against_the_same_engine_frames(prompt_encoder) -> None:
    held_keys = _held_keys()
    models = [WorldModel.from_config(preset("tiny"), prompt_encoder=prompt_encoder, max_sessions=1)
              for _ in range(2)]
    models[1].dit.load_state_dict(models[0].dit.state_dict())  # the same weights twice: the same scores
    models[1].vae.load_state_dict(models[0].vae.state_dict())
    scores, rows = held_keys.hold(models, 1, worlds=2, marks=[1, 3])
    assert set(scores) == {(i, m) for i in (0, 1) for m in (1, 3)}
    for i in (0, 1):
        for m in (1, 3):
            assert len(scores[(i, m)]) == 2  # one per world
    assert scores[(0, 3)] == scores[(1, 3)]
    for psnr, sharp, engine_sharp, bright, engine_bright in scores[(0, 1)]:
        assert np.isfinite(psnr) and psnr < 60  # an untrained model is not the engine
        assert sharp >= 0 and engine_sharp > 0 and 0 < engine_bright < 1 and 0 <= bright <= 1
    h, w = models[0].frame_shape
    assert len(rows) == 2 * 2 and all(r.shape == (h, 3 * w, 3) and r.dtype == np.uint8 for r in rows)
    engine_first = rows[0][:, :w]
    assert engine_first.std() > 0  # the engine's frame, not a blank
