"""``worldloop speedrun``: the budget split, the throughput probe, resume after a stop in every stage, and a
budget-driven run on ``tiny`` whose model ``worldloop play``'s loader accepts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from worldloop.app import speedrun
from worldloop.app.cli import main
from worldloop.app.loading import choose_model, load_model
from worldloop.app.speedrun import (
    EVAL_SHARE,
    HELPER_SHARE,
    SpeedrunError,
    SpeedrunOptions,
    measure,
    parse_duration,
    parse_iterations,
    split_budget,
    start,
)
from worldloop.models import checkpoint
from worldloop.models.text import PromptEncoder

pytestmark = pytest.mark.usefixtures("single_thread")
ALL = ("vae", "teacher", "cd", "dmd", "idm", "classifier", "export", "eval")
HELPERS = {"idm": 600, "classifier": 400}
FIXED = {"vae": 2, "teacher": 3, "cd": 2, "dmd": 2, "idm": 2, "classifier": 2}


def test_durations_and_fixed_iterations_parse_or_fail_in_one_line() -> None:
    assert parse_duration("90s") == 90 and parse_duration("9m") == 540 and parse_duration("1h30m") == 5400
    assert parse_duration("1.5h") == 5400
    for bad in ("9", "", "5 minutes", "0s", "-3m"):
        with pytest.raises(SpeedrunError, match="--budget"):
            parse_duration(bad)
    assert parse_iterations("teacher=5,cd=2") == {"teacher": 5, "cd": 2} and parse_iterations(None) == {}
    for bad in ("eval=3", "teacher=0", "teacher", "cd=x"):
        with pytest.raises(SpeedrunError, match="--iterations"):
            parse_iterations(bad)


def test_the_budget_is_split_by_share_and_measured_throughput() -> None:
    measured = {"vae": (0.5, 10.0), "teacher": (2.0, 20.0), "cd": (1.0, 5.0), "dmd": (4.0, 5.0)}
    plan = split_budget(1000.0, ALL, measured, {}, HELPERS)
    training = 1000.0 * (1 - EVAL_SHARE - 2 * HELPER_SHARE)
    assert math.isclose(sum(p.seconds for p in plan.values()), 1000.0)
    assert math.isclose(plan["teacher"].seconds, training * 0.5)  # the weights of the four training stages
    assert plan["teacher"].iterations == math.floor((training * 0.5 - 20.0) / 2.0)
    assert plan["vae"].iterations == math.floor((training * 0.3 - 10.0) / 0.5)
    assert plan["dmd"].seconds_per_iteration == 4.0 and plan["dmd"].overhead_s == 5.0
    assert plan["idm"].iterations == 600 and math.isclose(plan["idm"].seconds, 1000.0 * HELPER_SHARE)
    assert math.isclose(plan["eval"].seconds, 1000.0 * EVAL_SHARE) and plan["eval"].iterations == 0
    # Without the autoencoder stage the others share its time; fixed iterations are kept as given.
    no_vae = split_budget(1000.0, ALL[1:], measured, {"cd": 7, "idm": 3}, HELPERS)
    assert "vae" not in no_vae and no_vae["teacher"].seconds > plan["teacher"].seconds
    assert no_vae["cd"].iterations == 7 and no_vae["idm"].iterations == 3
    # A budget the probe used up: every stage still runs (one iteration), so the run ends in a model.
    spent = split_budget(-5.0, ALL, measured, {}, HELPERS)
    assert all(spent[s].iterations == 1 for s in ("vae", "teacher", "cd", "dmd"))
    with pytest.raises(SpeedrunError, match="no measured throughput"):
        split_budget(100.0, ALL, {}, {}, HELPERS)
    # --no-eval: neither the eval nor its helpers; the training stages get the whole budget.
    stages = SpeedrunOptions(budget_s=60.0, out="x", vae="given", evaluate=False).stages
    assert stages == ("teacher", "cd", "dmd", "export")
    trained_only = split_budget(1000.0, stages, measured, {}, HELPERS)
    assert math.isclose(sum(p.seconds for p in trained_only.values()), 1000.0)
    assert math.isclose(trained_only["teacher"].seconds, 1000.0 * 0.5 / 0.7)


class LoggingPipeline:
    """A stand-in for ``speedrun.Pipeline`` that writes the log a stage of known speed would write."""

    def __init__(self, seconds: list[float]) -> None:
        self.seconds, self.calls = seconds, []

    def train_config(self, stage: str, root: Path, iterations: int, minutes: float, log_every: int) -> Any:
        return (iterations, minutes, log_every)

    def run(self, stage: str, root: Path, cfg: Any, resume: bool) -> None:
        self.calls.append((stage, cfg, resume))
        (root / stage).mkdir(parents=True)
        lines = [{"iteration": i + 1, "seconds_per_iteration": s} for i, s in enumerate(self.seconds)]
        (root / stage / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_the_probe_takes_the_median_after_the_first_iteration(tmp_path: Path) -> None:
    pipeline = LoggingPipeline([9.0, 1.0, 3.0, 2.0])  # the first iteration compiles and warms up
    measured = measure(pipeline, tmp_path / "probe", ("teacher", "cd"), say=lambda m: None)  # type: ignore
    assert [c[0] for c in pipeline.calls] == ["teacher", "cd"]
    assert all(cfg == (speedrun.PROBE_ITERATIONS, 0.0, 1) and not resume for _, cfg, resume in pipeline.calls)
    assert measured["teacher"][0] == 2.0 and measured["teacher"][1] == 0.0  # the call took less than 15 s


class StopOnce:
    """``StopSignal`` that asks to stop at its second check (after one iteration), once per stage."""

    stage: str | None = None
    stopped: set[str] = set()

    def __init__(self) -> None:
        self.checks = 0

    @property
    def requested(self) -> bool:
        self.checks += 1
        if self.checks == 2 and StopOnce.stage not in StopOnce.stopped:
            StopOnce.stopped.add(StopOnce.stage)
            return True
        return False

    def __enter__(self) -> StopOnce:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _options(out: Path, **kw: Any) -> SpeedrunOptions:
    return SpeedrunOptions(**{"budget_s": 3600.0, "out": str(out), "preset": "tiny", "device": "cpu",
                              "iterations": FIXED, "pool_clips": 16} | kw)


def _state_dicts(model: Path) -> dict[str, torch.Tensor]:
    files = checkpoint.load_model(model)
    return {f"dit.{k}": v for k, v in files.dit.items()} | {f"vae.{k}": v for k, v in files.vae.items()}


@pytest.mark.slow
def test_a_stop_in_every_stage_then_resume_ends_in_the_same_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prompt_encoder: PromptEncoder) -> None:
    straight = start(_options(tmp_path / "straight"), resume=False, prompt_encoder=prompt_encoder,
                     say=lambda m: None)
    assert straight.stopped_in is None and straight.state["finished"]

    from worldloop.distill.stages import helpers, loop

    monkeypatch.setattr(loop, "StopSignal", StopOnce)
    monkeypatch.setattr(helpers, "StopSignal", StopOnce)
    StopOnce.stopped = set()

    def say(message: str) -> None:
        if message.startswith("speedrun: ") and "min left" in message:
            StopOnce.stage = message.split()[1]

    stops, resume = [], False
    for _ in range(20):
        result = start(_options(tmp_path / "split"), resume=resume, prompt_encoder=prompt_encoder, say=say)
        if result.stopped_in is None:
            break
        stops.append(result.stopped_in)
        resume = True
    assert stops == ["vae", "teacher", "cd", "dmd", "idm", "classifier"]
    a, b = _state_dicts(straight.model), _state_dicts(result.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for helper in ("idm", "classifier"):
        x = load_file(tmp_path / "straight" / helper / "weights.safetensors")
        y = load_file(tmp_path / "split" / helper / "weights.safetensors")
        assert all(torch.equal(x[k], y[k]) for k in x)
    runs_a = json.loads((tmp_path / "straight" / "eval" / "report.json").read_text())["runs"]
    runs_b = json.loads((tmp_path / "split" / "eval" / "report.json").read_text())["runs"]
    assert [r["horizons"] for r in runs_a] == [r["horizons"] for r in runs_b]
    done = {s: r["iterations"] for s, r in result.state["stages"].items() if s in FIXED}
    assert done == FIXED  # every stage ran its planned iterations across the stops
    with pytest.raises(SpeedrunError, match="already holds a speedrun"):
        start(_options(tmp_path / "split"), resume=False, prompt_encoder=prompt_encoder, say=lambda m: None)


@pytest.mark.slow
def test_a_short_budget_run_on_tiny_exports_a_model_play_loads(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["speedrun", "--budget", "20s", "--preset", "tiny", "--device", "cpu", "--out", str(out),
                 "--pool-clips", "16"]) == 0
    state = json.loads((out / "speedrun.json").read_text())
    assert set(state["plan"]) == set(ALL) and all(state["stages"][s]["done"] for s in ALL)
    assert all(state["plan"][s]["seconds_per_iteration"] > 0 for s in ("vae", "teacher", "cd", "dmd"))
    report = (out / "report.md").read_text()
    assert "planned iterations" in report and "PSNR" in report and (out / "curves.png").stat().st_size > 0
    wm = load_model(choose_model(out / "model", None, fallback=False))
    assert wm.steps == 1 and wm.config.name == "tiny"
    session = wm.new_session("a neon city", seed=0)
    assert wm.next_frame([session], [1]).shape == (1, 32, 32, 3)
    assert "speedrun plan" in capsys.readouterr().err
    assert main(["speedrun", "--resume", "--out", str(out)]) == 0  # a finished run: nothing to do


def test_no_eval_trains_and_exports_without_the_eval_or_its_helpers(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["speedrun", "--budget", "15s", "--preset", "tiny", "--device", "cpu", "--out", str(out),
                 "--pool-clips", "16", "--no-eval", "--iterations", "vae=2,teacher=3,cd=2,dmd=2"]) == 0
    state = json.loads((out / "speedrun.json").read_text())
    assert set(state["plan"]) == {"vae", "teacher", "cd", "dmd", "export"}
    assert not state["options"]["evaluate"]
    assert not (out / "eval").exists() and not (out / "idm").exists()
    assert "(no evaluation)" in (out / "report.md").read_text()
    assert load_model(choose_model(out / "model", None, fallback=False)).steps == 1


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["speedrun", "--preset", "tiny", "--out", str(tmp_path / "a")]) == 2
    assert "--budget" in capsys.readouterr().err
    assert main(["speedrun", "--budget", "9", "--out", str(tmp_path / "a")]) == 2
    assert "units" in capsys.readouterr().err
    assert main(["speedrun", "--resume", "--out", str(tmp_path / "none")]) == 2
    assert "no speedrun" in capsys.readouterr().err
    shipped = str(speedrun.shipped_autoencoder())
    assert main(["speedrun", "--budget", "1m", "--vae", shipped, "--preset", "tiny",
                 "--out", str(tmp_path / "b")]) == 2
    assert "autoencoder" in capsys.readouterr().err


def test_the_default_preset_reuses_the_shipped_autoencoder() -> None:
    assert speedrun.default_vae("default") == str(speedrun.shipped_autoencoder())
    assert speedrun.default_vae("tiny") is None  # another latent shape: the run trains its own
    assert "vae" not in SpeedrunOptions(1.0, "x", vae="assets/autoencoder").stages
