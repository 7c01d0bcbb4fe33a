"""Training stages on the tiny preset: a step learns, resuming is exact, SIGTERM leaves a checkpoint."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.train_fakes import FakeClips, FakePromptEncoder, random_model_dir
from worldloop.app.cli import main
from worldloop.distill.data.clips import ClipPool, EpisodeClips, WorldClips
from worldloop.distill.data.episodes import EpisodeMeta, PromptChange, write_episode
from worldloop.distill.stages.run import RunError, logged_cpu_minutes, read_checkpoint
from worldloop.distill.stages.runtime import TrainConfig, lr_at, setup_distributed
from worldloop.distill.stages.teacher import TeacherLoss, TeacherObjective, draw, train_teacher
from worldloop.distill.stages.vae import VAEObjective, train_vae
from worldloop.distill.world.themes import THEMES
from worldloop.models import checkpoint
from worldloop.models.checkpoint import CheckpointError
from worldloop.models.config import preset
from worldloop.models.dit import DiT
from worldloop.models.world_model import WorldModel

TINY = preset("tiny")
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_thread")


def _cfg(out: Path, **kw: object) -> TrainConfig:
    base = TrainConfig(iterations=2, batch_size=2, lr=1e-3, warmup=0, clip_frames=4, out=str(out),
                       log_every=1, sample_every=0, checkpoint_every=100, device="cpu", pool_clips=0)
    return replace(base, **kw)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _teacher(out: Path, vae: Path, resume: bool = False, **kw: object) -> Path:
    return train_teacher(TINY, _cfg(out, **kw), TeacherObjective(), setup_distributed("cpu"), vae_from=vae,
                         resume=resume, prompt_encoder=FakePromptEncoder(TINY.dit.max_prompt_tokens),
                         clips=FakeClips(32, 32, 4)).model_dir


def test_vae_step_learns_and_exports(tmp_path: Path) -> None:
    out = train_vae(TINY, _cfg(tmp_path / "vae"), VAEObjective(), setup_distributed("cpu"),
                    clips=FakeClips(32, 32, 2)).model_dir
    assert all(math.isfinite(r["loss"]) for r in _log(tmp_path / "vae"))
    files = checkpoint.load_model(out, need_dit=False)
    assert files.metadata["stage"] == "vae" and files.metadata["step"] == 2 and files.dit is None
    with pytest.raises(CheckpointError, match="holds only an autoencoder"):
        checkpoint.load_model(out)  # what play, export and distillation call: a clear error
    torch.manual_seed(0)
    from worldloop.models.vae import LatentAutoencoder

    init = LatentAutoencoder(TINY).state_dict()
    assert not torch.equal(files.vae["decoder.layers.0.weight"], init["decoder.layers.0.weight"])
    assert files.vae["latent_scale"].item() != 1.0  # calibrated on frames


def test_teacher_step_learns_and_exports_a_playable_model(tmp_path: Path) -> None:
    vae = random_model_dir(TINY, tmp_path / "vae")
    out = _teacher(tmp_path / "t", vae, iterations=3)  # adaLN-Zero: attention gets gradients from iteration 3
    assert all(math.isfinite(r["loss"]) for r in _log(tmp_path / "t"))
    files = checkpoint.load_model(out)
    torch.manual_seed(0)
    init = DiT(TINY).state_dict()
    changed = [k for k in init if not torch.equal(files.dit[k], init[k])]
    assert "final.linear.weight" in changed and "blocks.0.qkv.weight" in changed
    assert files.dit_ema is not None and files.dit_ema["final.linear.weight"].dtype == torch.bfloat16
    wm = WorldModel.from_pretrained(out, prompt_encoder=FakePromptEncoder(TINY.dit.max_prompt_tokens))
    session = wm.new_session("a dungeon", seed=1)
    assert wm.next_frame([session], [1]).shape == (1, 32, 32, 3)


def test_bidirectional_teacher_loss_trains() -> None:
    config = TINY.replace(dit=replace(TINY.dit, bidirectional=True))
    torch.manual_seed(0)
    loss_module = TeacherLoss(DiT(config))
    x0 = torch.randn(2, 3, TINY.latent_channels, *TINY.latent_size)
    keys = torch.randint(0, 2, (2, 3, 6)).float()
    tokens, mask = torch.randn(2, 4, 384), torch.ones(2, 4, dtype=torch.bool)
    draws = draw(TeacherObjective(), x0.shape, torch.Generator().manual_seed(0), torch.device("cpu"))
    frame_loss = loss_module(x0, keys, tokens, mask, draws)
    assert frame_loss.shape == (2, 3)
    loss = frame_loss.mean()
    loss.backward()
    assert math.isfinite(loss.item()) and loss_module.dit.final.linear.weight.grad.abs().sum() > 0


def test_resume_continues_exactly(tmp_path: Path) -> None:
    vae = random_model_dir(TINY, tmp_path / "vae")
    _teacher(tmp_path / "straight", vae, iterations=3)
    _teacher(tmp_path / "split", vae, iterations=2)
    _teacher(tmp_path / "split", vae, resume=True, iterations=3)
    straight, split = _log(tmp_path / "straight"), _log(tmp_path / "split")
    assert [r["iteration"] for r in split] == [1, 2, 3]
    assert abs(straight[2]["loss"] - split[2]["loss"]) <= 1e-6
    a = read_checkpoint(tmp_path / "straight" / "checkpoint.pt", "teacher")
    b = read_checkpoint(tmp_path / "split" / "checkpoint.pt", "teacher")
    weights_a, weights_b = a["modules"]["dit"], b["modules"]["dit"]
    assert all(torch.allclose(weights_a[k], weights_b[k], atol=1e-6) for k in weights_a)


def test_a_resumed_run_counts_cpu_minutes_and_snapshots_over_its_segments(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run continued day after day keeps one CPU-minute clock: the log, the checkpoint and the snapshot
    names go on from the earlier segments' total (``--cpu-minutes`` still budgets each segment)."""
    import worldloop.distill.stages.loop as loop

    clock = [1000.0]

    def cpu_seconds() -> float:  # a process clock that every reading advances by 0.6 s: no timing in the test
        clock[0] += 0.6
        return clock[0]

    monkeypatch.setattr(loop, "cpu_seconds", cpu_seconds)
    vae = random_model_dir(TINY, tmp_path / "vae")
    run = tmp_path / "run"
    every = 0.1  # 6 s: a snapshot every few iterations; the second segment is shorter than the first, so a
    # clock restarted at 0 would give its snapshots the first segment's names

    def snapshots() -> dict[str, int]:  # name → when its weights were written
        return {p.name: (p / "config.json").stat().st_mtime_ns for p in (run / "snapshots").iterdir()}

    _teacher(run, vae, iterations=8, snapshot_minutes=every)
    first = snapshots()
    spent = read_checkpoint(run / "checkpoint.pt", "teacher")["cpu_minutes"]
    assert spent + 5e-4 >= _log(run)[-1]["cpu_minutes"] > 0 and len(first) >= 2  # the log rounds to 0.001
    _teacher(run, vae, resume=True, iterations=12, snapshot_minutes=every)
    log = _log(run)
    assert [r["iteration"] for r in log] == list(range(1, 13))
    assert log[8]["cpu_minutes"] >= spent  # the clock goes on, it does not restart at 0
    after = snapshots()
    assert all(after.get(name) == written for name, written in first.items())  # none overwritten
    new = set(after) - set(first)
    assert new and min(new) > max(first), (sorted(first), sorted(new))
    assert read_checkpoint(run / "checkpoint.pt", "teacher")["cpu_minutes"] + 5e-4 >= log[-1]["cpu_minutes"]


def test_cpu_minutes_of_a_checkpoint_without_them_come_from_its_log(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    records = [(10, 1.0), (20, 2.0), (30, 0.5), (40, 1.5), (50, 2.5)]  # a resume after iteration 20
    lines = [json.dumps({"iteration": i, "cpu_minutes": m}) for i, m in records]
    log.write_text("\n".join([*lines[:3], '{"iteration": 35, "cpu_min', *lines[3:]]) + "\n")
    assert logged_cpu_minutes(log, 40) == pytest.approx(2.0 + 1.5)
    assert logged_cpu_minutes(log, 20) == pytest.approx(2.0)
    assert logged_cpu_minutes(tmp_path / "none.jsonl", 40) == 0.0
    vae = random_model_dir(TINY, tmp_path / "vae")
    run = tmp_path / "old"
    _teacher(run, vae, iterations=2)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    del state["cpu_minutes"]  # as written before checkpoints recorded them
    torch.save(state, run / "checkpoint.pt")
    (run / "log.jsonl").write_text("\n".join(json.dumps({"iteration": i, "cpu_minutes": 7.0 + i})
                                             for i in (1, 2)) + "\n")
    _teacher(run, vae, resume=True, iterations=3)
    assert _log(run)[-1]["cpu_minutes"] >= 9.0


def test_a_checkpoint_from_before_a_config_section_resumes(tmp_path: Path) -> None:
    """A run checkpointed before the model config had its ``camera`` section resumes (it trained with that
    section's defaults); a checkpoint whose model differs still does not."""
    vae = random_model_dir(TINY, tmp_path / "vae")
    _teacher(tmp_path / "old", vae, iterations=1)
    path = tmp_path / "old" / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    del state["settings"]["model"]["camera"]
    torch.save(state, path)
    _teacher(tmp_path / "old", vae, resume=True, iterations=2)
    assert [r["iteration"] for r in _log(tmp_path / "old")] == [1, 2]
    state = torch.load(path, weights_only=False)
    state["settings"]["model"]["dit"]["depth"] += 1
    torch.save(state, path)
    with pytest.raises(RunError, match="model settings differ"):
        _teacher(tmp_path / "old", vae, resume=True, iterations=3)


def test_init_from_carries_weights_and_ema_with_a_fresh_optimizer(tmp_path: Path) -> None:
    vae = random_model_dir(TINY, tmp_path / "vae")
    first = _teacher(tmp_path / "first", vae, iterations=2)
    config = replace(_cfg(tmp_path / "second"), iterations=1, lr=1e-12)  # the step barely moves the weights
    result = train_teacher(TINY, config, TeacherObjective(), setup_distributed("cpu"), vae_from=None,
                           init_from=first, prompt_encoder=FakePromptEncoder(16), clips=FakeClips(32, 32, 4))
    before, after = checkpoint.load_model(first), checkpoint.load_model(result.model_dir)
    assert torch.allclose(before.dit["final.linear.weight"], after.dit["final.linear.weight"], atol=1e-9)
    assert after.metadata["previous_steps"] == 2 and after.metadata["step"] == 1
    state = read_checkpoint(tmp_path / "second" / "checkpoint.pt", "teacher")
    assert all(s["step"].item() == 1 for s in state["optimizer"]["state"].values())  # a fresh AdamW
    resumed = train_teacher(TINY, replace(config, iterations=2), TeacherObjective(), setup_distributed("cpu"),
                            vae_from=None, init_from=first, resume=True, prompt_encoder=FakePromptEncoder(16),
                            clips=FakeClips(32, 32, 4))
    again = checkpoint.load_model(resumed.model_dir)  # resuming still counts the steps it started from
    assert again.metadata["previous_steps"] == 2 and again.metadata["step"] == 2


def test_run_directory_and_checkpoint_errors(tmp_path: Path) -> None:
    vae = random_model_dir(TINY, tmp_path / "vae")
    with pytest.raises(RunError, match="no checkpoint"):
        _teacher(tmp_path / "t", vae, resume=True)
    _teacher(tmp_path / "t", vae, iterations=1)
    with pytest.raises(RunError, match="already holds a run"):
        _teacher(tmp_path / "t", vae, iterations=1)
    objective = TeacherObjective(context_noise=0.2)
    with pytest.raises(RunError, match="differ"):
        train_teacher(TINY, _cfg(tmp_path / "t"), objective, setup_distributed("cpu"), vae_from=vae,
                      resume=True, prompt_encoder=FakePromptEncoder(16), clips=FakeClips(32, 32, 4))
    (tmp_path / "t" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunError, match="cannot read checkpoint"):
        _teacher(tmp_path / "t", vae, resume=True)
    other = random_model_dir(preset("default"), tmp_path / "default_vae")
    # An autoencoder of another latent shape: one error naming both shapes.
    with pytest.raises(CheckpointError, match=r"makes 8×32×32 latents .* expects 4×8×8 latents"):
        _teacher(tmp_path / "t2", other)
    with pytest.raises(ValueError, match="out of range"):
        TrainConfig(iterations=0)


def test_cli_reports_bad_options_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "teacher", "--preset", "tiny", "--iterations", "0", "--out", str(tmp_path / "a")]) \
        == 2
    assert main(["train", "teacher", "--preset", "tiny", "--device", "cpu", "--out", str(tmp_path / "b")]) \
        == 2
    assert main(["train", "teacher", "--preset", "tiny", "--device", "cpu", "--out", str(tmp_path / "c"),
                 "--vae", str(tmp_path / "missing")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 3
    assert "--iterations 0" in errors[0] and "--vae" in errors[1] and "missing" in errors[2]


def test_cooldown_decays_the_last_iterations_and_a_resume_can_add_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = TrainConfig(iterations=10, lr=1e-3, warmup=2, cooldown=4)
    assert [round(lr_at(i, cfg) / 1e-3, 4) for i in range(10)] == [0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    assert lr_at(5, replace(cfg, cooldown=0)) == lr_at(9, replace(cfg, cooldown=0)) == 1e-3
    vae = random_model_dir(TINY, tmp_path / "vae")
    _teacher(tmp_path / "long", vae, iterations=2)  # a long run at constant lr, then ended by a cooldown
    _teacher(tmp_path / "long", vae, resume=True, iterations=5, cooldown=3)
    assert [round(r["lr"] / 1e-3, 4) for r in _log(tmp_path / "long")] == [1, 1, 1, 0.6667, 0.3333]
    assert main(["train", "teacher", "--preset", "tiny", "--device", "cpu", "--iterations", "3",
                 "--cooldown", "4", "--out", str(tmp_path / "x")]) == 2
    assert "cooldown" in capsys.readouterr().err


def test_world_clips_and_pool_are_deterministic_by_step() -> None:
    clips = WorldClips(32, 32, 3, random_keys=0.5)
    a, b = clips.batch(4, 2), clips.batch(4, 2)
    assert a.frames.shape == (2, 3, 32, 32, 3) and a.frames.dtype == torch.uint8
    assert torch.equal(a.frames, b.frames) and torch.equal(a.keys, b.keys) and a.prompts == b.prompts
    assert not torch.equal(a.frames, clips.batch(5, 2).frames)
    held_out = WorldClips(32, 32, 3, held_out=True)
    assert held_out.seeds(0, 2).min() >= clips.seeds(0, 64).max()
    pool = ClipPool(WorldClips(32, 32, 4), clips=2, frames=3, chunk=2, refresh_every=3)
    fresh = ClipPool(WorldClips(32, 32, 4), clips=2, frames=3, chunk=2, refresh_every=3)
    pool.batch(0, 2)
    assert pool.generation(0, 5) == 1 and torch.equal(pool.batch(5, 3).frames, fresh.batch(5, 3).frames)


def test_training_from_recorded_episodes_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clip = FakeClips(64, 64, 12).batch(0, 2)
    for i in range(2):
        prompts = [PromptChange(0, "a dim dungeon of grey brick walls"), PromptChange(6, "an ice cave")]
        write_episode(tmp_path / "episodes" / f"ep{i}", clip.frames[i].numpy(), clip.keys[i].tolist(),
                      prompts, EpisodeMeta(fps=30, seed=i))
    clips = EpisodeClips(tmp_path / "episodes", 32, 32, 4, seed=1)
    batch = clips.batch(3, 5)
    assert batch.frames.shape == (5, 4, 32, 32, 3) and torch.equal(batch.frames, clips.batch(3, 5).frames)
    assert set(batch.prompts) <= {"a dim dungeon of grey brick walls", "an ice cave"}
    assert set(batch.themes.tolist()) <= {THEMES.index("dungeon"), THEMES.index("ice cave")}
    out = tmp_path / "run"
    args = ["train", "vae", "--preset", "tiny", "--device", "cpu", "--iterations", "2", "--batch-size", "2",
            "--episodes", str(tmp_path / "episodes"), "--out", str(out), "--log-every", "1"]
    assert main(args) == 0
    assert [r["iteration"] for r in _log(out)] == [1, 2] and (out / "model" / "vae.safetensors").exists()
    (tmp_path / "episodes" / "ep1" / "keys.json").write_text("{")
    assert main([*args[:-4], "--out", str(tmp_path / "run2")]) == 2
    assert "keys.json: corrupt JSON" in capsys.readouterr().err


_SIGTERM_CHILD = """
import sys
from pathlib import Path
from worldloop.distill.stages.runtime import TrainConfig, setup_distributed
from worldloop.distill.stages.vae import VAEObjective, train_vae
from worldloop.models.config import preset
from tests.train_fakes import FakeClips
cfg = TrainConfig(iterations=100000, batch_size=2, warmup=0, out=sys.argv[1], log_every=1,
                  sample_every=0, checkpoint_every=100000, device="cpu")
train_vae(preset("tiny"), cfg, VAEObjective(), setup_distributed("cpu"), clips=FakeClips(32, 32, 2))
"""


def test_sigterm_leaves_a_resumable_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "vae"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", _SIGTERM_CHILD, str(run)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (run / "log.jsonl").exists() or not (run / "log.jsonl").read_text().strip():
            assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:
            child.kill()
    done = read_checkpoint(run / "checkpoint.pt", "vae")["step"]  # the format's name for the iteration
    assert done >= 1 and (run / "model" / "config.json").exists()
    cfg = TrainConfig(iterations=done + 1, batch_size=2, warmup=0, out=str(run), log_every=1,
                      sample_every=0, checkpoint_every=100000, device="cpu")
    train_vae(TINY, cfg, VAEObjective(), setup_distributed("cpu"), resume=True, clips=FakeClips(32, 32, 2))
    assert _log(run)[-1]["iteration"] == done + 1


def test_a_stage_without_its_step_or_export_cannot_be_built() -> None:
    from worldloop.distill.stages.loop import Stage

    class Half(Stage):
        def batch(self, iteration: int) -> None:
            return None

    with pytest.raises(TypeError, match="export, step"):
        Half(None, None, None)  # type: ignore[arg-type]


def test_a_cpu_time_budget_stops_the_loop_and_exports(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "budget", iterations=10**6, cpu_minutes=0.002)  # 0.12 s of process CPU time
    result = train_vae(TINY, cfg, VAEObjective(), setup_distributed("cpu"), clips=FakeClips(32, 32, 2))
    assert 1 <= result.iteration < 10**6
    assert checkpoint.load_model(result.model_dir, need_dit=False).metadata["step"] == result.iteration
    with pytest.raises(ValueError, match="--cpu-minutes"):
        TrainConfig(cpu_minutes=-1)


def test_a_wall_clock_budget_stops_the_loop_and_says_why(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "wall", iterations=10**6, minutes=0.002)  # 0.12 s of wall-clock time
    result = train_vae(TINY, cfg, VAEObjective(), setup_distributed("cpu"), clips=FakeClips(32, 32, 2))
    assert 1 <= result.iteration < 10**6 and result.stopped == "minutes"
    assert checkpoint.load_model(result.model_dir, need_dit=False).metadata["step"] == result.iteration
    assert _log(tmp_path / "wall")[-1]["seconds_per_iteration"] > 0
    done = train_vae(TINY, _cfg(tmp_path / "all"), VAEObjective(), setup_distributed("cpu"),
                     clips=FakeClips(32, 32, 2))
    assert done.iteration == 2 and done.stopped is None
    with pytest.raises(ValueError, match="--minutes"):
        TrainConfig(minutes=-1)
