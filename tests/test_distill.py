"""Distillation on the tiny preset: a CD and a DMD step train, resume exactly, roll out through WorldModel,
and the exported student plays in WorldModel with 1 and 2 steps."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.train_fakes import FakeClips, FakePromptEncoder, perturbed_model_dir
from worldloop.app.cli import main
from worldloop.distill.stages import cd as cd_stage
from worldloop.distill.stages import dmd as dmd_stage
from worldloop.distill.stages.cd import CDObjective, cd_loss, draw, train_cd
from worldloop.distill.stages.dmd import DMDObjective, train_dmd
from worldloop.distill.stages.run import read_checkpoint
from worldloop.distill.stages.runtime import TrainConfig, setup_distributed
from worldloop.distill.stages.shared import export_student, load_dit, student_config
from worldloop.models import checkpoint
from worldloop.models.config import SamplingConfig, preset
from worldloop.models.dit import DiT
from worldloop.models.kv_cache import KVCache
from worldloop.models.sampling import sigma_grid
from worldloop.models.vae import LatentAutoencoder
from worldloop.models.world_model import WorldModel

REPO = Path(__file__).resolve().parents[1]
TEACHER = preset("tiny").replace(sampling=SamplingConfig(steps=4, first_frame_steps=4))
STUDENT = student_config(TEACHER, steps=2, first_frame_steps=2)
ENCODER = FakePromptEncoder(TEACHER.dit.max_prompt_tokens)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return perturbed_model_dir(TEACHER, tmp_path_factory.mktemp("teacher"), seed=0)


@pytest.fixture(scope="module")
def bidirectional(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = TEACHER.replace(dit=replace(TEACHER.dit, bidirectional=True))
    return perturbed_model_dir(config, tmp_path_factory.mktemp("bidirectional"), seed=1)


def _cfg(out: Path, **kw: Any) -> TrainConfig:
    base = TrainConfig(iterations=1, batch_size=2, lr=1e-3, warmup=0, clip_frames=3, out=str(out),
                       log_every=1, sample_every=0, checkpoint_every=100, device="cpu", pool_clips=0,
                       ema_decay=0.9)
    return replace(base, **kw)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _cd(out: Path, teacher: Path, resume: bool = False, **kw: Any) -> Path:
    objective = CDObjective(grid_steps=8, guidance=2.0, shift=5.0)
    return train_cd(STUDENT, _cfg(out, **kw), objective, setup_distributed("cpu"), teacher_dir=teacher,
                    resume=resume, prompt_encoder=ENCODER, clips=FakeClips(32, 32, 3)).model_dir


def _dmd(out: Path, teacher: Path, resume: bool = False, objective: DMDObjective | None = None,
         real: Path | None = None, **kw: Any) -> Path:
    objective = objective or DMDObjective(guidance=2.0, critic_steps=1, critic_lr=1e-3, grad_frames=2)
    result = train_dmd(STUDENT, _cfg(out, **kw), objective, setup_distributed("cpu"), teacher_dir=teacher,
                       real_dir=real, resume=resume, prompt_encoder=ENCODER, clips=FakeClips(32, 32, 3))
    return result.model_dir


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in before if not torch.equal(before[k].float(), after[k].float())}


def test_cd_step_trains_the_student_and_exports_its_step_count(teacher: Path, tmp_path: Path) -> None:
    out = _cd(tmp_path / "cd", teacher)
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in _log(tmp_path / "cd"))
    files = checkpoint.load_model(out)
    changed = _changed(checkpoint.load_model(teacher).dit, files.dit)
    assert {"blocks.0.qkv.weight", "final.linear.weight"} <= changed
    assert files.config.sampling.steps == 2 and files.config.sampling.guidance == 1.0
    assert files.metadata["stage"] == "cd" and files.metadata["student_steps"] == 2


def test_cd_loss_is_zero_at_the_boundary_when_the_student_is_the_teacher(teacher: Path) -> None:
    # Student = EMA = teacher, no guidance, n = N − 1: the target is the teacher's own x0 step to σ = 0.
    _, dit = load_dit(teacher, torch.device("cpu"))
    objective = CDObjective(grid_steps=4, guidance=1.0)
    x0 = torch.randn(2, 3, TEACHER.latent_channels, *TEACHER.latent_size)
    keys = torch.zeros(2, 3, 6)
    prompt = ENCODER.encode(["a", "b"])
    d = draw(objective, x0.shape, torch.Generator().manual_seed(0), torch.device("cpu"))
    grid = sigma_grid(4, 5.0)
    args = (cd_stage.StudentX0(dit), dit, dit, x0, keys, prompt, grid)
    with torch.no_grad():
        boundary = cd_loss(*args, replace(d, index=torch.full((2,), 3)), objective, 0.0)
        inside = cd_loss(*args, replace(d, index=torch.full((2,), 1)), objective, 0.0)
    assert boundary.item() == pytest.approx(0.0, abs=1e-10) and inside.item() > 1e-6


def test_cd_resume_gives_the_same_next_step_loss(teacher: Path, tmp_path: Path) -> None:
    _cd(tmp_path / "straight", teacher, iterations=2)
    _cd(tmp_path / "split", teacher, iterations=1)
    _cd(tmp_path / "split", teacher, resume=True, iterations=2)
    straight, split = _log(tmp_path / "straight"), _log(tmp_path / "split")
    assert [r["iteration"] for r in split] == [1, 2]
    assert split[1]["loss"] == pytest.approx(straight[1]["loss"], rel=1e-6, abs=1e-9)


def test_dmd_step_trains_student_and_critic_through_the_world_model_rollout(
        teacher: Path, bidirectional: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rollouts: list[dict[str, Any]] = []
    appends: list[int] = []
    rollout, append = WorldModel.rollout_latents, KVCache.append

    def spy_rollout(self: WorldModel, sessions: Any, keys: torch.Tensor, **kw: Any) -> torch.Tensor:
        prompt = kw.get("prompt")
        rollouts.append({"frames": keys.shape[1], "first_frame_steps": self.config.sampling.first_frame_steps,
                         "grad_frames": kw.get("grad_frames"),
                         "prompt_with_grad": prompt is not None and prompt.k.requires_grad})
        return rollout(self, sessions, keys, **kw)

    def spy_append(self: KVCache, *args: Any, **kw: Any) -> None:
        appends.append(1)
        append(self, *args, **kw)

    monkeypatch.setattr(WorldModel, "rollout_latents", spy_rollout)
    monkeypatch.setattr(KVCache, "append", spy_append)
    objective = DMDObjective(guidance=2.0, critic_steps=5, critic_lr=1e-3, grad_frames=2)
    out = _dmd(tmp_path / "dmd", teacher, objective=objective, real=bidirectional)
    assert rollouts == [{"frames": 3, "first_frame_steps": 2, "grad_frames": 2, "prompt_with_grad": True}]
    assert len(appends) >= 2  # frames 0 and 1 were written to the cache before frame 2 was generated
    record = _log(tmp_path / "dmd")[0]
    assert math.isfinite(record["generator_loss"]) and math.isfinite(record["critic_loss"])
    start = checkpoint.load_model(teacher).dit
    student = _changed(start, checkpoint.load_model(out).dit)
    assert {"blocks.0.qkv.weight", "final.linear.weight"} <= student
    assert {"blocks.0.cross_kv.weight", "text_proj.weight"} <= student  # the prompt path trains too
    state = read_checkpoint(tmp_path / "dmd" / "checkpoint.pt", "dmd")
    assert {"blocks.0.qkv.weight", "final.linear.weight"} <= _changed(start, state["modules"]["critic"])
    assert state["settings"]["real"] == str(bidirectional)


def test_dmd_resume_gives_the_same_next_step_losses(teacher: Path, tmp_path: Path) -> None:
    _dmd(tmp_path / "straight", teacher, iterations=2)
    _dmd(tmp_path / "split", teacher, iterations=1)
    _dmd(tmp_path / "split", teacher, resume=True, iterations=2)
    straight, split = _log(tmp_path / "straight"), _log(tmp_path / "split")
    assert [r["iteration"] for r in split] == [1, 2]
    for key in ("generator_loss", "critic_loss", "exit_steps"):
        assert split[1][key] == pytest.approx(straight[1][key], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("steps", [1, 2])
def test_exported_student_plays_in_world_model(teacher: Path, tmp_path: Path, steps: int) -> None:
    files = checkpoint.load_model(teacher)
    config = student_config(TEACHER, steps=steps, first_frame_steps=3)
    dit, vae = DiT(config), LatentAutoencoder(config)
    checkpoint.load_into(dit, files.dit, teacher)
    checkpoint.load_into(vae, files.vae, teacher)
    out = export_student(tmp_path / "student", config, dit, dit, vae, stage="cd", iteration=1, meta={})
    wm = WorldModel.from_pretrained(out, prompt_encoder=ENCODER, precision="fp32", max_sessions=1)
    assert wm.steps == steps
    session = wm.new_session("a dungeon", seed=0)
    frames = [wm.next_frame([session], [1])]
    assert wm.last_timings.forwards == 3  # the first frame's extra steps
    frames += [wm.next_frame([session], [k]) for k in (1, 16, 0)]
    assert wm.last_timings.forwards == steps
    assert all(f.shape == (1, 32, 32, 3) and f.dtype.name == "uint8" for f in frames)


def test_student_config_rules() -> None:
    assert student_config(TEACHER, 1, 4).sampling == replace(TEACHER.sampling, steps=1, first_frame_steps=4)
    with pytest.raises(ValueError, match="1 or 2"):
        student_config(TEACHER, 3, 4)
    with pytest.raises(ValueError, match="causal"):
        student_config(TEACHER.replace(dit=replace(TEACHER.dit, bidirectional=True)), 1, 4)


def test_no_distillation_module_runs_its_own_sampling_loop() -> None:
    """One rollout loop: only models/ drives the cache or the per-frame sampler."""
    forbidden = ("forward_cached", "sample_frame", "KVCache", "cache.append", "write_pending")
    for folder in ("distill", "app", "streaming"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            assert not [w for w in forbidden if w in text], path


@pytest.fixture
def fake_cli_encoder(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(cd_stage, "PromptEncoder", FakePromptEncoder)
    monkeypatch.setattr(dmd_stage, "PromptEncoder", FakePromptEncoder)
    yield


def test_cli_runs_cd_and_reports_errors_in_one_line(teacher: Path, bidirectional: Path, tmp_path: Path,
                                                    fake_cli_encoder: None,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    base = ["distill", "cd", "--device", "cpu", "--iterations", "1", "--batch-size", "1",
            "--clip-frames", "2", "--pool-clips", "0", "--grid-steps", "4", "--student-steps", "1"]
    assert main([*base, "--teacher", str(teacher), "--out", str(tmp_path / "cd")]) == 0
    config, metadata = checkpoint.read_config(tmp_path / "cd" / "model")
    assert config.sampling.steps == 1 and metadata["step"] == 1
    dmd = ["distill", "dmd", "--device", "cpu", "--iterations", "1", "--batch-size", "1",
           "--clip-frames", "2", "--pool-clips", "0", "--grad-frames", "1", "--teacher", str(teacher),
           "--real", str(bidirectional),
           "--student", str(tmp_path / "cd" / "model"), "--out", str(tmp_path / "dmd")]
    assert main(dmd) == 0
    config, metadata = checkpoint.read_config(tmp_path / "dmd" / "model")
    assert config.sampling.steps == 1 and metadata["stage"] == "dmd" and metadata["step"] == 1
    assert main([*base, "--teacher", str(tmp_path / "missing"), "--out", str(tmp_path / "a")]) == 2
    assert main([*base, "--teacher", str(bidirectional), "--out", str(tmp_path / "b")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 2 and "missing" in errors[0] and "causal" in errors[1]
