"""``worldloop bench`` end to end on the tiny preset (a real server and websocket client on loopback), its
report's fields, its option checks, and the small statistics helpers it shares with benchmarks/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.train_fakes import random_model_dir
from worldloop.app.bench import largest_passing
from worldloop.app.cli import build_parser, main
from worldloop.app.errors import UserError
from worldloop.models.config import preset
from worldloop.models.timing import percentile, summary

pytestmark = pytest.mark.timeout(120)

QUICK = ["--quick", "--threads", "1", "--frames", "4", "--warmup", "1", "--trials", "3",
         "--serve-seconds", "0.3"]


def bench(argv: list[str], tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    assert main(["bench", *argv, *QUICK, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def test_percentiles_are_nearest_rank() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [percentile(values, q) for q in (0.0, 0.5, 1.0)] == [1.0, 3.0, 5.0]
    assert percentile([7.0], 0.95) == 7.0
    assert summary([float(v) for v in range(1, 12)]) == {"median": 6.0, "p90": 10.0}


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 8, 100])
def test_largest_passing_doubles_then_bisects(limit: int) -> None:
    for threshold in range(limit + 2):
        asked: list[int] = []

        def passes(n: int, threshold: int = threshold, asked: list[int] = asked) -> bool:
            asked.append(n)
            return n <= threshold

        assert largest_passing(limit, passes) == min(threshold, limit)
        assert len(asked) == len(set(asked)) and all(1 <= n <= limit for n in asked)
        assert asked[0] == 1 and len(asked) <= 2 * max(1, limit).bit_length() + 1


def test_bench_on_the_tiny_preset_reports_every_field(tmp_path: Path, single_thread: None,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    r = bench(["--preset", "tiny", "--max-sessions-probe", "2", "--probe-seconds", "0.4"], tmp_path)
    table = capsys.readouterr().out
    assert "worldloop bench" in table and "key→frame" in table and "RANDOM" in table
    assert "cpu / torch / 1" in table  # device / backend (auto, pinned to torch in the suite) / steps

    hw = r["hardware"]
    assert hw["cpu"] and positive(hw["cores"]) and hw["torch_threads"] == 1 and hw["gpu"] is None
    assert hw["torch"] == torch.__version__ and hw["device"] == "cpu"
    assert r["tool"] == "worldloop bench" and r["date"][:2] == "20"
    for when in ("before", "after"):
        assert len(r["load_average"][when]) == 3 and all(x >= 0 for x in r["load_average"][when])

    m = r["model"]
    assert (m["name"], m["preset"], m["path"], m["trained"]) == ("tiny", "tiny", None, False)
    assert "RANDOM" in m["warning"] and m["params"] == m["dit_params"] + m["vae_params"] > 0
    assert m["frame_size"] == [preset("tiny").height, preset("tiny").width] and m["steps"] == 1

    o = r["options"]
    assert (o["device"], o["threads"], o["frames"], o["trials"], o["quick"]) == ("cpu", 1, 4, 3, True)
    assert o["target_fps"] == preset("tiny").fps

    ff = r["first_frame"]
    assert all(positive(ff[k]) for k in ("model_load_s", "new_session_ms", "first_frame_ms", "total_s"))
    assert ff["total_s"] * 1e3 >= ff["new_session_ms"] + ff["first_frame_ms"]

    st = r["steady"]
    assert st["frames"] == 4 and positive(st["fps"]) and positive(st["cpu_ms_per_frame"])
    assert st["dit_forwards_per_frame"] == 1  # one step, cache pass fused
    for part in ("frame", "dit", "decode", "encode"):
        assert 0 < st["ms"][part]["median"] <= st["ms"][part]["p90"], part
    assert st["ms"]["frame"]["median"] >= st["ms"]["dit"]["median"]

    sv = r["serving"]
    lat = sv["key_to_frame_ms"]
    assert positive(sv["fps"]) and positive(sv["start_to_first_frame_ms"]) and lat["trials"] == 3
    assert 0 < lat["p50"] <= lat["p95"]

    assert positive(r["memory"]["peak_rss_mib"]) and r["memory"]["cuda_max_allocated_mib"] is None

    c = r["concurrency"]
    assert c["probed"] and c["max_sessions_probe"] == 2 and 0 <= c["sessions_held"] <= 2
    assert [p["sessions"] for p in c["probes"]][:1] == [1]
    for p in c["probes"]:
        assert 0 <= p["fps_min"] <= p["fps_median"] and p["held"] == (p["fps_min"] >= 0.95 * c["target_fps"])
    held = [p["sessions"] for p in c["probes"] if p["held"]]
    assert c["sessions_held"] == max(held, default=0)
    assert positive(c["memory"]["peak_rss_mib"])


def test_bench_on_a_model_directory_is_flagged_trained(tmp_path: Path, single_thread: None) -> None:
    model = random_model_dir(preset("tiny"), tmp_path / "model")
    r = bench(["--model", str(model), "--steps", "2"], tmp_path)
    m = r["model"]
    assert m["trained"] is True and m["path"] == str(model) and m["warning"] is None
    assert r["model"]["steps"] == 2 and r["steady"]["dit_forwards_per_frame"] == 2
    assert r["concurrency"] == {"probed": False, "target_fps": 30, "max_sessions_probe": 0}


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--frames", "0"], "--frames must be ≥ 1"),
    (["--frames", "-5"], "--frames must be ≥ 1"),
    (["--threads", "0"], "--threads must be ≥ 1"),
    (["--steps", "9"], "--steps must be in 1..8"),
    (["--trials", "0"], "--trials must be ≥ 1"),
    (["--max-sessions-probe", "-1"], "--max-sessions-probe must be ≥ 0"),
])
def test_bad_options_are_one_line_exit_2(argv: list[str], message: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--preset", "tiny", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("\n") == 0 and err.startswith("worldloop bench: error:") and message in err
    assert captured.out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--preset", "tiny", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_bench_runs_the_model_as_play_does(tmp_path: Path, single_thread: None) -> None:
    """No --threads: bench uses the torch threads `worldloop play` serves with, not torch's default (2)."""
    from worldloop.app.commands import play, serve
    from worldloop.app.loading import default_cpu_threads

    torch.set_num_threads(2)
    out = tmp_path / "bench.json"
    quick = [QUICK[0], *QUICK[3:]]  # QUICK without "--threads 1"
    assert main(["bench", "--preset", "tiny", *quick, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["options"]["threads"] == r["hardware"]["torch_threads"] == default_cpu_threads()

    torch.set_num_threads(2)
    parser = build_parser(["play"])
    args = play.serve_args(parser.parse_args(["play", "--preset", "tiny", "--device", "cpu"]), 0, tmp_path)
    _, engine, _ = serve.build(args)
    assert torch.get_num_threads() == r["hardware"]["torch_threads"]
    engine.close()


@pytest.mark.parametrize(("bf16", "cores", "expected"),
                         [(True, 2, 1), (False, 2, 2), (False, 16, 2), (False, 1, 1)])
def test_the_default_cpu_threads_follow_the_precision(monkeypatch: pytest.MonkeyPatch, bf16: bool, cores: int,
                                                      expected: int) -> None:
    """One thread where the model runs in native bf16, two where it runs in float32, never more than the
    usable cores."""
    import os

    from worldloop.app.loading import default_cpu_threads, torch_threads

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_cpu_threads() == expected
    assert torch_threads("cpu", None) == expected and torch_threads("cpu", 3) == 3
    assert torch_threads("cuda", None) is None


def test_a_float32_cpu_model_gets_the_onnxruntime_hint() -> None:
    """A model PyTorch runs in float32 on the CPU (no native bf16) is told about ONNX Runtime; one in bf16, or
    on ONNX Runtime already, is not."""
    from tests.train_fakes import FakePromptEncoder
    from worldloop.app.commands.serve import float32_hint
    from worldloop.models.dit import DiT
    from worldloop.models.vae import LatentAutoencoder
    from worldloop.models.world_model import WorldModel

    config = preset("tiny")

    def model(precision: str) -> WorldModel:
        return WorldModel(config, DiT(config), LatentAutoencoder(config), FakePromptEncoder(16),
                          precision=precision)

    hint = float32_hint(model("fp32"))
    assert hint is not None and "--backend onnxruntime-int8" in hint
    assert float32_hint(model("bf16")) is None


@pytest.mark.parametrize(("bf16", "installed", "reproject", "device", "expected"), [
    (False, True, False, "cpu", "onnxruntime-int8"),  # AVX2: int8 graphs, measured fastest
    (True, True, False, "cpu", "torch"),  # native bf16: PyTorch's bf16 path
    (False, False, False, "cpu", "torch"),  # no ONNX Runtime installed
    (False, True, True, "cpu", "torch"),  # ONNX Runtime does not run reprojecting models
    (False, True, False, "cuda", "torch"),
])
def test_backend_auto_picks_int8_onnxruntime_only_where_it_is_faster(
        monkeypatch: pytest.MonkeyPatch, bf16: bool, installed: bool, reproject: bool, device: str,
        expected: str) -> None:
    import importlib.util
    from dataclasses import replace

    from worldloop.app.loading import resolve_backend

    monkeypatch.delenv("WORLDLOOP_BACKEND", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    find_spec = importlib.util.find_spec
    def spec(name: str, *args: Any) -> Any:
        return find_spec(name, *args) if installed or name != "onnxruntime" else None

    monkeypatch.setattr(importlib.util, "find_spec", spec)
    config = preset("tiny")
    if reproject:
        config = config.replace(dit=replace(config.dit, prediction="delta"),
                                camera=replace(config.camera, reproject=True))
    backend, why = resolve_backend("auto", device, config)
    assert backend == expected and why.startswith("auto")
    assert resolve_backend("torch", "cpu", config) == ("torch", "asked for")
    monkeypatch.setenv("WORLDLOOP_BACKEND", "onnxruntime")  # the variable pins what auto means
    assert resolve_backend("auto", device, config) == ("onnxruntime", "$WORLDLOOP_BACKEND")
    monkeypatch.setenv("WORLDLOOP_BACKEND", "tensorrt")
    with pytest.raises(UserError, match="WORLDLOOP_BACKEND must be one of"):
        resolve_backend("auto", device, config)


def test_backend_auto_falls_back_to_torch_when_onnxruntime_fails(monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """``auto`` never plays worse than PyTorch: a failing export or runtime (a full disk, a read-only cache,
    an exporter that breaks) falls back to torch with a warning; a backend asked for by name fails loudly."""
    pytest.importorskip("onnxruntime")
    from worldloop.app import loading
    from worldloop.models.onnx_runtime import OnnxRuntimeExecutor

    monkeypatch.setattr(loading, "resolve_backend", lambda backend, device, config: (
        ("onnxruntime-int8", "auto: test") if backend == "auto" else (backend, "asked for")))

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(OnnxRuntimeExecutor, "for_model", broken)
    choice = loading.choose_model(None, "tiny", fallback=True)
    with caplog.at_level("WARNING", logger="worldloop.app.loading"):
        wm = loading.load_model(choice, backend="auto", max_sessions=1)
    assert wm.backend == "torch" and wm.executor is None
    assert ("onnxruntime-int8 failed to start (OSError: No space left on device); playing on torch"
            in caplog.text)
    with pytest.raises(OSError, match="No space left"):
        loading.load_model(choice, backend="onnxruntime-int8", max_sessions=1)
