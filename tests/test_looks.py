"""The bank of looks (``distill/stages/looks.py``, ``models/surface_memory.Looks``): built from the engine's
truth, stored small, read back as written, and a prompt finds a world of its own theme."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.test_camera import CAMERA
from worldloop.distill.stages.looks import bank_worlds, build_looks
from worldloop.distill.world.themes import THEME_TABLE, THEMES, describe, sample_params
from worldloop.models import surface_memory as sm
from worldloop.models.text import PromptEncoder

TEXELS = 16
CAM = replace(CAMERA, depth_memory=1.0, surface_memory=TEXELS, memory_colour=0.3)


@pytest.fixture(scope="module")
def bank() -> tuple[sm.Looks, list]:
    worlds = bank_worlds(1)
    return build_looks(CAM, 64, 64, worlds, 24, PromptEncoder(16)), worlds


@pytest.mark.parametrize("per_theme", [1, 3])
def test_the_bank_shows_every_pattern_of_every_theme(per_theme: int) -> None:
    worlds = bank_worlds(per_theme)
    for name in THEMES:
        theme, chosen = THEME_TABLE[name], [w for w in worlds if w.theme == name]
        assert len(chosen) >= per_theme
        for kind, options in (("wall", theme.walls), ("floor", theme.floors), ("ceiling", theme.ceilings)):
            shown = {getattr(w, kind).pattern for w in chosen}
            assert shown == {s.pattern for s in options}, (name, kind)
    assert all(w.seed < 2**30 for w in worlds)  # training seeds: the eval's worlds are not among them
    assert [w.seed for w in bank_worlds(per_theme)] == [w.seed for w in worlds]  # the same every time
    with pytest.raises(ValueError, match="per-theme"):
        bank_worlds(0)


def test_a_built_bank_holds_each_worlds_texture_and_finds_a_prompts_theme(bank) -> None:
    looks, worlds = bank
    k, atlas = len(worlds), sm.atlas_size(TEXELS)
    assert looks.detail.shape == (k, 3, atlas) and looks.confidence.shape == (k, 2, atlas)
    planes = 3 * TEXELS * TEXELS
    # 24 frames see every wall texel (one texture across all walls) and most of the floor's.
    assert float(looks.confidence[:, 0, :TEXELS * TEXELS].mean()) > 0.95
    assert float(looks.detail[:, :, :planes].abs().mean()) > 0.03  # texture, not a flat mean
    assert torch.isfinite(looks.colour).all() and float(looks.fog[:, 3].max()) > 0  # some theme has fog
    encoder = PromptEncoder(16)
    for seed in range(2**30 + 10, 2**30 + 24):  # held-out worlds' prompts
        params = sample_params(seed)
        entry = sm.nearest_look(looks, encoder.encode([describe(params)]).tokens[0, 0])
        assert entry is not None and worlds[entry].theme == params.theme
    assert sm.nearest_look(looks, encoder.encode(["the moon"]).tokens[0, 0]) is None  # near no world


def test_a_bank_reads_back_as_written_and_other_files_are_refused(bank, tmp_path: Path) -> None:
    looks, _ = bank
    full, small = tmp_path / "full.safetensors", tmp_path / "small.safetensors"
    sm.save_looks(full, looks, TEXELS)
    back = sm.load_looks(full, TEXELS)
    step = 1 / sm.LOOK_DETAIL_STEP
    assert float((back.detail - looks.detail.clamp(-127 * step, 127 * step)).abs().max()) <= 0.5 * step + 1e-6
    assert float((back.colour - looks.colour).abs().max()) <= sm.LOOK_COLOUR_TOP / 255
    assert torch.allclose(back.fog, looks.fog) and torch.allclose(back.prompts, looks.prompts, atol=1e-3)
    sm.save_looks(small, looks, TEXELS, sky_texels=4, colour_texels=4)
    assert small.stat().st_size < 0.6 * full.stat().st_size
    reduced = sm.load_looks(small, TEXELS)
    assert reduced.detail.shape == looks.detail.shape
    planes = 3 * TEXELS * TEXELS  # the walls', floor's and ceiling's detail is kept whole
    assert torch.allclose(reduced.detail[..., :planes], back.detail[..., :planes])
    with pytest.raises(ValueError, match="texels per tile"):
        sm.load_looks(small, 2 * TEXELS)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a bank")
    with pytest.raises(ValueError, match="not a bank of looks"):
        sm.load_looks(bad, TEXELS)
    with pytest.raises(ValueError, match="colour_texels"):
        sm.save_looks(small, looks, TEXELS, colour_texels=2 * TEXELS)


def test_worldloop_looks_writes_a_bank_the_model_loads_and_export_keeps(tmp_path: Path, capsys) -> None:
    from tests.test_camera import _delta
    from tests.train_fakes import random_model_dir
    from worldloop.app.cli import main
    from worldloop.models.checkpoint import CheckpointError, export_model
    from worldloop.models.config import preset
    from worldloop.models.world_model import WorldModel

    plain = random_model_dir(preset("tiny"), tmp_path / "plain")
    assert main(["looks", "--model", str(plain), "--frames", "4"]) == 2  # no surface memory: no use for looks
    assert "no surface memory" in capsys.readouterr().err
    config = _delta(preset("tiny")).replace(camera=CAM)
    model = random_model_dir(config, tmp_path / "model")
    assert main(["looks", "--model", str(model), "--frames", "4", "--sky-texels", "4"]) == 0
    assert "17 worlds × 4 frames" in capsys.readouterr().out
    wm = WorldModel.from_pretrained(model)
    assert wm.looks is not None and wm.looks.prompts.shape[0] == 17
    assert main(["looks", "--model", str(model), "--colour-texels", "0"]) == 2
    out = export_model(model, tmp_path / "shipped")
    assert (out / sm.LOOKS_FILE).read_bytes() == (model / sm.LOOKS_FILE).read_bytes()
    (out / sm.LOOKS_FILE).write_bytes((out / sm.LOOKS_FILE).read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="not a bank of looks"):
        WorldModel.from_pretrained(out)
