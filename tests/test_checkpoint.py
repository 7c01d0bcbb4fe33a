"""Model directories and training checkpoints: round trips and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from worldloop.models.checkpoint import (
    CheckpointError,
    export_model,
    load_model,
    load_state,
    read_config,
    read_state,
    save_model,
    save_state,
    shard_files,
)
from worldloop.models.config import DiTConfig, ModelConfig
from worldloop.models.dit import DiT
from worldloop.models.text import PromptEncoder
from worldloop.models.vae import LatentAutoencoder
from worldloop.models.world_model import WorldModel

pytestmark = pytest.mark.usefixtures("single_thread")


def random_modules(config: ModelConfig, seed: int) -> tuple[DiT, LatentAutoencoder]:
    torch.manual_seed(seed)
    dit, vae = DiT(config), LatentAutoencoder(config)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return dit, vae


@pytest.fixture
def model_dir(tmp_path: Path, tiny_config: ModelConfig) -> Path:
    dit, vae = random_modules(tiny_config, 0)
    ema, _ = random_modules(tiny_config, 1)
    return save_model(
        tmp_path / "model", tiny_config, dit, vae, dit_ema=ema, metadata={"step": 1200, "stage": "dmd"}
    )


def frames_of(wm: WorldModel) -> torch.Tensor:
    s = wm.new_session("a desert ruin", 3)
    out = [wm.next_frame([s], [k]) for k in (1, 1, 16)]
    return torch.from_numpy(out[-1])


def test_round_trip_gives_the_same_frames(
    tmp_path: Path, tiny_config: ModelConfig, prompt_encoder: PromptEncoder
) -> None:
    dit, vae = random_modules(tiny_config, 0)
    path = save_model(tmp_path / "m", tiny_config, dit, vae, metadata={"step": 5})
    loaded = WorldModel.from_pretrained(path, device="cpu", prompt_encoder=prompt_encoder, precision="fp32")
    direct = WorldModel(tiny_config, dit, vae, prompt_encoder, precision="fp32")
    assert torch.equal(frames_of(loaded), frames_of(direct))
    assert loaded.metadata["step"] == 5 and loaded.metadata["preset"] == "tiny"
    assert WorldModel.from_pretrained(path, steps=2, prompt_encoder=prompt_encoder).steps == 2


def test_ema_is_stored_in_bf16_and_preferred(
    model_dir: Path, tiny_config: ModelConfig, prompt_encoder: PromptEncoder
) -> None:
    files = load_model(model_dir)
    assert files.dit_ema is not None and all(t.dtype == torch.bfloat16 for t in files.dit_ema.values())
    assert files.metadata["step"] == 1200 and files.config == tiny_config
    wm = WorldModel.from_pretrained(model_dir, prompt_encoder=prompt_encoder, precision="fp32")
    key = "blocks.0.qkv.weight"
    assert torch.equal(wm.dit.state_dict()[key], files.dit_ema[key].float())
    raw = WorldModel.from_pretrained(model_dir, prompt_encoder=prompt_encoder, precision="fp32", ema=False)
    assert torch.equal(raw.dit.state_dict()[key], files.dit[key])


def test_missing_files(model_dir: Path, tmp_path: Path) -> None:
    (model_dir / "vae.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"vae\.safetensors: file not found"):
        load_model(model_dir)
    with pytest.raises(CheckpointError, match="not a model directory"):
        load_model(tmp_path / "nothing")
    (model_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: file not found"):
        load_model(model_dir)


def test_export_keeps_the_ema_only_and_plays_the_same(
    model_dir: Path, tmp_path: Path, prompt_encoder: PromptEncoder
) -> None:
    out = export_model(model_dir, tmp_path / "shipped")
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "dit_ema.safetensors", "vae.safetensors"]
    files = load_model(out)
    assert files.metadata["step"] == 1200 and files.metadata["weights"] == "ema"
    assert files.metadata["exported_from"] == str(model_dir)
    shipped = WorldModel.from_pretrained(out, prompt_encoder=prompt_encoder, precision="fp32")
    trained = WorldModel.from_pretrained(model_dir, prompt_encoder=prompt_encoder, precision="fp32")
    assert torch.equal(frames_of(shipped), frames_of(trained))
    # without an EMA file there is nothing to fall back on: the DiT file is required
    (out / "dit_ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"dit\.safetensors: file not found"):
        load_model(out)


def test_failed_export_leaves_the_previous_one(model_dir: Path, tmp_path: Path) -> None:
    out = export_model(model_dir, tmp_path / "shipped")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    (model_dir / "vae.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"vae\.safetensors: not a readable safetensors file"):
        export_model(model_dir, out)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights(model_dir: Path, damage: str) -> None:
    file = model_dir / "dit.safetensors"
    data = file.read_bytes()
    file.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"\x07" * 64 + data[64:200], "empty": b""}[damage]
    )
    with pytest.raises(CheckpointError, match=r"dit\.safetensors: not a readable safetensors file"):
        load_model(model_dir)


def test_mismatched_config_and_bad_json(
    model_dir: Path, tiny_config: ModelConfig, prompt_encoder: PromptEncoder
) -> None:
    doc = json.loads((model_dir / "config.json").read_text())
    doc["config"]["dit"]["dim"] = 96  # weights were saved for dim 64
    (model_dir / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"dit_ema\.safetensors: tensor shapes do not match"):
        WorldModel.from_pretrained(model_dir, prompt_encoder=prompt_encoder)
    doc["config"]["dit"]["no_such_field"] = 1
    (model_dir / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"config\.json: invalid model config"):
        read_config(model_dir)
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: invalid model config"):
        read_config(model_dir)


def test_save_and_load_state(tmp_path: Path, tiny_config: ModelConfig) -> None:
    dit, _ = random_modules(tiny_config, 0)
    path = save_state(
        tmp_path / "ckpt" / "student.safetensors", dit, metadata={"step": 7, "lr": 1e-4}, dtype=torch.bfloat16
    )
    other = DiT(tiny_config)
    assert load_state(path, other) == {"step": 7, "lr": 1e-4}
    key = "final.linear.weight"
    assert torch.equal(other.state_dict()[key], dit.state_dict()[key].bfloat16().float())
    smaller = DiT(tiny_config.replace(dit=DiTConfig(**{**tiny_config.dit.__dict__, "depth": 1})))
    with pytest.raises(
        CheckpointError,
        match=r"student\.safetensors: does not match the model: missing none, "
        r"unexpected blocks\.1",
    ):
        load_state(path, smaller)


def test_export_command(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from worldloop.app.cli import main

    assert main(["export", str(model_dir), "--out", str(tmp_path / "a"), "--dtype", "fp16", "--steps", "1",
                 "--note", "a test"]) == 0
    assert "dit_ema.safetensors" in capsys.readouterr().out
    files = load_model(tmp_path / "a")
    assert files.dit["blocks.0.qkv.weight"].dtype == torch.float16 and files.metadata["note"] == "a test"
    assert files.config.sampling.steps == 1
    assert files.config.sampling.first_frame_steps == load_model(model_dir).config.sampling.first_frame_steps
    assert main(["export", str(model_dir), "--out", str(tmp_path / "c"), "--steps", "0"]) == 2
    assert main(["export", str(model_dir), "--out", str(model_dir)]) == 2
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "b")]) == 2
    assert "not a model directory" in capsys.readouterr().err


def test_large_states_are_sharded_and_read_back_whole(tmp_path: Path, tiny_config: ModelConfig,
                                                      prompt_encoder: PromptEncoder) -> None:
    dit, vae = random_modules(tiny_config, 0)
    size = sum(t.numel() * t.element_size() for t in dit.state_dict().values())
    path = save_state(tmp_path / "dit.safetensors", dit, {"step": 3}, shard_bytes=size // 3)
    shards = shard_files(path)
    assert len(shards) >= 3 and not path.exists()
    assert all(f.stat().st_size < size // 3 + 2**16 for f in shards)
    loaded = DiT(tiny_config)
    assert load_state(path, loaded) == {"step": 3}
    assert all(torch.equal(a, b) for a, b in zip(dit.state_dict().values(), loaded.state_dict().values(),
                                                 strict=True))
    save_state(path, dit)  # written whole again: the shards go
    assert path.is_file() and shard_files(path) == []
    # a model directory with sharded weights loads and plays like the whole one
    whole = save_model(tmp_path / "whole", tiny_config, dit, vae, dit_ema=dit)
    sharded = save_model(tmp_path / "sharded", tiny_config, dit, vae, dit_ema=dit)
    files = load_model(whole)
    for name, state in (("dit.safetensors", files.dit), ("dit_ema.safetensors", files.dit_ema)):
        assert state is not None
        save_state(sharded / name, state, shard_bytes=size // 4)
        assert len(shard_files(sharded / name)) >= 2 and not (sharded / name).exists()
    a = WorldModel.from_pretrained(whole, prompt_encoder=prompt_encoder, precision="fp32")
    b = WorldModel.from_pretrained(sharded, prompt_encoder=prompt_encoder, precision="fp32")
    assert torch.equal(frames_of(a), frames_of(b))


def test_missing_or_mixed_shards_are_clear_errors(tmp_path: Path, tiny_config: ModelConfig) -> None:
    dit, _ = random_modules(tiny_config, 0)
    path = tmp_path / "dit.safetensors"
    size = sum(t.numel() * t.element_size() for t in dit.state_dict().values())
    save_state(path, dit, shard_bytes=size // 3)
    first = shard_files(path)
    kept = first[0].read_bytes()
    save_state(path, DiT(tiny_config), shard_bytes=size // 3)  # another write of the same shape
    assert shard_files(path) == first
    first[0].write_bytes(kept)  # one shard of the old write among the new ones
    with pytest.raises(CheckpointError, match="shards come from different writes"):
        read_state(path)
    first[-1].unlink()
    with pytest.raises(CheckpointError, match="incomplete or mixed shards"):
        read_state(path)
