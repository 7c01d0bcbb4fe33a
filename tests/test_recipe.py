"""The teacher recipe's options each change what they claim (issue: learning per CPU minute), and the
learning-speed benchmark runs end to end on the tiny preset."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.train_fakes import FakeClips, FakePromptEncoder, random_model_dir
from worldloop.distill.data.clips import WorldClips
from worldloop.distill.stages import losses
from worldloop.distill.stages import runtime as runtime_module
from worldloop.distill.stages.run import read_checkpoint
from worldloop.distill.stages.runtime import (
    Muon,
    Optimizers,
    TrainConfig,
    hidden_matrices,
    make_optimizer,
    orthogonalize,
    setup_distributed,
)
from worldloop.distill.stages.teacher import TeacherObjective, train_teacher
from worldloop.models import checkpoint
from worldloop.models.config import preset
from worldloop.models.dit import DiT, velocity
from worldloop.models.kv_cache import PromptKV
from worldloop.models.sampling import add_noise, x0_from_v

TINY = preset("tiny")
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("single_thread")


def test_x0_prediction_is_returned_as_the_velocity_whose_x0_it_is() -> None:
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 8, 8, generator=g), torch.randn(2, 3, 4, 8, 8, generator=g)
    sigma = torch.tensor([[0.2, 0.5, 1.0], [0.9, 0.05, 0.7]])
    x = add_noise(x0, eps, sigma)
    v = velocity(x0, x, sigma, "x0")  # a network that outputs the exact clean frame
    assert torch.allclose(v, eps - x0, atol=1e-4)  # ... is read as the exact velocity
    assert torch.allclose(x0_from_v(x[:, 1], v[:, 1], sigma[:, 1]), x0[:, 1], atol=1e-5)
    assert velocity(x0, x, sigma, "v") is x0


def test_x0_target_loss_is_the_clean_frame_error() -> None:
    x0 = torch.zeros(1, 2, 1, 2, 2)
    noise = torch.ones(1, 2, 1, 2, 2)
    sigma = torch.tensor([[0.5, 1.0]])
    v_pred = torch.full((1, 2, 1, 2, 2), 3.0)  # target v = ε − x0 = 1: error 2 everywhere, squared 4
    assert torch.allclose(losses.frame_losses(v_pred, x0, noise, sigma, "v"), torch.tensor([[4.0, 4.0]]))
    # x̂0 = x_σ − σ·v = σ·1 − σ·3 = −2σ: squared error 4σ² → 1 at σ = 0.5, 4 at σ = 1
    assert torch.allclose(losses.frame_losses(v_pred, x0, noise, sigma, "x0"), torch.tensor([[1.0, 4.0]]))
    with pytest.raises(ValueError, match="unknown loss target"):
        losses.frame_losses(v_pred, x0, noise, sigma, "eps")


def test_key_change_split_separates_frames_after_a_change() -> None:
    frame_loss = torch.tensor([[9.0, 1.0, 5.0, 1.0]])
    keys = torch.tensor([[[0.0], [0.0], [1.0], [1.0]]])  # the change lands on frame 2
    change, steady = losses.key_change_split(frame_loss, keys)
    assert change.item() == 5.0 and steady.item() == 1.0  # frame 0 (no frame before it) counts in neither
    change, _ = losses.key_change_split(frame_loss, torch.zeros(1, 4, 1))
    assert change.isnan()


def _perturbed(config: object) -> DiT:
    torch.manual_seed(0)
    dit = DiT(config)  # type: ignore[arg-type]
    with torch.no_grad():  # leave the zero-initialised identity so that conditioning reaches the output
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return dit.eval()


def test_context_noise_level_reaches_the_dit() -> None:
    dit = _perturbed(TINY)
    x = torch.randn(1, 2, TINY.latent_channels, *TINY.latent_size)
    context = torch.randn_like(x)
    sigma, keys = torch.tensor([[0.5, 0.5]]), torch.zeros(1, 2, 6)
    prompt: PromptKV = dit.null_prompt_kv(1)
    with torch.no_grad():
        clean = dit(x, sigma, keys, prompt, context=context, context_sigma=torch.zeros(1, 2))
        told = dit(x, sigma, keys, prompt, context=context, context_sigma=torch.full((1, 2), 0.6))
    assert (clean - told).abs().max() > 1e-3  # the same context frames, told a different σ: other output


def _tiny_teacher(prediction: str, tmp_path: Path) -> Path:
    """Two teacher iterations of a tiny DiT with this output on fake clips; its model directory."""
    config = TINY.replace(dit=replace(TINY.dit, prediction=prediction))
    vae = random_model_dir(TINY, tmp_path / "vae")
    return train_teacher(config, TrainConfig(iterations=2, batch_size=2, warmup=0, clip_frames=4,
                                             out=str(tmp_path / "t"), sample_every=0, device="cpu",
                                             pool_clips=0),
                         TeacherObjective(), setup_distributed("cpu"), vae_from=vae,
                         prompt_encoder=FakePromptEncoder(16), clips=FakeClips(32, 32, 4)).model_dir


def test_x0_dit_plays_through_the_world_model(tmp_path: Path) -> None:
    out = _tiny_teacher("x0", tmp_path)
    loaded, _ = checkpoint.read_config(out)
    assert loaded.dit.prediction == "x0"
    from worldloop.models.world_model import WorldModel

    wm = WorldModel.from_pretrained(out, prompt_encoder=FakePromptEncoder(16))
    frame = wm.next_frame([wm.new_session("a dungeon", seed=0)], [1])
    assert frame.shape == (1, 32, 32, 3)


def _runs(keys: torch.Tensor) -> list[int]:
    """Lengths of the runs of equal consecutive key states in (F,)."""
    runs, count = [], 1
    for a, b in zip(keys[:-1].tolist(), keys[1:].tolist(), strict=True):
        if a == b:
            count += 1
        else:
            runs.append(count)
            count = 1
    return [*runs, count]


def test_key_hold_holds_random_keys_for_several_frames() -> None:
    every = WorldClips(64, 64, 24, random_keys=1.0, key_hold=1).batch(0, 4).keys[:, 1:]
    held = WorldClips(64, 64, 24, random_keys=1.0, key_hold=6).batch(0, 4).keys[:, 1:]
    short = [r for clip in every for r in _runs(clip)]
    long = [r for clip in held for r in _runs(clip)]
    assert sum(long) / len(long) > 1.5 * sum(short) / len(short)
    with pytest.raises(ValueError, match="key_hold"):
        WorldClips(64, 64, 4, key_hold=0)


def test_still_random_keys_hold_the_camera_still() -> None:
    """``still``: that share of the random key states holds no key, so the camera stands where it was."""
    still = WorldClips(64, 64, 12, random_keys=1.0, still=1.0, depth_columns=64).batch(0, 4)
    assert (still.keys[:, 1:] == 0).all()
    assert torch.equal(still.poses[:, 1:], still.poses[:, 1:2].expand_as(still.poses[:, 1:]))
    some = WorldClips(64, 64, 48, random_keys=1.0, still=0.5).batch(0, 8).keys[:, 1:]
    moving = WorldClips(64, 64, 48, random_keys=1.0).batch(0, 8).keys[:, 1:]
    assert (some == 0).float().mean() > 0.3 > (moving == 0).float().mean()
    with pytest.raises(ValueError, match="still"):
        WorldClips(64, 64, 4, still=1.5)


def test_muon_takes_the_hidden_matrices_and_resumes_exactly(tmp_path: Path) -> None:
    dit = DiT(TINY)
    cfg = TrainConfig(optimizer="muon", device="cpu")
    opt = make_optimizer(dit, cfg, torch.device("cpu"))
    assert isinstance(opt, Optimizers)
    muon = {id(p) for p in opt.parts[0].param_groups[0]["params"]}
    assert muon == {id(p) for p in hidden_matrices(dit)}
    assert id(dit.blocks[0].qkv.weight) in muon and id(dit.patch_in.weight) not in muon
    vae = random_model_dir(TINY, tmp_path / "vae")

    def run(out: Path, iterations: int, resume: bool = False) -> None:
        cfg = TrainConfig(iterations=iterations, batch_size=2, lr=1e-3, warmup=0, clip_frames=4,
                          out=str(out), log_every=1, sample_every=0, device="cpu", pool_clips=0,
                          optimizer="muon")
        train_teacher(TINY, cfg, TeacherObjective(), setup_distributed("cpu"), vae_from=vae, resume=resume,
                      prompt_encoder=FakePromptEncoder(16), clips=FakeClips(32, 32, 4))

    run(tmp_path / "straight", 3)
    run(tmp_path / "split", 2)
    run(tmp_path / "split", 3, resume=True)
    a = read_checkpoint(tmp_path / "straight" / "checkpoint.pt", "teacher")["modules"]["dit"]
    b = read_checkpoint(tmp_path / "split" / "checkpoint.pt", "teacher")["modules"]["dit"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    first = checkpoint.load_model(tmp_path / "straight" / "model").dit
    assert not torch.equal(first["blocks.0.qkv.weight"], DiT(TINY).state_dict()["blocks.0.qkv.weight"])


def test_muon_matches_torch_in_bf16_and_iterates_in_float32_without_native_bf16(
        monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    start = torch.randn(48, 80)
    params = [torch.nn.Parameter(start.clone()) for _ in range(3)]
    reference = torch.optim.Muon([params[0]], lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ours = [Muon([params[1]], lr=1e-2, weight_decay=0.1, dtype=torch.bfloat16),
            Muon([params[2]], lr=1e-2, weight_decay=0.1, dtype=torch.float32)]
    for _ in range(4):
        grad = torch.randn(48, 80)
        for p in params:
            p.grad = grad.clone()
        for opt in (reference, *ours):
            opt.step()
    assert torch.equal(params[1], params[0])  # the same update as torch's Muon, bf16 iteration included
    moved = (params[0] - start).abs().max()
    assert 0 < (params[2] - params[0]).abs().max() < 0.05 * moved  # float32 differs only by bf16's rounding
    tall = torch.randn(80, 48)
    q = orthogonalize(tall)
    assert q.dtype == torch.float32 and q.shape == tall.shape
    singular = torch.linalg.svdvals(q)
    assert singular.min() > 0.5 and singular.max() < 1.3  # Newton-Schulz pushes every singular value to ~1
    monkeypatch.setattr(runtime_module, "fast_bf16", lambda device: False)
    opt = make_optimizer(DiT(TINY), TrainConfig(optimizer="muon", device="cpu"), torch.device("cpu"))
    assert opt.parts[0].dtype == torch.float32
    monkeypatch.setattr(runtime_module, "fast_bf16", lambda device: True)
    opt = make_optimizer(DiT(TINY), TrainConfig(optimizer="muon", device="cpu"), torch.device("cpu"))
    assert opt.parts[0].dtype == torch.bfloat16


def test_learning_speed_benchmark_runs_end_to_end_on_tiny(tmp_path: Path) -> None:
    vae = random_model_dir(TINY, tmp_path / "vae")
    command = [sys.executable, str(REPO / "benchmarks" / "learning_speed.py"), "--preset", "tiny",
               "--vae", str(vae), "--minutes", "0.03", "--threads", "1", "--root", str(tmp_path / "runs"),
               "--name", "t", "--idm", "none", "--classifier", "none", "--curve-every", "0.01",
               "--episodes", "2", "--eval-steps", "1", "--", "--batch-size", "2", "--clip-frames", "4",
               "--pool-clips", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["iterations"] >= 1 and line["cpu_minutes"] >= 0.03
    assert {"psnr_h1", "copy_last_psnr_h4", "sharpness_h16", "no_key_rate_per_key"} <= set(line)
    result = json.loads((tmp_path / "runs" / "t" / "result.json").read_text())
    assert len(result["curve"]) >= 2  # snapshots along the budget, each evaluated
    assert (tmp_path / "runs" / "t" / "frames.png").stat().st_size > 0
    assert len(list((tmp_path / "runs" / "t").glob("frames-cpu*.png"))) == len(result["curve"])
    assert [p["cpu_minutes"] for p in result["curve"]] == sorted(p["cpu_minutes"] for p in result["curve"])
    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "--force" in again.stderr  # a finished run is never overwritten
    # a run still training has no model/ yet, or an older one: --eval-only evaluates its newest snapshot
    snapshots = sorted((tmp_path / "runs" / "t" / "run" / "snapshots").iterdir())
    shutil.rmtree(tmp_path / "runs" / "t" / "run" / "model")
    shutil.copytree(snapshots[0], tmp_path / "runs" / "t" / "run" / "model")
    command[command.index("--curve-every")] = "--eval-only"
    command.remove("0.01")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    newest = sorted(p.name for p in (tmp_path / "runs" / "t" / "run" / "snapshots").iterdir())[-1]
    result = json.loads((tmp_path / "runs" / "t" / "result.json").read_text())
    assert line["evaluated"] == newest and line["psnr_h1"] == result["curve"][-1]["psnr_h1"]


def test_aux_targets_come_from_the_engines_poses_and_depths() -> None:
    from worldloop.distill.stages.teacher import aux_targets
    from worldloop.distill.world.engine import World, WorldConfig

    clips = WorldClips(64, 64, 6, random_keys=1.0, depth_columns=4).batch(0, 3)
    assert clips.poses is not None and clips.depths is not None
    assert clips.poses.shape == (3, 6, 3) and clips.depths.shape == (3, 6, 4)
    # the depths are the engine's: a fresh world at the clip's first pose sees the same walls
    world = World(WorldClips(64, 64, 6).seeds(0, 3).tolist(), 64, 64)
    world.set_poses(clips.poses[:, 0])
    assert torch.allclose(world.column_depths(4), clips.depths[:, 0], atol=1e-4)
    target = aux_targets(clips.poses, clips.depths)
    assert not target.valid[:, 0].any() and target.valid[:, 1:].all()
    assert torch.allclose(target.depth, clips.depths.clamp_min(1e-2).log())
    # one frame of "forward" alone moves one full step straight ahead: motion (1, 0, 0)
    world = World([5], 64, 64)
    start = world.poses.clone()
    world.move(torch.tensor([1]))  # bit 0: forward
    poses = torch.stack([start, world.poses], 1).float()
    motion = aux_targets(poses, torch.ones(1, 2, 4)).motion[0, 1]
    if not world.collided.any():
        assert torch.allclose(motion, torch.tensor([1.0, 0.0, 0.0]), atol=1e-4)
    world.move(torch.tensor([1 << 5]))  # turn right
    turned = aux_targets(torch.stack([poses[:, 1], world.poses.float()], 1), torch.ones(1, 2, 4)).motion[0, 1]
    assert abs(abs(float(turned[2])) - 1.0) < 1e-3 and WorldConfig().turn_degrees > 0


def test_aux_heads_train_from_world_clips(tmp_path: Path) -> None:
    config = TINY.replace(dit=replace(TINY.dit, aux_heads=True))
    vae = random_model_dir(TINY, tmp_path / "vae")
    cfg = TrainConfig(iterations=2, batch_size=2, warmup=0, clip_frames=4, out=str(tmp_path / "t"),
                      log_every=1, sample_every=0, device="cpu", pool_clips=0)
    objective = TeacherObjective(depth_weight=1.0, motion_weight=1.0)
    train_teacher(config, cfg, objective, setup_distributed("cpu"), vae_from=vae,
                  prompt_encoder=FakePromptEncoder(16))
    log = [json.loads(line) for line in (tmp_path / "t" / "log.jsonl").read_text().splitlines()]
    assert all(r["aux_loss"] > 0 for r in log)
    weights = checkpoint.load_model(tmp_path / "t" / "model").dit
    assert "aux.weight" in weights
    with pytest.raises(Exception, match="aux"):
        train_teacher(TINY, replace(cfg, out=str(tmp_path / "u")), objective, setup_distributed("cpu"),
                      vae_from=vae, prompt_encoder=FakePromptEncoder(16))


def test_pool_windows_carry_poses_and_depths() -> None:
    from worldloop.distill.data.clips import ClipPool

    source = WorldClips(64, 64, 8, depth_columns=4)
    batch = ClipPool(source, clips=4, frames=3, chunk=4, refresh_every=0).batch(0, 5)
    assert batch.poses is not None and batch.poses.shape == (5, 3, 3)
    assert batch.depths is not None and batch.depths.shape == (5, 3, 4)
    plain = ClipPool(WorldClips(64, 64, 8), clips=4, frames=3, chunk=4, refresh_every=0).batch(0, 2)
    # Every clip carries its poses (a surface memory starts from them); depths only when asked for.
    assert plain.poses is not None and plain.poses.shape == (2, 3, 3) and plain.depths is None


def test_warp_teacher_fits_its_key_flow_first_and_plays(tmp_path: Path) -> None:
    """A warp teacher from scratch: the key flow prior is fitted on the run's clips before training (it
    moves the fake clips' scrolling frames better than copying), trained on, exported, and played."""
    out = _tiny_teacher("warp", tmp_path)
    files = checkpoint.load_model(out)
    assert files.config.dit.prediction == "warp"
    fit = files.metadata["key_flow_fit"]
    assert fit["warp_mse"] < fit["copy_mse"]
    assert files.dit["key_flow"].abs().max() > 0 and files.dit_ema["key_flow"].abs().max() > 0
    from worldloop.models.world_model import WorldModel

    wm = WorldModel.from_pretrained(out, prompt_encoder=FakePromptEncoder(16))
    session = wm.new_session("a dungeon", seed=0)
    frames = [wm.next_frame([session], [k]) for k in (1, 1, 2)]
    assert all(f.shape == (1, 32, 32, 3) for f in frames)
