"""A training run on disk and in time: run directory, resumable checkpoints, JSONL log, progress, signals.

See ``runtime.py`` for the directory layout. Only rank 0 writes; ``load_checkpoint`` runs on
every rank so all replicas resume from identical state.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from worldloop.distill.stages.runtime import EMA
from worldloop.models.config import ModelConfig

CHECKPOINT_FORMAT = "worldloop-train-1"


class RunError(ValueError):
    """A run directory or checkpoint that cannot be used (missing, mismatched, unreadable): one line."""


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.pt"

    @property
    def log(self) -> Path:
        return self.root / "log.jsonl"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def model(self) -> Path:
        return self.root / "model"

    def prepare(self, resume: bool, settings: dict[str, Any], write: bool) -> None:
        """Check the directory fits ``resume`` and record the run's settings (rank 0 only writes)."""
        if resume and not self.checkpoint.is_file():
            raise RunError(f"--resume: no checkpoint at {self.checkpoint}")
        if not resume and self.checkpoint.exists():
            raise RunError(f"{self.root} already holds a run (checkpoint.pt); pass --resume to continue it "
                           f"or choose another --out")
        if write:
            self.samples.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(self.root / "train.json", json.dumps(settings, indent=2, sort_keys=True))


def settings_dict(**parts: Any) -> dict[str, Any]:
    """Dataclasses (configs) → plain dicts, for ``train.json`` and checkpoints."""
    return {k: asdict(v) if is_dataclass(v) and not isinstance(v, type) else v for k, v in parts.items()}


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, *, stage: str, iteration: int, settings: dict[str, Any],
                    modules: dict[str, nn.Module], emas: dict[str, EMA],
                    optimizer: torch.optim.Optimizer, cpu_minutes: float = 0.0) -> None:
    """Write the full training state atomically (a crash mid-write leaves the previous checkpoint).

    The format calls the iteration ``step`` (kept, so every checkpoint written so far stays readable);
    ``cpu_minutes`` is the process CPU time the run has spent up to this iteration, over all its segments."""
    state = {
        "format": CHECKPOINT_FORMAT, "stage": stage, "step": iteration, "settings": settings,
        "cpu_minutes": float(cpu_minutes),
        "modules": {k: m.state_dict() for k, m in modules.items()},
        "ema": {k: e.state_dict() for k, e in emas.items()},
        "optimizer": optimizer.state_dict(), "rng": capture_rng(),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: Path, stage: str) -> dict[str, Any]:
    """Load and check a training checkpoint written by ``save_checkpoint`` for ``stage``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunError(f"no checkpoint at {path}") from None
    except Exception as err:  # a truncated or foreign file: say which, in one line
        reason = str(err).splitlines()[0] if str(err) else ""
        raise RunError(f"cannot read checkpoint {path}: {type(err).__name__}: {reason}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path} is not a worldloop training checkpoint")
    if state["stage"] != stage:
        raise RunError(f"{path} is a '{state['stage']}' checkpoint, not '{stage}'")
    return state


def load_checkpoint(path: Path, *, stage: str, settings: dict[str, Any], modules: dict[str, nn.Module],
                    emas: dict[str, EMA], optimizer: torch.optim.Optimizer) -> Resumed:
    """Restore weights, EMA, optimizer and RNG; returns the iteration to continue from and the CPU minutes
    spent before it (None from a checkpoint written before they were recorded).

    The model config (``settings["model"]``) and objective must equal the checkpoint's: a mismatch is an
    error rather than a silently different run. Optimisation settings (iterations, lr, …) may change.
    """
    state = read_checkpoint(path, stage)
    for key in ("model", "objective"):
        saved = state["settings"].get(key)
        if key == "model":
            saved = _model_settings(saved)
        if key in settings and saved != settings[key]:
            raise RunError(f"{path}: the checkpoint's {key} settings differ from this run's; resume with the "
                           f"same preset and options, or start a new --out")
    try:
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        for name, ema in emas.items():
            ema.load_state_dict(state["ema"][name])
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, RuntimeError, ValueError) as err:
        raise RunError(f"{path} does not match this model: {str(err).splitlines()[0]}") from None
    restore_rng(state["rng"])
    spent = state.get("cpu_minutes")
    return Resumed(int(state["step"]), None if spent is None else float(spent))


@dataclass(frozen=True)
class Resumed:
    """Where a resumed run continues: its iteration and the process CPU minutes spent before it."""

    iteration: int
    cpu_minutes: float | None


def logged_cpu_minutes(log: Path, iteration: int) -> float:
    """The CPU minutes a run's log says were spent up to ``iteration``, for a checkpoint that does not
    record them. Logs of that time restart their ``cpu_minutes`` at 0 in each resumed segment, so a fall
    starts a new segment and the segments are summed; 0 without a log."""
    total = last = 0.0
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return 0.0
    for line in lines:
        try:
            record = json.loads(line)
            it, minutes = int(record["iteration"]), float(record["cpu_minutes"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a crash, or one without the figure
        if it > iteration:
            break
        if minutes < last:
            total += last
        last = minutes
    return total + last


def _model_settings(saved: Any) -> Any:
    """A checkpoint's model config as today's ``ModelConfig.to_dict`` writes it: a checkpoint from before a
    config section existed (``camera``) gets that section's defaults, which is what it trained with."""
    if not isinstance(saved, dict):
        return saved
    try:
        return ModelConfig.from_dict(saved).to_dict()
    except (TypeError, ValueError):  # not a config this version reads: compared as it is
        return saved


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# Logging and progress


class JsonlLog:
    """Appends one JSON object per call; a no-op on non-main ranks."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled

    def write(self, **record: Any) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")


class Progress:
    """A tqdm bar from ``start`` to ``total`` showing the latest loss and throughput (frames/s).

    ``update`` also takes the seconds the iteration spent getting its data, so the log can say whether a run
    is bound by data generation (``data_share``).
    """

    def __init__(self, start: int, total: int, desc: str, enabled: bool = True) -> None:
        self.bar = tqdm(total=total, initial=start, desc=desc, disable=not enabled, dynamic_ncols=True,
                        unit="it")
        self.reset_rate()

    def update(self, frames: int, data_seconds: float = 0.0, **shown: float) -> None:
        self._frames += frames
        self._iterations += 1
        self._data += data_seconds
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()} | {"fps": f"{self.rate():.0f}"},
                             refresh=False)
        self.bar.update(1)

    def rate(self) -> float:
        """Frames per second since the last ``reset_rate``."""
        return self._frames / max(time.perf_counter() - self._t, 1e-9)

    def seconds_per_iteration(self) -> float:
        """Wall-clock seconds per iteration since the last ``reset_rate`` (data, step and logging)."""
        return (time.perf_counter() - self._t) / max(self._iterations, 1)

    def data_share(self) -> float:
        """Fraction of the time since the last ``reset_rate`` spent getting data."""
        return self._data / max(time.perf_counter() - self._t, 1e-9)

    def reset_rate(self) -> None:
        self._t, self._frames, self._data, self._iterations = time.perf_counter(), 0, 0.0, 0

    def close(self) -> None:
        self.bar.close()


class StopSignal:
    """While active, SIGTERM and the first Ctrl-C only set ``requested``; the loop then saves and exits.

    A second Ctrl-C raises ``KeyboardInterrupt`` at once. Handlers can only be installed from the main
    thread; elsewhere (e.g. a test calling the trainer from a worker thread) this is a plain flag.
    """

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopSignal:
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread
            self._old.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
