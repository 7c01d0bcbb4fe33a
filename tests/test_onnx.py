"""The ONNX export and the onnxruntime backend, on the ``tiny`` preset with random (perturbed) weights, as a
velocity DiT, a delta DiT (x0 = the previous frame's latent + its output, which the graphs take as the input
``previous``) and a warp DiT (the previous latent resampled along its flow, then + its residual: ONNX
GridSample): every check that uses the exported model runs on all three.

Tolerances: every graph output within ``onnx_export.TOLERANCE`` (1e-3 absolute) of PyTorch float32 on the same
inputs; a rollout's latents within the same 1e-3 of the torch backend (float32) and its decoded frames within
1 grey level. Same seed and keys on the onnxruntime backend → identical frames.

One export per prediction serves the module (through ``worldloop export MODEL --onnx --tensorrt``, about a
minute each on a loaded 2-core CPU); ``WORLDLOOP_CACHE`` points into a temporary folder so nothing is written
under the home folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from worldloop.app import tensorrt
from worldloop.app.cli import main
from worldloop.models.checkpoint import load_model, save_model
from worldloop.models.config import ModelConfig
from worldloop.models.dit import DiT
from worldloop.models.onnx_export import MANIFEST, OPSET, STEP, STEP_CONTEXT, TOLERANCE, batch_axis
from worldloop.models.text import PromptEncoder
from worldloop.models.vae import LatentAutoencoder
from worldloop.models.world_model import WorldModel

pytestmark = pytest.mark.usefixtures("single_thread")
KEYS = [1, 1, 16, 0, 5, 1, 32, 1, 1, 2, 4, 1]  # 12 frames: the tiny cache (1 + 4 + 2 slots) rolls over


@pytest.fixture(scope="module", params=["v", "delta", "warp"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             tiny_config: ModelConfig) -> dict:
    """A tiny model directory and its graphs in MODEL/onnx, written by the CLI (with --tensorrt)."""
    root = tmp_path_factory.mktemp(f"onnx-{request.param}")
    config = tiny_config.replace(dit=replace(tiny_config.dit, prediction=request.param))
    torch.manual_seed(0)
    dit, vae = DiT(config), LatentAutoencoder(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # make the zero-initialised layers non-zero so frames depend on everything
        for p in dit.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model = save_model(root / "model", config, dit, vae, dit_ema=dit)
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setenv("WORLDLOOP_CACHE", str(root / "cache"))
        status = main(["export", str(model), "--onnx", "--tensorrt", "--max-batch", "4"])
    return {"model": model, "onnx": model / "onnx", "cache": root / "cache", "status": status,
            "stderr": err.getvalue(), "prediction": request.param}


@pytest.fixture(scope="module")
def pair(exported: dict, prompt_encoder: PromptEncoder) -> tuple[WorldModel, WorldModel]:
    """The same model on the torch backend (float32) and on the onnxruntime backend."""
    common = {"prompt_encoder": prompt_encoder, "max_sessions": 4}
    eager = WorldModel.from_pretrained(exported["model"], precision="fp32", **common)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORLDLOOP_CACHE", str(exported["cache"]))
        ort = WorldModel.from_pretrained(exported["model"], backend="onnxruntime", **common)
    return eager, ort


def test_export_writes_checked_graphs_and_trtexec_commands(exported: dict) -> None:
    folder = exported["onnx"]
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["opset"] == OPSET and manifest["tolerance"] == TOLERANCE
    assert set(manifest["graphs"]) == {STEP_CONTEXT, STEP, "decoder.onnx"}
    for graph in manifest["graphs"].values():
        assert all(0 <= d <= TOLERANCE for d in graph["max_abs_diff"].values())
        for specs in (graph["inputs"], graph["outputs"]):
            assert all(spec["shape"].count("B") == 1 and spec["shape"][batch_axis(n)] == "B"
                       for n, spec in specs.items())
    fused = manifest["graphs"][STEP_CONTEXT]
    depth = manifest["config"]["dit"]["depth"]
    assert {f"past_k.{depth - 1}", "past_v.0", "prompt_k.0", "cache_valid"} <= set(fused["inputs"])
    assert list(fused["outputs"]) == ["v", "new_k", "new_v"]
    # the new frames' rotary tables, q's and k's stacked: (2, B, 1, G·N, Dh) with G = 2 in the fused step
    head_dim = manifest["config"]["dit"]["dim"] // manifest["config"]["dit"]["heads"]
    assert fused["inputs"]["rope_cos"]["shape"][:3] == [2, "B", 1]
    assert fused["inputs"]["rope_sin"]["shape"][-1] == head_dim
    assert fused["outputs"]["new_k"]["shape"][:2] == [depth, "B"]
    delta = exported["prediction"] in ("delta", "warp")
    for name in (STEP_CONTEXT, STEP):  # only delta/warp frame steps read the previous frame: (B, C, h, w)
        inputs = manifest["graphs"][name]["inputs"]
        assert ("previous" in inputs) == delta
        latent = ["B", *inputs["x"]["shape"][2:]]
        assert not delta or inputs["previous"] == {"shape": latent, "dtype": "float32"}
    script = (folder / tensorrt.SCRIPT).read_text()
    assert script.count("trtexec --onnx=") == 3 and "past_k.0:4x" in script  # --max-batch 4
    if tensorrt.missing_reason() is None:  # a GPU with TensorRT: the engines are built
        assert exported["status"] == 0 and (folder / STEP.replace(".onnx", ".engine")).is_file()
    else:  # here: a clear one-line refusal after the ONNX files are written
        assert exported["status"] == 2
        line = exported["stderr"].strip().splitlines()[-1]
        assert "cannot build TensorRT engines here" in line and tensorrt.SCRIPT in line


def test_the_backend_finds_the_exported_graphs(exported: dict, pair: tuple[WorldModel, WorldModel]) -> None:
    _, ort = pair
    assert ort.executor is not None and ort.executor.folder == exported["onnx"]
    assert not exported["cache"].exists()  # nothing exported again
    assert ort.dtype == torch.float32 and ort.backend == "onnxruntime"


def test_frame_step_graphs_match_pytorch_past_the_window(pair: tuple[WorldModel, WorldModel],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Every denoising step of a 2-step rollout (fused with the cache pass or not), run by both; half-way a
    second session joins, whose first frame has nothing cached (a delta DiT adds to zeros) and nothing pending
    (a placeholder row of the fused step, where a delta DiT adds to the cached ``previous``)."""
    _, ort = pair
    seen: dict[int, float] = {}
    placeholders = 0

    def both(x, sigma, keys, frames, context, prompt, view, present=None, previous=None):  # noqa: ANN001, ANN202
        nonlocal placeholders
        assert previous is None  # only a reprojecting model moves it, and onnxruntime does not run those
        got = ort.executor.frame_step(x, sigma, keys, frames, context, prompt, view, present)
        want = ort.dit.forward_cached(x, sigma, keys, frames, context, prompt, view, present)
        pairs = [(got.v, want.v)] + ([(got.k, want.k), (got.v_cache, want.v_cache)] if context else [])
        diff = max(float((a - b).abs().max()) for a, b in pairs)
        seen[context] = max(seen.get(context, 0.0), diff)
        placeholders += int(present is not None and not bool(present.all()))
        return got

    monkeypatch.setattr(ort, "_forward_cached", both)
    ort.steps = 2
    sessions = [ort.new_session("a stone dungeon", seed=3)]
    try:
        for i, k in enumerate(KEYS):
            if i == len(KEYS) // 2:
                sessions.append(ort.new_session("an ice cave", seed=4))
            ort.next_frame(sessions, [k] * len(sessions))
        assert sessions[0].frame_index > ort.config.dit.cache_frames
    finally:
        for s in sessions:
            ort.close_session(s)
        ort.steps = 1
    assert set(seen) == {0, 1} and placeholders > 0
    assert max(seen.values()) <= TOLERANCE


def test_decoder_graph_matches_pytorch(pair: tuple[WorldModel, WorldModel]) -> None:
    _, ort = pair
    latents = torch.randn(3, ort.config.latent_channels, *ort.config.latent_size,
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ort.vae.decode(latents)
    assert float((ort.executor.decode(latents) - want).abs().max()) <= TOLERANCE


def _rollout(wm: WorldModel, steps: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """Frames and pending latents of a rollout with a prompt switch half-way (re-cache: PyTorch on both)."""
    wm.steps = steps
    s = wm.new_session("a stone dungeon", seed=seed)
    frames, latents = [], []
    try:
        for i, k in enumerate(KEYS):
            if i == len(KEYS) // 2:
                wm.set_prompt(s, "an ice cave")
            frames.append(wm.next_frame([s], [k])[0])
            latents.append(s.pending.clone())
    finally:
        wm.close_session(s)
        wm.steps = 1
    return np.stack(frames), torch.stack(latents)


@pytest.mark.parametrize("steps", [1, 2])
def test_rollout_matches_the_torch_backend_and_is_deterministic(pair: tuple[WorldModel, WorldModel],
                                                                 steps: int) -> None:
    eager, ort = pair
    want_frames, want_latents = _rollout(eager, steps, seed=5)
    frames, latents = _rollout(ort, steps, seed=5)
    assert float((latents - want_latents).abs().max()) <= TOLERANCE
    assert int(np.abs(frames.astype(int) - want_frames.astype(int)).max()) <= 1
    again, _ = _rollout(ort, steps, seed=5)
    assert np.array_equal(frames, again)
    other, _ = _rollout(ort, steps, seed=6)
    assert not np.array_equal(frames, other)


def test_without_onnxruntime_the_backend_says_how_to_install_it(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        tiny_config: ModelConfig, prompt_encoder: PromptEncoder) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime → ImportError
    with pytest.raises(ImportError, match=r"pip install 'worldloop\[onnx\]'"):
        WorldModel.from_config(tiny_config, prompt_encoder=prompt_encoder, backend="onnxruntime")
    out = tmp_path / "x.mp4"
    assert main(["rollout", "--preset", "tiny", "--backend", "onnxruntime", "--frames", "2",
                 "--prompt", "a cave", "--out", str(out), "--quiet"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the random-weights warning
    assert last.startswith("worldloop rollout: error:") and "pip install 'worldloop[onnx]'" in last
    assert not out.exists()


def test_the_backend_refuses_what_it_cannot_run(tiny_config: ModelConfig, prompt_encoder: PromptEncoder,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    for kwargs, message in (({"precision": "bf16"}, "float32"), ({"device": "cuda"}, "on the CPU")):
        with pytest.raises(ValueError, match=message):
            WorldModel.from_config(tiny_config, prompt_encoder=prompt_encoder, backend="onnxruntime",
                                   **kwargs)
    with pytest.raises(ValueError, match="backend must be"):
        WorldModel.from_config(tiny_config, prompt_encoder=prompt_encoder, backend="tensorrt")
    assert main(["export", "nowhere", "--tensorrt"]) == 2
    assert "add --onnx" in capsys.readouterr().err


def test_bench_compare_measures_every_backend_side_by_side(exported: dict, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "compare.json"
    monkeypatch.setenv("WORLDLOOP_CACHE", str(exported["cache"]))
    argv = ["bench", "--compare", "--model", str(exported["model"]), "--threads", "1", "--frames", "3",
            "--warmup", "0", "--trials", "2", "--serve-seconds", "0.2", "--json", str(out)]
    assert main(argv) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["backend"], r["threads"], r["steps"]) for r in runs] == [
        ("torch", 1, 1), ("torch", 1, 2), ("onnxruntime", 1, 1), ("onnxruntime", 1, 2),
        ("onnxruntime-int8", 1, 1), ("onnxruntime-int8", 1, 2)]
    assert all(r["steady"]["fps"] > 0 and r["serving"]["key_to_frame_ms"]["trials"] == 2 for r in runs)
    assert "FPS vs torch" in capsys.readouterr().out


# -- int8 graphs (``--backend onnxruntime-int8``, models/onnx_quantize.py) ------------------------------


@pytest.fixture(scope="module")
def int8(exported: dict, prompt_encoder: PromptEncoder) -> WorldModel:
    """The exported model on the int8 backend, its decoder calibrated on the built-in world's frames."""
    from worldloop.app.loading import calibration_frames

    config = WorldModel.from_pretrained(exported["model"], prompt_encoder=prompt_encoder).config
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORLDLOOP_CACHE", str(exported["cache"]))
        return WorldModel.from_pretrained(exported["model"], backend="onnxruntime-int8",
                                          prompt_encoder=prompt_encoder, max_sessions=4,
                                          calibration_frames=lambda: calibration_frames(config.height,
                                                                                        config.width))


def _op_types(path: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_int8_graphs_are_quantised_once_into_the_cache(exported: dict, int8: WorldModel,
                                                       prompt_encoder: PromptEncoder) -> None:
    from worldloop.models.onnx_quantize import DECODER_INT8, DIT_INT8

    folder = int8.executor.folder
    assert folder.parent == exported["cache"] / "onnx-int8" and int8.backend == "onnxruntime-int8"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["int8"] == {"dit": DIT_INT8, "decoder": DECODER_INT8, "calibration_latents": 64}
    float32 = json.loads((exported["onnx"] / MANIFEST).read_text())
    assert manifest["weights_sha256"] == float32["weights_sha256"]
    for name in (STEP_CONTEXT, STEP):  # every weight product int8, none left in float32 with a weight
        ops = _op_types(folder / name)
        assert "DynamicQuantizeLinear" in ops or "DynamicQuantizeMatMul" in ops
        assert (folder / name).stat().st_size < 0.6 * (exported["onnx"] / name).stat().st_size
    assert {"QuantizeLinear", "DequantizeLinear"} <= _op_types(folder / "decoder.onnx")
    stamp = {f: (folder / f).stat().st_mtime_ns for f in (STEP_CONTEXT, STEP, "decoder.onnx")}
    with pytest.MonkeyPatch.context() as mp:  # loaded again: the graphs are reused, not quantised again
        mp.setenv("WORLDLOOP_CACHE", str(exported["cache"]))
        again = WorldModel.from_pretrained(exported["model"], backend="onnxruntime-int8",
                                           prompt_encoder=prompt_encoder, calibration_frames=lambda: 1 / 0)
    assert again.executor.folder == folder
    assert stamp == {f: (folder / f).stat().st_mtime_ns for f in stamp}


def test_without_calibration_frames_the_int8_decoder_stays_float32(exported: dict) -> None:
    from worldloop.models.onnx_quantize import DECODER_FLOAT, matches
    from worldloop.models.onnx_runtime import graphs_for

    files = load_model(exported["model"])
    dit, vae = DiT(files.config), LatentAutoencoder(files.config)
    dit.load_state_dict(files.dit_ema)
    vae.load_state_dict(files.vae)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORLDLOOP_CACHE", str(exported["cache"]))
        folder = graphs_for(dit, vae, exported["model"], int8=True)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert folder.name.endswith("-dit-only") and manifest["int8"]["decoder"] == DECODER_FLOAT
    assert _op_types(folder / "decoder.onnx") == _op_types(exported["onnx"] / "decoder.onnx")
    digest = manifest["weights_sha256"]
    assert matches(folder, digest, decoder_int8=False) and not matches(folder, digest, decoder_int8=True)
    assert not matches(exported["onnx"], digest, decoder_int8=False)  # float32 graphs are not int8 ones


def test_int8_rollout_stays_close_to_float32_and_is_deterministic(pair: tuple[WorldModel, WorldModel],
                                                                   int8: WorldModel) -> None:
    eager, _ = pair
    want, want_latents = _rollout(eager, 1, seed=5)
    frames, latents = _rollout(int8, 1, seed=5)
    _, other = _rollout(eager, 1, seed=6)  # what "a different rollout" is: another seed's latents

    def rel(a: torch.Tensor) -> float:  # RMS difference to float32's latents ÷ their RMS spread
        return float((a - want_latents).square().mean().sqrt() / want_latents.std())

    # Measured on the three tiny models: 0.8–2.7 % for int8, 41–137 % for another seed.
    assert rel(latents) <= 0.05 and rel(latents) <= 0.1 * rel(other)
    again, _ = _rollout(int8, 1, seed=5)
    assert np.array_equal(frames, again)


def test_export_int8_writes_the_graphs_the_backend_finds(exported: dict, prompt_encoder: PromptEncoder,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    if exported["prediction"] != "v":
        pytest.skip("one export is enough: the quantiser does not depend on the prediction")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORLDLOOP_CACHE", str(exported["cache"] / "unused"))
        assert main(["export", str(exported["model"]), "--onnx", "--int8"]) == 0
        wm = WorldModel.from_pretrained(exported["model"], backend="onnxruntime-int8",
                                        prompt_encoder=prompt_encoder)
    assert wm.executor.folder == exported["model"] / "onnx-int8"
    assert not (exported["cache"] / "unused").exists()
    assert "decoder: static QDQ int8" in capsys.readouterr().out
    assert main(["export", str(exported["model"]), "--int8"]) == 2
    assert "use it with --onnx" in capsys.readouterr().err


def test_interactive_start_plays_on_torch_while_the_graphs_are_prepared(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """``load_model(background=True)`` (serve, play, gradio) returns the model on PyTorch at once when auto
    picks ONNX Runtime, has a child process make the graphs and then switches the same model, mid-session; a
    failure (of the child, or anything else) leaves it on PyTorch with a warning."""
    import threading

    from worldloop.app import loading

    monkeypatch.setenv("WORLDLOOP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "resolve_backend", lambda backend, device, config: (
        ("onnxruntime-int8", "auto: test") if backend == "auto" else (backend, "asked for")))
    # auto picks ONNX Runtime only on a CPU without native bf16, where PyTorch plays in float32 (on one with
    # it the model would run bf16, which the float32 graphs cannot take over mid-session)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    release, real = threading.Event(), loading.prepare_graphs_in_child

    def gated(*args: Any) -> None:
        assert release.wait(120)
        real(*args)

    monkeypatch.setattr(loading, "prepare_graphs_in_child", gated)
    choice = loading.choose_model(None, "tiny", fallback=True)

    def prepared(wm: WorldModel, within: float) -> None:
        deadline = time.monotonic() + within
        while wm.pending_backend is not None:
            assert time.monotonic() < deadline, "the graphs were not ready in time"
            time.sleep(0.05)

    with caplog.at_level("INFO", logger="worldloop.app.loading"):
        wm = loading.load_model(choice, backend="auto", max_sessions=1, background=True)
        assert (wm.backend, wm.executor, wm.pending_backend) == ("torch", None, "onnxruntime-int8")
        session = wm.new_session("a stone dungeon", seed=1)
        for k in KEYS[:3]:  # plays while nothing is exported yet
            wm.next_frame([session], [k])
        assert not (tmp_path / "cache").exists()
        release.set()
        prepared(wm, 300)
    assert (wm.backend, wm.pending_backend) == ("onnxruntime-int8", None)
    assert wm.executor is not None and wm.executor.folder.parent == tmp_path / "cache" / "onnx-int8"
    assert "switched to onnxruntime-int8" in caplog.text
    steps = 0
    frame_step = wm.executor.frame_step

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal steps
        steps += 1
        return frame_step(*args, **kwargs)

    wm.executor.frame_step = counted
    for k in KEYS[3:6]:  # the same session goes on, now on ONNX Runtime
        frame = wm.next_frame([session], [k])[0]
    assert steps == 3 and frame.shape == (*wm.frame_shape, 3) and session.frame_index == 6
    wm.close_session(session)

    def broken(*args: Any) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(loading, "prepare_graphs_in_child", broken)
    with caplog.at_level("INFO", logger="worldloop.app.loading"):
        wm = loading.load_model(choice, backend="auto", max_sessions=1, background=True)
        prepared(wm, 60)
    assert (wm.backend, wm.executor, wm.pending_backend) == ("torch", None, None)
    assert ("onnxruntime-int8 failed to start (OSError: No space left on device); playing on torch"
            in caplog.text)
    gone = loading.ModelChoice(choice.config, path=tmp_path / "no-such-model")  # the child itself fails
    with pytest.raises(RuntimeError, match="the process making the graphs failed"):
        real(gone, 0, "onnxruntime-int8")


def test_graph_folders_of_an_older_format_are_pruned_from_the_cache(tmp_path: Path) -> None:
    """A new export into the user cache removes folders an older graph format left there (tens of MiB each,
    never read again) and unfinished exports' hidden folders once an hour old; other models' graphs of this
    format, foreign folders and a young unfinished export (maybe another process's, running) stay."""
    from worldloop.models.onnx_export import FORMAT, VERSION
    from worldloop.models.onnx_runtime import prune_stale

    def folder(name: str, manifest: dict | None) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "dit_step.onnx").write_bytes(b"\0" * 1024)
        if manifest is not None:
            (tmp_path / name / MANIFEST).write_text(json.dumps(manifest))
        return tmp_path / name

    old = folder("a-old", {"format": FORMAT, "version": VERSION - 1})
    current = folder("b-current", {"format": FORMAT, "version": VERSION})
    foreign = folder("c-foreign", {"format": "something-else", "version": 0})
    bare = folder("d-bare", None)
    abandoned = folder(".b-current-killed", None)  # an export killed mid-way, two hours ago
    os.utime(abandoned, (time.time() - 7200, time.time() - 7200))
    running = folder(".b-current-running", None)  # another process exporting right now
    assert prune_stale(tmp_path) == [abandoned, old]
    assert not old.exists() and not abandoned.exists()
    assert all(p.exists() for p in (current, foreign, bare, running))
    assert prune_stale(tmp_path / "missing") == []
