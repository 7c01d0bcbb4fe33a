"""Model directories and training checkpoints: round trips and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from worldloop.models.checkpoint import (
    CheckpointError,
    export_model,
    index_path,
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
    assert sorted(f.name for f in out.iterdir()) == ["README.md", "config.json", "dit_ema.safetensors",
                                                     "vae.safetensors"]
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


@pytest.mark.parametrize("section, field, value, message", [
    ("dit", "depth", "6", "dit.depth must be an integer, got str '6'"),
    ("dit", "depth", 6.5, "dit.depth must be an integer, got float 6.5"),
    ("dit", "bidirectional", 1, "dit.bidirectional must be true or false, got int 1"),
    ("sampling", "shift", "5", "sampling.shift must be a number, got str '5'"),
    ("vae", "encoder_channels", [16, "32"], "vae.encoder_channels must be a list, each item an integer"),
    (None, "height", None, "height must be an integer, got NoneType None"),
    (None, "dit", [64], "dit must be an object of fields, got list [64]"),
])
def test_config_values_are_type_checked_on_load(model_dir: Path, section: str | None, field: str,
                                                value: object, message: str) -> None:
    file = model_dir / "config.json"
    doc = json.loads(file.read_text())
    doc["config"]["sampling"]["shift"] = 5  # an integer where a float is expected is fine
    file.write_text(json.dumps(doc))
    assert read_config(model_dir)[0].sampling.shift == 5.0
    (doc["config"][section] if section else doc["config"])[field] = value
    file.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError) as caught:
        read_config(model_dir)
    assert str(caught.value).startswith(f"{file}: invalid model config ({message}")


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
    index_path(path).unlink()  # shards found by their names, as in directories written before the index
    first[-1].unlink()
    with pytest.raises(CheckpointError, match="incomplete or mixed shards"):
        read_state(path)


def test_shards_come_with_a_hugging_face_shard_index(tmp_path: Path, tiny_config: ModelConfig) -> None:
    dit, _ = random_modules(tiny_config, 0)
    path = tmp_path / "dit_ema.safetensors"
    state = {n: t.bfloat16() for n, t in dit.state_dict().items()}
    size = sum(t.numel() * t.element_size() for t in state.values())
    save_state(path, state, shard_bytes=size // 3)
    index = json.loads((tmp_path / "dit_ema.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"} and index["metadata"] == {"total_size": size}
    for shard in shard_files(path):
        with safe_open(str(shard), framework="pt") as f:
            assert {n for n, file in index["weight_map"].items() if file == shard.name} == set(f.keys())
    assert set(index["weight_map"]) == set(state)
    # the index decides which files are read: a stray file with the shards' name pattern is ignored
    stray = tmp_path / "dit_ema-00001-of-00009.safetensors"
    save_file({"x": torch.zeros(1)}, str(stray))
    assert set(read_state(path)[0]) == set(state)
    stray.unlink()
    # an index that does not match the shards is a clear error
    doc = json.loads(index_path(path).read_text())
    doc["weight_map"]["extra.weight"] = shard_files(path)[0].name
    index_path(path).write_text(json.dumps(doc))
    mismatch = r"index\.json: does not match its shards: missing extra\.weight"
    with pytest.raises(CheckpointError, match=mismatch):
        read_state(path)
    doc["weight_map"]["extra.weight"] = "dit_ema-00007-of-00009.safetensors"
    index_path(path).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"index\.json: names shards that are missing"):
        read_state(path)
    save_state(path, state)  # written whole: shards and index go
    assert path.is_file() and not index_path(path).exists() and shard_files(path) == []


def eval_report(model: Path) -> dict[str, object]:
    """A `worldloop eval` report with one run of ``model`` (the fields the model card reads)."""
    horizon = {"psnr": 25.071, "ssim": 0.6642, "copy_last_psnr": 22.4485, "copy_last_ssim": 0.6031}
    run = {"model": str(model), "steps": 1, "horizons": {"1": horizon, "4": horizon},
           "keys": {"model": {"per_key": 0.8005}}, "prompt_switch": {"adherence": 0.5703}}
    return {"config": {"episodes": 8}, "runs": [run, {**run, "model": "runs/other"}]}


def front_matter(card: Path) -> dict[str, object]:
    yaml = pytest.importorskip("yaml")
    text = card.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_every_model_directory_has_a_model_card(model_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from worldloop.app.cli import main

    meta = front_matter(model_dir / "README.md")  # save_model (every training stage's export) writes it
    assert meta["license"] == "mit" and meta["library_name"] == "worldloop" and "world-model" in meta["tags"]
    assert "built-in world" in meta["training_data"]
    assert meta["training"]["stage"] == "dmd" and meta["training"]["iterations"] == 1200
    assert "model-index" not in meta  # no eval report: no figures

    report = tmp_path / "report.json"
    report.write_text(json.dumps(eval_report(model_dir)))
    out = tmp_path / "shipped"
    assert main(["export", "--model", str(model_dir), "--out", str(out), "--report", str(report)]) == 0
    meta = front_matter(out / "README.md")
    assert meta["training"]["exported_from"] == str(model_dir)
    (result,) = meta["model-index"][0]["results"]  # the report's row of this model only
    assert result["dataset"]["name"] == "the built-in world, 8 held-out worlds"
    values = {m["name"]: m["value"] for m in result["metrics"]}
    assert values["PSNR at horizon 1, 1 step"] == 25.071 and values["SSIM at horizon 4, 1 step"] == 0.6642
    assert values["key accuracy through the IDM (per key), 1 step"] == 0.8005
    body = (out / "README.md").read_text()
    assert "| copy the last frame | – | 22.45 | 22.45 | 0.603 | 0.603 | | |" in body
    assert "| this model | 1 | 25.07 | 25.07 | 0.664 | 0.664 | 0.800 | 0.570 |" in body

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"runs": [{"model": "runs/other"}]}))
    capsys.readouterr()
    argv = ["export", "--model", str(model_dir), "--out", str(tmp_path / "x"), "--report", str(other)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"worldloop export: error: the eval report has no rows of {model_dir} (it has: runs/other)"
