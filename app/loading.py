"""Choosing and loading the world model for the app's commands (play, serve, gradio, rollout, bench).

A command names a model directory (``--model DIR``) or a preset with random weights (``--preset NAME``). With
neither it uses the shipped model in ``assets/default/``; commands meant to work out of the box fall back to
the ``default`` preset with random weights when that is not shipped, and say loudly that the weights are
untrained. The options every command spells the same way (``--model``, ``--device``, ``--steps``) are added
here; ``worldloop`` resolves ``--device`` (``app/cli.py``) before a command runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from worldloop.app.errors import UserError
from worldloop.models.config import BACKENDS, ONNX_BACKENDS, PRESETS, ModelConfig, preset

if TYPE_CHECKING:  # the model stack (torch, transformers) loads only when a command builds a model
    import numpy as np

    from worldloop.models.world_model import WorldModel


def shipped_asset(name: str) -> Path:
    """``assets/NAME``: the package data of ``worldloop.assets`` when installed, the repository's folder
    in an editable install (``pyproject.toml`` maps ``worldloop.assets`` to ``assets/``)."""
    spec = importlib.util.find_spec("worldloop.assets")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / name).is_dir():
            return Path(folder) / name
    return Path(__file__).resolve().parent.parent / "assets" / name  # the same place, by layout


log = logging.getLogger(__name__)
DEFAULT_MODEL_DIR = shipped_asset("default")
FALLBACK_PRESET = "default"


def default_cpu_threads() -> int:
    """The torch CPU threads a served model runs with unless told: measured fastest for the default model on
    2-core machines. Where the CPU multiplies bf16 natively (AVX-512 BF16) the model runs in bf16 and one
    thread wins (31 vs 22 FPS with two); elsewhere it runs in float32 and two win (AVX2: 20–22 vs 17.7 FPS,
    key to frame 67–78 vs 98 ms; `worldloop bench --quick`, 2026-12-03). Never more than the usable cores."""
    import torch

    if torch.cpu._is_avx512_bf16_supported():
        return 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(2, usable))


# How the CPU default is chosen, for help texts. `serve`, `play` and `bench` use it alike, so bench measures
# what play runs.
CPU_THREADS_RULE = "1 on a CPU with native bf16 (AVX-512 BF16), else 2"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options every model-serving command shares: where the weights come from, device and steps."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="DIR", help="model directory (default: assets/default)")
    source.add_argument("--preset", choices=sorted(PRESETS), help="a preset with RANDOM weights")
    add_device_option(parser)
    parser.add_argument("--steps", type=int, help="denoising steps per frame (default: the model's)")
    add_backend_option(parser)


AUTO_BACKEND = "auto"
BACKEND_ENV = "WORLDLOOP_BACKEND"  # what --backend auto means when set (the test suite pins torch)


def add_backend_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=(AUTO_BACKEND, *BACKENDS), default=AUTO_BACKEND,
                        help="what runs the DiT and the decoder: PyTorch, or ONNX Runtime on the CPU with "
                             "float32 graphs (onnxruntime) or int8 ones (onnxruntime-int8), exported from "
                             "the model on first use (about a minute; serve, play and gradio play on "
                             "PyTorch meanwhile). auto: onnxruntime-int8 on a CPU without native bf16 "
                             "when ONNX Runtime is installed, else torch (default: %(default)s)")


def resolve_backend(backend: str, device: str, config: ModelConfig) -> tuple[str, str]:
    """``--backend`` → (the backend to run, why). ``auto`` (or ``$WORLDLOOP_BACKEND``) picks ONNX Runtime's
    int8 graphs where they were measured fastest — on a CPU without native bf16, where PyTorch runs the
    model in float32 (an AVX2 2-core EPYC, shipped model, 1 step: 27.9 FPS against 19.5 at 2 threads, 21.7
    against 15.6 at 1; docs/onnx.md) — when ONNX Runtime is installed and runs the model (not a
    reprojecting one); PyTorch everywhere else."""
    if backend != AUTO_BACKEND:
        return backend, "asked for"
    pinned = os.environ.get(BACKEND_ENV) or AUTO_BACKEND
    if pinned != AUTO_BACKEND:
        if pinned not in BACKENDS:
            raise UserError(f"${BACKEND_ENV} must be one of {', '.join((AUTO_BACKEND, *BACKENDS))}, "
                            f"got {pinned!r}")
        return pinned, f"${BACKEND_ENV}"
    if device != "cpu":
        return "torch", f"auto: {device}"
    import torch

    if torch.cpu._is_avx512_bf16_supported():
        return "torch", "auto: this CPU multiplies bf16 natively"
    if config.camera.reproject:
        return "torch", "auto: ONNX Runtime does not run reprojecting models yet"
    if any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxruntime", "onnxscript")):
        return "torch", "auto: ONNX Runtime is not installed (pip install 'worldloop[onnx]')"
    return "onnxruntime-int8", "auto: this CPU has no native bf16; --backend torch for PyTorch"


# Worlds the int8 decoder's activation ranges are calibrated on: training-side seeds (not the eval's
# held-out worlds), 16 worlds × 4 frames.
CALIBRATION_SEED, CALIBRATION_WORLDS, CALIBRATION_FRAMES = 8_113, 16, 4


def calibration_frames(height: int, width: int) -> np.ndarray:
    """uint8 (64, H, W, 3) frames of the built-in world (explorer-driven, mixed themes): int8 calibration."""
    from worldloop.distill.data.clips import WorldClips

    clips = WorldClips(height, width, CALIBRATION_FRAMES, "cpu", seed=CALIBRATION_SEED)
    return clips.batch(0, CALIBRATION_WORLDS).frames.flatten(0, 1).numpy()


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when available, else the CPU), cpu, cuda or cuda:N (default: auto)")


def torch_threads(device: str, threads: int | None) -> int | None:
    """The torch CPU threads a model serves with: ``threads``, else ``default_cpu_threads()`` on the CPU
    (None: torch's default, on a GPU)."""
    if threads is not None:
        return threads
    return default_cpu_threads() if device == "cpu" else None


@dataclass(frozen=True)
class ModelChoice:
    """Where the weights come from: a model directory (trained) or a preset (random weights)."""

    config: ModelConfig
    path: Path | None = None
    preset: str | None = None

    @property
    def trained(self) -> bool:
        return self.path is not None

    @property
    def source(self) -> str:
        return str(self.path) if self.path is not None else f"preset {self.preset} (random weights)"

    def warning(self) -> str | None:
        """A loud warning for random weights, None for a trained model."""
        if self.trained:
            return None
        return (f"WARNING: the model has RANDOM, UNTRAINED weights (preset {self.preset!r}): the pictures "
                "are noise. Everything else (model speed, cache, streaming, controls) is real.")


def choose_model(model: str | Path | None, preset_name: str | None, *, fallback: bool) -> ModelChoice:
    """Resolve ``--model``/``--preset``; ``fallback`` allows random weights when assets/default is missing."""
    from worldloop.models.checkpoint import read_config

    if model is not None and preset_name is not None:
        raise UserError("give either --model DIR or --preset NAME, not both")
    if preset_name is not None:
        return ModelChoice(preset(preset_name), preset=preset_name)
    if model is not None:
        path = Path(model)
        if not path.is_dir():
            raise UserError(f"no model directory at {path}")
        return ModelChoice(read_config(path)[0], path=path)
    if (DEFAULT_MODEL_DIR / "config.json").is_file():
        return ModelChoice(read_config(DEFAULT_MODEL_DIR)[0], path=DEFAULT_MODEL_DIR)
    if not fallback:
        raise UserError(f"the trained model is not shipped yet ({DEFAULT_MODEL_DIR} is missing); "
                                "pass --model DIR, or --preset NAME for random weights")
    return ModelChoice(preset(FALLBACK_PRESET), preset=FALLBACK_PRESET)


def load_model(choice: ModelChoice, *, device: str = "cpu", steps: int | None = None, seed: int = 0,
               max_sessions: int = 8, backend: str = "torch", background: bool = False) -> WorldModel:
    """Build the ``WorldModel`` for a choice (random weights are drawn from ``seed``) on a backend
    (``auto``: ``resolve_backend``).

    ``background`` (the interactive commands: serve, play, gradio): when ``auto`` picks ONNX Runtime, return
    the model on PyTorch at once and switch it to ONNX Runtime (``WorldModel.use_backend``) once its graphs
    are ready — exported and quantised the first time (about a minute on 2 cores) by a child process at low
    priority (in a thread of this one the exporter's Python held the interpreter lock and play fell to
    0.4 FPS), loaded in a second after that — so a first start plays at once instead of waiting; if that
    fails it stays on PyTorch, with a warning. Offline commands (rollout, bench) wait instead: their frames
    must not depend on when a switch happens."""
    from worldloop.models.checkpoint import CheckpointError
    from worldloop.models.device import resolve_device
    from worldloop.models.world_model import WorldModel

    device = str(resolve_device(device))  # "auto" from callers that bypass the CLI's own resolution
    backend, why = resolve_backend(backend, device, choice.config)
    if why.startswith(("auto", "$")):
        log.info("backend: %s (%s)", backend, why)
    if backend != "torch":
        device = check_backend(backend, device)
        if choice.config.camera.reproject:
            raise UserError(f"--backend {backend} does not run reprojecting models (camera.reproject: "
                            f"{choice.path or choice.config.name}) yet; use --backend torch")
    config = choice.config
    int8 = backend == "onnxruntime-int8"
    frames = (lambda: calibration_frames(config.height, config.width)) if int8 else None

    def build(backend: str) -> WorldModel:
        if choice.path is not None:
            return WorldModel.from_pretrained(choice.path, steps=steps, device=device,
                                              max_sessions=max_sessions, backend=backend,
                                              calibration_frames=frames)
        return WorldModel.from_config(choice.config, seed=seed, device=device, max_sessions=max_sessions,
                                      steps=steps, backend=backend, calibration_frames=frames)

    if background and backend != "torch" and why.startswith("auto"):
        model = build("torch")
        model.pending_backend = backend
        threading.Thread(target=_switch, args=(model, backend, frames, choice, seed),
                         name="worldloop-onnx-graphs", daemon=True).start()
        return model
    try:
        return build(backend)
    except CheckpointError:
        raise  # the weights themselves: the same on every backend
    except Exception as err:  # noqa: BLE001 — auto never does worse than PyTorch: export, cache, runtime
        if backend != "torch" and why.startswith("auto"):
            log.warning("backend %s failed to start (%s: %s); playing on torch instead", backend,
                        type(err).__name__, err)
            return build("torch")
        if isinstance(err, ImportError):  # the backend's packages are missing: say how to install them
            raise UserError(str(err)) from None
        raise


def _switch(model: WorldModel, backend: str, frames: Callable[[], np.ndarray] | None, choice: ModelChoice,
            seed: int) -> None:
    """Have a child process make ``backend``'s graphs for ``model``'s weights, then switch ``model`` to them
    (``load_model(background=True)``; runs in a thread)."""
    start = time.monotonic()
    log.info("preparing the %s graphs in the background; playing on torch until they are ready", backend)
    try:
        prepare_graphs_in_child(choice, seed, backend)
        model.use_backend(backend, calibration_frames=frames)  # finds the graphs the child made: loads them
    except StoppedPreparing as stopped:
        log.info("%s", stopped)
    except Exception as err:  # noqa: BLE001 — auto never does worse than PyTorch: export, cache, runtime
        log.warning("backend %s failed to start (%s: %s); playing on torch", backend, type(err).__name__, err)
    else:
        log.info("switched to %s after %.1f s", backend, time.monotonic() - start)
    finally:
        model.pending_backend = None


def prepare_graphs_in_child(choice: ModelChoice, seed: int, backend: str) -> None:
    """Export (and quantise) ``backend``'s graphs of a model into the user cache, in a child process."""
    process = multiprocessing.get_context("spawn").Process(
        target=_prepare_graphs, args=(choice, seed, backend), name="worldloop-onnx-graphs", daemon=True)
    process.start()
    process.join()
    if process.exitcode is None:  # this process is shutting down; multiprocessing's atexit ends the child
        raise StoppedPreparing("stopped before the graphs were ready")
    if process.exitcode != 0:
        raise RuntimeError(f"the process making the graphs failed (exit code {process.exitcode})")


class StoppedPreparing(Exception):
    """The app stopped while a child process was still making the graphs (nothing to warn about)."""


def _prepare_graphs(choice: ModelChoice, seed: int, backend: str) -> None:
    """The child of ``prepare_graphs_in_child``: loads the player's model on ``backend`` the way
    ``load_model`` would without ``background`` (the same weights: the same directory, or the same preset and
    seed), which makes the graphs into the user cache; one thread at low priority, so the player's frames
    come first."""
    import torch

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ended by the app (SIGTERM, as multiprocessing ends a daemon child): unwind, so the exporter's
    # ``finally`` removes its half-written folder.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    os.nice(10)
    torch.set_num_threads(1)
    load_model(choice, seed=seed, max_sessions=1, backend=backend)


def check_backend(backend: str, device: str) -> str:
    """Fail before any model work when a backend cannot run here (its packages, its device); returns the
    device it runs on (``auto`` means the CPU for onnxruntime)."""
    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend in ONNX_BACKENDS:
        from worldloop.models.onnx_runtime import require_onnxruntime

        if device not in ("cpu", "auto"):
            raise UserError(f"--backend {backend} runs on the CPU, not {device}; use --device cpu")
        try:
            require_onnxruntime()
        except ImportError as err:
            raise UserError(str(err)) from None
        return "cpu"
    return device
