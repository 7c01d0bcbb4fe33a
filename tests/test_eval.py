"""Evaluation on the tiny preset: every metric of the report, the helpers, and the CLI's errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.train_fakes import FakePromptEncoder, random_model_dir
from worldloop.app.cli import main
from worldloop.distill.data.clips import ClipPool, WorldClips
from worldloop.distill.eval.evaluate import EvalConfig, horizon_metrics, run_eval
from worldloop.distill.eval.evaluators import EvaluatorNet, load_evaluator, save_evaluator
from worldloop.distill.stages.helpers import default_config, train_evaluator
from worldloop.distill.stages.runtime import TrainConfig, setup_distributed
from worldloop.distill.world.themes import THEMES
from worldloop.models.checkpoint import CheckpointError
from worldloop.models.config import preset
from worldloop.models.keys import KEYS

TINY = preset("tiny")


pytestmark = pytest.mark.usefixtures("single_thread")


def test_tiny_idm_beats_chance_on_held_out_engine_frames(tmp_path: Path) -> None:
    train = ClipPool(WorldClips(32, 32, 8, random_keys=0.5), clips=32, frames=4, chunk=32, refresh_every=0)
    held_out = WorldClips(32, 32, 4, held_out=True, random_keys=1.0)
    cfg = TrainConfig(iterations=60, batch_size=8, lr=3e-3, warmup=0, clip_frames=4,
                      out=str(tmp_path / "idm"), log_every=20, device="cpu")
    torch.manual_seed(0)
    _, acc = train_evaluator(default_config("idm", 32, 32, KEYS), cfg, train, held_out,
                             setup_distributed("cpu"), eval_batches=2, eval_batch_size=8)
    assert acc["per_key"] > acc["chance_per_key"] + 0.03, acc
    model = load_evaluator(tmp_path / "idm", "idm")
    assert model.config.labels == KEYS
    with pytest.raises(CheckpointError, match="not 'classifier'"):
        load_evaluator(tmp_path / "idm", "classifier")


def test_eval_reports_every_metric(tmp_path: Path) -> None:
    model = random_model_dir(TINY, tmp_path / "model")
    torch.manual_seed(0)
    save_evaluator(EvaluatorNet(default_config("idm", 32, 32, KEYS)), tmp_path / "idm")
    save_evaluator(EvaluatorNet(default_config("classifier", 32, 32, THEMES)), tmp_path / "classifier")
    cfg = EvalConfig(episodes=2, horizons=(1, 2, 4), switch_frames=3, drift_seconds=0.2, drift_sessions=1,
                     drift_every=3)
    out = tmp_path / "eval"
    report = run_eval([(model, 1), (model, 2)], cfg, out, idm_path=tmp_path / "idm",
                      classifier_path=tmp_path / "classifier", device=torch.device("cpu"),
                      prompt_encoder=FakePromptEncoder(TINY.dit.max_prompt_tokens))
    assert json.loads((out / "report.json").read_text())["config"]["episodes"] == 2
    assert [r["steps"] for r in report["runs"]] == [1, 2]
    for run in report["runs"]:
        assert set(run["horizons"]) == {"1", "2", "4"}
        for h in run["horizons"].values():
            assert set(h) == {"psnr", "ssim", "copy_last_psnr", "copy_last_ssim", "psnr_gain", "psnr_gain_se",
                              "sharpness_ratio"}
            assert h["sharpness_ratio"] > 0
            assert 0 < h["psnr"] < 100 and -1 <= h["ssim"] <= 1 and h["copy_last_psnr"] > 0
            assert h["psnr_gain"] == pytest.approx(h["psnr"] - h["copy_last_psnr"], abs=1e-4)
            assert h["psnr_gain_se"] >= 0
        assert set(run["keys"]) == {"model", "engine"} and 0 <= run["keys"]["model"]["per_key"] <= 1
        start = run["prompt_start"]  # the same rollout from the prompt alone
        assert start["context_frames"] == 0 and set(start["horizons"]) == {"1", "2", "4"}
        assert 0 <= start["theme_accuracy"] <= 1 and 0 < start["horizons"]["4"]["psnr"] < 100
        switch = run["prompt_switch"]
        assert 0 <= switch["adherence"] <= 1 and 0 <= switch["engine_theme_accuracy"] <= 1
        drift = run["drift"]
        assert drift["frames"] == 6 and [p["frame"] for p in drift["points"]] == [1, 4, 6]
        point = drift["points"][-1]["model"]
        assert {"sharpness", "colour_mean", "colour_std", "saturation", "confidence"} <= set(point)
        assert "model_sharpness_last" in drift["summary"] and run["notes"] == []
        ceiling = run["autoencoder"]  # the model's autoencoder alone, beside every row
        assert ceiling["latent"]["shape"] == [4, 8, 8] and 0 < ceiling["psnr"] < 100
        assert ceiling["picture"] == "autoencoder_0.png" and ceiling["sharpness_ratio"] > 0
    for name in ("rollout_0.mp4", "rollout_1.mp4", "drift_0.mp4", "horizons.png", "drift.png",
                 "autoencoder_0.png"):
        assert (out / name).stat().st_size > 0
    summary = (out / "summary.md").read_text()
    table = [line for line in summary.split("Autoencoder only")[0].splitlines() if line.startswith("|")]
    assert len(table) == 2 + 1 + 2 * 2 and table[2].startswith("| copy last frame | – | ")
    assert table[4].startswith("| … from the prompt alone (no context frames; theme accuracy")
    assert "sharpness h4" in table[0]
    ceiling_rows = [ln for ln in summary.split("Autoencoder only")[1].splitlines() if ln.startswith("|")]
    assert len(ceiling_rows) == 3 and f"{report['runs'][0]['autoencoder']['psnr']:.2f}" in ceiling_rows[2]
    h1 = report["runs"][0]["horizons"]["1"]
    cell = f"{h1['psnr']:.2f} ({h1['psnr_gain']:+.2f} ± {h1['psnr_gain_se']:.2f})"
    assert table[3].split(" | ")[1:3] == ["1", cell]


def test_horizon_gain_over_copy_last_and_its_standard_error() -> None:
    rng = np.random.default_rng(0)
    engine = rng.integers(0, 256, (3, 2, 8, 8, 3), dtype=np.uint8)
    last = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    as_copy = horizon_metrics(np.repeat(last[:, None], 2, 1), engine, last, (1, 2))["2"]
    assert as_copy["psnr_gain"] == 0 and as_copy["psnr_gain_se"] == 0
    exact = horizon_metrics(engine.copy(), engine, last, (1, 2))["1"]
    assert exact["psnr"] == 100.0 and exact["psnr_gain"] > 80 and exact["psnr_gain_se"] < 5
    assert horizon_metrics(engine[:1], engine[:1], last[:1], (1,))["1"]["psnr_gain_se"] is None


def test_eval_without_helpers_still_reports(tmp_path: Path) -> None:
    model = random_model_dir(TINY, tmp_path / "model")
    cfg = EvalConfig(episodes=1, horizons=(1,), switch_frames=1, drift_seconds=0.05, drift_sessions=1)
    report = run_eval([(model, None)], cfg, tmp_path / "eval", idm_path=None,
                      classifier_path=tmp_path / "none", device=torch.device("cpu"),
                      prompt_encoder=FakePromptEncoder(TINY.dit.max_prompt_tokens))
    run = report["runs"][0]
    assert "skipped" in run["keys"] and "skipped" in run["prompt_switch"] and len(run["notes"]) == 2
    assert run["horizons"]["1"]["copy_last_psnr"] > 0


def test_eval_of_an_autoencoder_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = random_model_dir(TINY, tmp_path / "model")
    assert main(["eval", "--autoencoder", str(model), "--out", str(tmp_path / "ae")]) == 0
    row = json.loads((tmp_path / "ae" / "report.json").read_text())["autoencoder_only"][0]
    assert row["eval_frames"] == 128 and set(row["psnr_by_theme"]) <= set(THEMES)
    assert (tmp_path / "ae" / row["picture"]).stat().st_size > 0
    assert "sharpness ratio" in capsys.readouterr().out
    assert main(["eval", "--autoencoder", str(model), str(model)]) == 2
    assert main(["eval", "--autoencoder", str(tmp_path / "missing")]) == 2
    assert main(["eval"]) == 2


def test_eval_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert main(["eval", str(tmp_path), "--horizons", "0,4"]) == 2
    assert main(["eval", str(tmp_path), "--steps", "two"]) == 2
    assert main(["eval", str(tmp_path), "--device", "cpu", "--drift-seconds", "0"]) == 2
    assert main(["eval", f"{tmp_path}@1,x"]) == 2
    assert main(["eval", f"{tmp_path / 'missing'}@2"]) == 2
    assert main(["eval", str(tmp_path), "--device", "cpu", "--context-sigma", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "not a model directory" in err and "--horizons" in err and "--steps" in err
    assert "--drift-seconds" in err and "--context-sigma" in err and len(err.strip().splitlines()) == 7
