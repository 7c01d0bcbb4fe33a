"""Self-forcing against the engine (``distill truth``) on the tiny preset: streams start from engine frames,
the student's own rollout is regressed onto the engine's latents and learns, the decoder fine-tunes on
generated latents, resume is exact, and the CLI runs it."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.train_fakes import FakeClips, FakePromptEncoder, perturbed_model_dir
from worldloop.app.cli import main
from worldloop.distill.data.clips import WorldClips
from worldloop.distill.stages import truth as truth_stage
from worldloop.distill.stages.runtime import TrainConfig, setup_distributed
from worldloop.distill.stages.shared import student_config
from worldloop.distill.stages.truth import TruthObjective, train_truth
from worldloop.models import checkpoint
from worldloop.models.config import CameraConfig, SamplingConfig, preset
from worldloop.models.dit import FLOW_CHANNELS, DiT
from worldloop.models.vae import LatentAutoencoder
from worldloop.models.world_model import WorldModel

TEACHER = preset("tiny").replace(sampling=SamplingConfig(steps=4, first_frame_steps=4, context_sigma=0.2))
STUDENT = student_config(TEACHER, steps=2, first_frame_steps=2)
ENCODER = FakePromptEncoder(TEACHER.dit.max_prompt_tokens)
OBJECTIVE = TruthObjective(max_context=2, rollout_frames=3, decoder_frames=2, spectrum_weight=1.0,
                           switch_every=0)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return perturbed_model_dir(TEACHER, tmp_path_factory.mktemp("teacher"), seed=0)


def _cfg(out: Path, **kw: Any) -> TrainConfig:
    base = TrainConfig(iterations=1, batch_size=2, lr=1e-3, warmup=0, clip_frames=OBJECTIVE.clip_frames,
                       out=str(out), log_every=1, sample_every=0, checkpoint_every=100, device="cpu",
                       pool_clips=0, ema_decay=0.5, bf16=False)
    return replace(base, **kw)


def _truth(out: Path, start: Path, resume: bool = False, objective: TruthObjective = OBJECTIVE,
           clips: Any = None, **kw: Any) -> Path:
    result = train_truth(STUDENT, _cfg(out, **kw), objective, setup_distributed("cpu"), teacher_dir=start,
                         resume=resume, prompt_encoder=ENCODER,
                         clips=clips or FakeClips(32, 32, objective.clip_frames))
    return result.model_dir


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in before if not torch.equal(before[k].float(), after[k].float())}


class OneBatch(FakeClips):
    """The same clips every iteration, so a few steps must lower the loss on them."""

    def batch(self, step: int, size: int) -> Any:
        return super().batch(0, size)


def test_truth_step_starts_from_engine_frames_and_trains_the_dit_through_the_rollout(
        teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    resets: list[dict[str, Any]] = []
    rollouts: list[dict[str, Any]] = []
    reset, rollout = WorldModel.reset, WorldModel.rollout_latents

    def spy_reset(self: WorldModel, session: Any, **kw: Any) -> None:
        resets.append({"frames": None if kw.get("first_frames") is None else kw["first_frames"].shape,
                       "keys": kw.get("first_keys")})
        reset(self, session, **kw)

    def spy_rollout(self: WorldModel, sessions: Any, keys: torch.Tensor, **kw: Any) -> torch.Tensor:
        prompt = kw.get("prompt")
        rollouts.append({"frames": keys.shape[1], "grad_frames": kw.get("grad_frames"), "steps": self.steps,
                         "prompt_with_grad": prompt is not None and prompt.k.requires_grad,
                         "frame_index": [s.frame_index for s in sessions]})
        return rollout(self, sessions, keys, **kw)

    monkeypatch.setattr(WorldModel, "reset", spy_reset)
    monkeypatch.setattr(WorldModel, "rollout_latents", spy_rollout)
    out = _truth(tmp_path / "truth", teacher)
    record = _log(tmp_path / "truth")[0]
    context = int(record["context"])
    assert 1 <= context <= OBJECTIVE.max_context
    assert len(resets) == 2 and all(r["frames"] == (context, 32, 32, 3) and len(r["keys"]) == context
                                    for r in resets)
    assert rollouts == [{"frames": 3, "grad_frames": 3, "steps": record["exit_steps"],
                         "prompt_with_grad": True, "frame_index": [context, context]}]
    assert math.isfinite(record["latent_mse"]) and record["latent_mse"] > 0 and "decoder_loss" not in record
    files = checkpoint.load_model(out)
    start = checkpoint.load_model(teacher)
    changed = _changed(start.dit, files.dit)
    assert {"blocks.0.qkv.weight", "final.linear.weight", "text_proj.weight"} <= changed
    assert not _changed(start.vae, files.vae)  # --train dit leaves the autoencoder alone
    assert files.config.sampling.steps == 2 and files.metadata["stage"] == "truth"


def test_truth_lowers_the_rollout_error_on_the_engine_frames(teacher: Path, tmp_path: Path) -> None:
    objective = replace(OBJECTIVE, max_context=1)
    _truth(tmp_path / "learn", teacher, objective=objective, clips=OneBatch(32, 32, objective.clip_frames),
           iterations=12, lr=3e-3, seed=3)
    losses = [r["latent_mse"] for r in _log(tmp_path / "learn")]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3


def test_truth_decoder_learns_on_generated_latents_and_leaves_the_rest(teacher: Path, tmp_path: Path) -> None:
    objective = replace(OBJECTIVE, train="decoder")
    out = _truth(tmp_path / "decoder", teacher, objective=objective, iterations=2)
    records = _log(tmp_path / "decoder")
    assert all(math.isfinite(r["decoder_loss"]) for r in records)
    files, start = checkpoint.load_model(out), checkpoint.load_model(teacher)
    changed = _changed(start.vae, files.vae)
    assert changed and all(name.startswith("decoder.") for name in changed)
    assert not _changed(start.dit, files.dit)


def test_truth_resume_gives_the_same_next_step(teacher: Path, tmp_path: Path) -> None:
    objective = replace(OBJECTIVE, train="both")
    _truth(tmp_path / "straight", teacher, objective=objective, iterations=2)
    _truth(tmp_path / "split", teacher, objective=objective, iterations=1)
    _truth(tmp_path / "split", teacher, objective=objective, resume=True, iterations=2)
    straight, split = _log(tmp_path / "straight"), _log(tmp_path / "split")
    assert [r["iteration"] for r in split] == [1, 2]
    for key in ("latent_mse", "decoder_loss", "context", "exit_steps"):
        assert split[1][key] == pytest.approx(straight[1][key], rel=1e-5, abs=1e-8)


def test_truth_critic_judges_decoded_frames_trains_and_resumes_exactly(teacher: Path, tmp_path: Path) -> None:
    objective = replace(OBJECTIVE, adversarial_weight=0.5, adversarial_frames=3, critic_channels=8)
    _truth(tmp_path / "straight", teacher, objective=objective, iterations=2)
    _truth(tmp_path / "split", teacher, objective=objective, iterations=1)
    critic_state = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["modules"]["critic"]
    out = _truth(tmp_path / "split", teacher, objective=objective, resume=True, iterations=2)
    straight, split = _log(tmp_path / "straight"), _log(tmp_path / "split")
    for key in ("latent_mse", "adversarial_weight", "critic_loss"):
        assert split[1][key] == pytest.approx(straight[1][key], rel=1e-4, abs=1e-7)
    assert all(r["adversarial_weight"] > 0 and math.isfinite(r["critic_loss"]) for r in straight)
    after = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["modules"]["critic"]
    assert _changed(critic_state, after)  # the critic learns ...
    files = checkpoint.load_model(out)  # ... and is not part of the exported model
    assert not any("critic" in name or name.startswith("layers.") for name in files.dit)
    assert _changed(checkpoint.load_model(teacher).dit, files.dit)


def test_truth_texture_term_trains_the_dit_through_the_frozen_autoencoder(teacher: Path, tmp_path: Path
                                                                          ) -> None:
    objective = replace(OBJECTIVE, texture_weight=1.0, adversarial_frames=3, texture_grid=2)
    out = _truth(tmp_path / "texture", teacher, objective=objective, iterations=2)
    records = _log(tmp_path / "texture")
    assert all(r["texture"] > 0 and math.isfinite(r["texture"]) for r in records)
    assert "critic_loss" not in records[0]  # the texture term needs no critic
    files, start = checkpoint.load_model(out), checkpoint.load_model(teacher)
    assert _changed(start.dit, files.dit)
    assert not _changed(start.vae, files.vae)  # the encoder and decoder it runs through stay as they were
    decoder = replace(objective, train="decoder")  # the decoder's loss takes the term on its own frames
    out = _truth(tmp_path / "decoder", teacher, objective=decoder, iterations=1)
    record = _log(tmp_path / "decoder")[0]
    assert record["decoder_texture"] > 0 and "texture" not in record
    files = checkpoint.load_model(out)
    assert {k.split(".")[0] for k in _changed(start.vae, files.vae)} == {"decoder"}
    with pytest.raises(ValueError, match="--texture-grid"):
        TruthObjective(texture_grid=0)


def test_truth_pixel_term_scores_decoded_frames_against_the_engines(teacher: Path, tmp_path: Path) -> None:
    objective = replace(OBJECTIVE, pixel_weight=2.0, adversarial_frames=3)
    out = _truth(tmp_path / "pixel", teacher, objective=objective, iterations=2)
    records = _log(tmp_path / "pixel")
    assert all(0 < r["pixel_l1"] <= 2 for r in records)  # L1 of frames in [-1, 1]
    assert "texture" not in records[0] and "critic_loss" not in records[0]
    plain = _truth(tmp_path / "plain", teacher, iterations=2)
    with_pixels, without = checkpoint.load_model(out).dit, checkpoint.load_model(plain).dit
    assert _changed(without, with_pixels)  # the term reaches the DiT's update
    with pytest.raises(ValueError, match="loss weights"):
        TruthObjective(pixel_weight=-1.0)


def test_truth_objective_rules() -> None:
    with pytest.raises(ValueError, match="--train"):
        TruthObjective(train="vae")
    with pytest.raises(ValueError, match="--grad-frames"):
        TruthObjective(rollout_frames=4, grad_frames=5)
    with pytest.raises(ValueError, match="--max-context"):
        TruthObjective(max_context=0)
    with pytest.raises(ValueError, match="--adversarial-weight"):
        TruthObjective(adversarial_weight=0.5, train="both")
    assert TruthObjective(max_context=3, rollout_frames=8).clip_frames == 11


def test_cli_runs_truth_with_a_baked_context_sigma_and_reports_bad_options(
        teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(truth_stage, "PromptEncoder", FakePromptEncoder)
    monkeypatch.setattr(truth_stage.shared, "make_clip_source",
                        lambda cfg, config, device, rank, frames, **kw: FakeClips(32, 32, frames))
    base = ["distill", "truth", "--device", "cpu", "--iterations", "1", "--batch-size", "1",
            "--max-context", "2", "--rollout-frames", "2", "--teacher", str(teacher)]
    assert main([*base, "--student-steps", "1", "--context-sigma", "0.4", "--out", str(tmp_path / "t")]) == 0
    config, metadata = checkpoint.read_config(tmp_path / "t" / "model")
    assert config.sampling.steps == 1 and config.sampling.context_sigma == 0.4
    assert metadata["stage"] == "truth" and metadata["step"] == 1
    assert main([*base, "--grad-frames", "5", "--out", str(tmp_path / "a")]) == 2
    assert main([*base, "--context-sigma", "1.5", "--out", str(tmp_path / "b")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 2 and "--grad-frames" in errors[0] and "--context-sigma" in errors[1]


def _switch_source(calls: list[tuple[int, int, int, int]]) -> Any:
    def make(index: int, size: int, frames: int, switch_at: int) -> Any:
        calls.append((index, size, frames, switch_at))
        batch = FakeClips(32, 32, frames, seed=index + 5).batch(0, size)
        return replace(batch, switch_at=switch_at, switch_prompts=[f"new prompt {i}" for i in range(size)],
                       switch_themes=torch.zeros(size, dtype=torch.long))

    return make


def test_truth_switch_batches_give_the_new_prompt_at_the_switch_frame(
        teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, Any]] = []
    set_prompt, rollout = WorldModel.set_prompt, WorldModel.rollout_latents

    def spy_set_prompt(self: WorldModel, session: Any, prompt: str) -> None:
        events.append(("prompt", prompt))
        set_prompt(self, session, prompt)

    def spy_rollout(self: WorldModel, sessions: Any, keys: torch.Tensor, **kw: Any) -> torch.Tensor:
        prompt = kw.get("prompt")
        events.append(("roll", (keys.shape[1], kw.get("grad_frames"),
                                prompt is not None and prompt.k.requires_grad)))
        return rollout(self, sessions, keys, **kw)

    monkeypatch.setattr(WorldModel, "set_prompt", spy_set_prompt)
    monkeypatch.setattr(WorldModel, "rollout_latents", spy_rollout)
    calls: list[tuple[int, int, int, int]] = []
    objective = replace(OBJECTIVE, switch_every=2, switch_reuse=2, grad_frames=2)
    train_truth(STUDENT, _cfg(tmp_path / "s", iterations=4), objective, setup_distributed("cpu"),
                teacher_dir=teacher, prompt_encoder=ENCODER, clips=FakeClips(32, 32, objective.clip_frames),
                switch_clips=_switch_source(calls))
    # iterations 1 and 3 are switch iterations and share one rendered batch
    assert len(calls) == 1 and calls[0][:3] == (0, 2, 5)
    at = calls[0][3]
    assert objective.max_context < at < objective.clip_frames
    before, after = at - objective.max_context, objective.clip_frames - at
    switch_iteration = [("roll", (before, max(0, 2 - after), max(0, 2 - after) > 0)),
                        ("prompt", "new prompt 0"), ("prompt", "new prompt 1"),
                        ("roll", (after, min(2, after), True))]
    plain = [("roll", (3, 2, True))]
    assert events == plain + switch_iteration + plain + switch_iteration
    records = _log(tmp_path / "s")
    assert ["switch_latent_mse" in r for r in records] == [False, True, False, True]


def test_world_switch_clips_keep_the_clip_and_the_maze_and_change_the_theme() -> None:
    from worldloop.distill.data.clips import WorldClips
    from worldloop.distill.world.engine import World

    world = World([11, 12, 13], 64, 64)
    other = WorldClips(64, 64, 6, switch_at=1)._switched_world(world, torch.Generator().manual_seed(0))
    assert torch.equal(world.grid, other.grid) and all(a.theme != b.theme for a, b in
                                                       zip(world.params, other.params, strict=True))

    plain = WorldClips(64, 64, 6, seed=3, random_keys=0.3, key_hold=2).batch(0, 3)
    switched = WorldClips(64, 64, 6, seed=3, random_keys=0.3, key_hold=2, switch_at=3).batch(0, 3)
    assert torch.equal(plain.frames[:, :3], switched.frames[:, :3]) and torch.equal(plain.keys, switched.keys)
    assert switched.switch_at == 3 and plain.switch_at == 0 and plain.switch_prompts is None
    assert switched.switch_themes is not None and (switched.switch_themes != switched.themes).all()
    assert all(a != b for a, b in zip(switched.prompts, switched.switch_prompts or [], strict=True))
    after = (plain.frames[:, 3:].float() - switched.frames[:, 3:].float()).abs().mean(dim=(1, 2, 3, 4))
    assert (after > 10).all()  # another look from the switch on
    with pytest.raises(ValueError, match="switch_at"):
        WorldClips(64, 64, 6, switch_at=6)


def test_latent_spectrum_term_charges_a_blur_not_a_misplaced_edge(teacher: Path, tmp_path: Path) -> None:
    from worldloop.distill.stages.truth import latent_spectrum_loss

    g = torch.Generator().manual_seed(0)
    truth = torch.randn(2, 3, 4, 16, 16, generator=g)
    blurred = torch.nn.functional.avg_pool2d(truth.flatten(0, 2), 3, 1, 1).view_as(truth)
    shifted = torch.roll(truth, 1, dims=-1)
    assert latent_spectrum_loss(shifted, truth, 0).item() < 1e-5
    assert latent_spectrum_loss(blurred, truth, 0).item() > 0.1
    assert latent_spectrum_loss(blurred[:, -1:], truth[:, -1:], 0).item() == pytest.approx(
        latent_spectrum_loss(blurred, truth, 1).item())
    objective = replace(OBJECTIVE, latent_spectrum_weight=2.0)
    _truth(tmp_path / "spec", teacher, objective=objective)
    record = _log(tmp_path / "spec")[0]
    assert record["latent_spectrum"] > 0 and math.isfinite(record["latent_spectrum"])
    with pytest.raises(ValueError, match="loss weights"):
        TruthObjective(latent_spectrum_weight=-1.0)


def test_truth_takes_the_autoencoder_of_another_directory(teacher: Path, tmp_path: Path) -> None:
    other = perturbed_model_dir(TEACHER, tmp_path / "other", seed=7)
    torch.manual_seed(9)
    vae = LatentAutoencoder(TEACHER)
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.add_(0.01)
    checkpoint.save_model(other, TEACHER, DiT(TEACHER), vae, metadata={"stage": "test"})
    result = train_truth(STUDENT, _cfg(tmp_path / "v"), OBJECTIVE, setup_distributed("cpu"),
                         teacher_dir=teacher, prompt_encoder=ENCODER,
                         clips=FakeClips(32, 32, OBJECTIVE.clip_frames), vae_dir=other)
    files = checkpoint.load_model(result.model_dir)
    assert not _changed(checkpoint.load_model(other).vae, files.vae)
    assert _changed(checkpoint.load_model(teacher).vae, files.vae)
    assert files.metadata["autoencoder_from"] == str(other)


def test_every_objective_field_has_a_cli_flag() -> None:
    from dataclasses import fields

    from worldloop.app.commands.distill import TRUTH_OPTIONS

    assert set(TRUTH_OPTIONS) == {f.name for f in fields(TruthObjective)}


def test_cli_truth_starts_a_warp_student_from_a_delta_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``--prediction warp`` on a delta start: the exported student is a warp DiT whose key flow prior was
    fitted (it moves the fake clips' frames better than copying) and whose flow channels (zero at the start)
    trained; a start that is not a delta DiT is refused with a clear error."""
    monkeypatch.setattr(truth_stage, "PromptEncoder", FakePromptEncoder)
    monkeypatch.setattr(truth_stage.shared, "make_clip_source",
                        lambda cfg, config, device, rank, frames, **kw: FakeClips(32, 32, frames))
    delta = perturbed_model_dir(TEACHER.replace(dit=replace(TEACHER.dit, prediction="delta")),
                                tmp_path / "delta", seed=0)
    base = ["distill", "truth", "--device", "cpu", "--iterations", "2", "--batch-size", "1", "--lr", "1e-2",
            "--max-context", "2", "--rollout-frames", "2", "--prediction", "warp"]
    assert main([*base, "--teacher", str(delta), "--out", str(tmp_path / "w")]) == 0
    files = checkpoint.load_model(tmp_path / "w" / "model")
    assert files.config.dit.prediction == "warp"
    p, c = TEACHER.dit.patch_size, TEACHER.latent_channels
    weight = files.dit["final.linear.weight"]
    assert weight.shape[0] == (c + FLOW_CHANNELS) * p * p
    assert weight[c * p * p:].abs().max() > 0  # the flow head learned from zero
    fit = files.metadata["key_flow_fit"]  # the key flow prior was fitted on the run's clips first
    assert fit["warp_mse"] < fit["copy_mse"] and files.dit["key_flow"].abs().max() > 0
    start = checkpoint.load_model(delta).dit["final.linear.weight"]
    assert start.shape[0] == c * p * p
    velocity_dir = perturbed_model_dir(TEACHER, tmp_path / "v", seed=0)  # a "v" DiT has no previous frame
    assert main([*base, "--teacher", str(velocity_dir), "--out", str(tmp_path / "bad")]) != 0
    assert "only delta → warp" in capsys.readouterr().err


def test_cli_truth_starts_a_reprojecting_student_from_a_delta_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``--reproject`` on a delta start: the depth network is fitted on the built-in world first (it reads
    depth better than a constant), the student trains and exports with ``camera.reproject`` and the fitted
    network, and it plays; a start that is not a delta DiT is refused with a clear error."""
    monkeypatch.setattr(truth_stage, "PromptEncoder", FakePromptEncoder)
    def clips(cfg: Any, config: Any, device: Any, rank: int, frames: int, **kw: Any) -> Any:
        if kw.get("depth_columns"):  # --depth-lr-scale: built-in world clips with the engine's depth
            return WorldClips(32, 32, frames, depth_columns=kw["depth_columns"])
        return FakeClips(32, 32, frames)

    monkeypatch.setattr(truth_stage.shared, "make_clip_source", clips)
    fit = truth_stage.shared.fit_depth
    monkeypatch.setattr(truth_stage.shared, "fit_depth",
                        lambda *a, **kw: fit(*a, **kw | {"batches": 12, "iterations": 800}))
    delta = perturbed_model_dir(TEACHER.replace(dit=replace(TEACHER.dit, prediction="delta")),
                                tmp_path / "delta", seed=0)
    base = ["distill", "truth", "--device", "cpu", "--iterations", "2", "--batch-size", "1", "--lr", "1e-2",
            "--max-context", "2", "--rollout-frames", "2", "--reproject"]
    assert main([*base, "--teacher", str(delta), "--out", str(tmp_path / "r")]) == 0
    files = checkpoint.load_model(tmp_path / "r" / "model")
    assert files.config.camera.reproject and files.config.dit.prediction == "delta"
    depth = files.metadata["depth_fit"]
    # A random tiny autoencoder here; on the default model's latents the fit reaches 0.12 against 0.65.
    assert depth["log_depth_rmse"] < 0.9 * depth["mean_rmse"]
    assert float(files.dit["reprojector.fitted"]) == 1.0
    wm = WorldModel.from_pretrained(tmp_path / "r" / "model", prompt_encoder=FakePromptEncoder(16))
    session = wm.new_session("a desert ruin", seed=1)
    for keys in (0, 1, 16):
        assert wm.next_frame([session], [keys]).shape == (1, 32, 32, 3)
    assert wm.last_timings.reproject_ms > 0
    assert files.config.camera.resample == "bicubic"  # the defaults for a new reprojecting student
    assert files.config.camera.depth_memory == 1.0
    more = ["--student", str(tmp_path / "r" / "model"), "--resample", "bilinear", "--depth-memory", "0.5",
            "--anchor-frames", "4", "--anchor-lowpass", "1.5", "--reveal-fill", "plane"]
    assert main([*base, "--teacher", str(delta), *more, "--out", str(tmp_path / "r2")]) == 0
    again = checkpoint.load_model(tmp_path / "r2" / "model")
    assert again.config.camera.resample == "bilinear" and "depth_fit" not in again.metadata  # fitted once
    assert again.config.camera.depth_memory == 0.5 and again.config.camera.anchor_frames == 4
    assert again.config.camera.anchor_lowpass == 1.5 and again.config.camera.reveal_fill == "plane"
    # --depth-lr-scale: the depth network learns on the rollouts' own frames (its own learning rate), with
    # the DiT; the depth loss is logged.
    start_depth = {k: v for k, v in files.dit.items() if k.startswith("reprojector.depth_net.")}
    assert main([*base, "--teacher", str(delta), "--student", str(tmp_path / "r" / "model"),
                 "--depth-lr-scale", "1", "--switch-every", "0", "--out", str(tmp_path / "d")]) == 0
    tuned = checkpoint.load_model(tmp_path / "d" / "model").dit
    assert _changed(start_depth, tuned) == set(start_depth)
    assert all(math.isfinite(r["depth_loss"]) for r in _log(tmp_path / "d"))
    no_reprojection = [*base[:-1], "--teacher", str(delta), "--depth-lr-scale", "1"]
    assert main([*no_reprojection, "--out", str(tmp_path / "nd")]) != 0
    assert "--depth-lr-scale trains a reprojecting student" in capsys.readouterr().err
    plain = [a for a in base if a != "--reproject"]
    bad = ["--teacher", str(delta), "--resample", "bilinear", "--out", str(tmp_path / "x")]
    assert main([*plain, *bad]) != 0
    assert "--resample applies to a reprojecting student" in capsys.readouterr().err
    assert main([*plain, "--teacher", str(delta), "--depth-memory", "1", "--out", str(tmp_path / "y")]) != 0
    assert "--depth-memory applies to a reprojecting student" in capsys.readouterr().err
    assert main([*plain, "--teacher", str(delta), "--anchor-frames", "8", "--out", str(tmp_path / "z")]) != 0
    assert "--anchor-frames applies to a reprojecting student" in capsys.readouterr().err
    velocity_dir = perturbed_model_dir(TEACHER, tmp_path / "v", seed=0)
    assert main([*base, "--teacher", str(velocity_dir), "--out", str(tmp_path / "bad")]) != 0
    assert 'moves the previous frame of a "delta" DiT' in capsys.readouterr().err


def test_a_delta_dit_converted_to_reproject_starts_as_the_reprojection_alone(tmp_path: Path) -> None:
    """Converting zeroes the output layer (the learned change would move the frame a second time) and adds an
    unfitted depth network; the rest of the DiT is the start's."""
    delta = perturbed_model_dir(TEACHER.replace(dit=replace(TEACHER.dit, prediction="delta")),
                                tmp_path / "delta", seed=0)
    camera = CameraConfig(reproject=True, resample="bilinear")
    config, dit = truth_stage.shared.load_dit(delta, torch.device("cpu"), None, camera)
    assert config.camera == camera and dit.reprojector.camera == camera  # the run's camera, not the start's
    assert config.camera.reproject and dit.reprojector is not None and float(dit.reprojector.fitted) == 0
    assert dit.final.linear.weight.abs().max() == 0 and dit.final.linear.bias.abs().max() == 0
    start = checkpoint.load_model(delta)
    weights = start.dit_ema if start.dit_ema is not None else start.dit
    assert torch.equal(dit.patch_in.weight, weights["patch_in.weight"].float())
    _, same = truth_stage.shared.load_dit(delta, torch.device("cpu"))
    assert same.reprojector is None and same.final.linear.weight.abs().max() > 0
