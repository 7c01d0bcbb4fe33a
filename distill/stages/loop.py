"""The one training loop every stage plugs into: run folder, resume, data timing, progress, log, checkpoints,
the stop signal, samples and the exported model directory.

A stage (``vae``, ``teacher``, ``cd``, ``dmd``) is a ``Stage``: it builds its modules, EMA and optimizer,
then ``train`` calls, per iteration (one optimizer update; several for DMD's critic):

1. ``batch(iteration)`` — the iteration's data (timed: the log's ``data_share``);
2. ``step(iteration, batch) -> Step`` — forward, backward, optimizer, EMA; frames seen and what to log;
3. every ``log_every``: one JSON line (the step's record, ``lr``, frames/s, data share);
4. every ``checkpoint_every``: ``checkpoint.pt`` (and the model directory when ``export_at_checkpoints``);
5. every ``sample_every`` (rank 0): ``samples(iteration, batch)``, pictures and videos under ``samples/``.

On SIGTERM or Ctrl-C, or at ``cfg.iterations``, it saves the checkpoint and exports ``model/`` (rank 0).
Determinism: every random draw of an iteration comes from ``step_generator(seed, iteration, rank)``, so a
resumed run continues with the numbers the uninterrupted run would have used (see ``runtime``).

    class MyStage(Stage):
        name, title = "mine", "train mine"
        def step(self, iteration, batch): ...; return Step(frames=..., loss=loss.item(), record={...})
    train(MyStage(...), cfg, ddp, resume=False)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from worldloop.distill.stages.run import (
    JsonlLog,
    Progress,
    RunDir,
    StopSignal,
    load_checkpoint,
    save_checkpoint,
)
from worldloop.distill.stages.runtime import EMA, Distributed, TrainConfig, TrainResult, any_rank


@dataclass
class Step:
    """What one iteration did: frames it trained on (this process), the loss shown on the progress bar, and
    the values to log (tensors are read only when a line is written); ``log_now`` forces a log line."""

    frames: int
    loss: float
    record: dict[str, float | torch.Tensor] = field(default_factory=dict)
    log_now: bool = False


class Stage:
    """A training stage: set ``name`` (the checkpoint's stage), ``title`` (progress bar), ``settings`` (the
    run's ``train.json``; its model/objective must match on resume), ``modules``/``emas``/``optimizer`` (the
    checkpointed state) and ``trained`` (the module ``train`` returns); implement ``batch``, ``step`` and
    ``export``, optionally ``samples`` and ``save_extra``/``load_extra``."""

    name: str
    title: str
    settings: dict[str, Any]
    modules: dict[str, nn.Module]
    emas: dict[str, EMA]
    optimizer: torch.optim.Optimizer
    trained: nn.Module
    export_at_checkpoints = False  # write model/ with every checkpoint (else at the end only)

    def batch(self, iteration: int) -> Any:
        raise NotImplementedError

    def step(self, iteration: int, batch: Any) -> Step:
        raise NotImplementedError

    def export(self, iteration: int, out: Path) -> None:
        raise NotImplementedError

    def save_extra(self, run: RunDir) -> None:
        """State kept beside ``checkpoint.pt`` (rank 0, written just before it), e.g. a second optimizer."""

    def load_extra(self, run: RunDir) -> None:
        """Read back what ``save_extra`` wrote (on resume, after ``checkpoint.pt``)."""

    def samples(self, iteration: int, batch: Any, run: RunDir) -> None:
        """Sample pictures of the current EMA model under ``run.samples`` (rank 0, every ``sample_every``)."""


def prepare_run(cfg: TrainConfig, settings: dict[str, Any], resume: bool, ddp: Distributed) -> RunDir:
    """The run folder, checked against ``resume`` before a stage builds anything; rank 0 writes train.json."""
    run = RunDir(Path(cfg.out))
    run.prepare(resume, settings, write=ddp.is_main)
    return run


def train(stage: Stage, cfg: TrainConfig, ddp: Distributed, run: RunDir, *, resume: bool) -> TrainResult:
    """Run ``stage`` from its checkpoint (``resume``) or from iteration 0 up to ``cfg.iterations``."""
    state = {"modules": stage.modules, "emas": stage.emas, "optimizer": stage.optimizer}
    iteration = 0
    if resume:
        iteration = load_checkpoint(run.checkpoint, stage=stage.name, settings=stage.settings, **state)
        stage.load_extra(run)
    log = JsonlLog(run.log, ddp.is_main)
    progress = Progress(iteration, cfg.iterations, stage.title, ddp.is_main)

    def save() -> None:
        if ddp.is_main:
            stage.save_extra(run)
            save_checkpoint(run.checkpoint, stage=stage.name, iteration=iteration, settings=stage.settings,
                            **state)
            if stage.export_at_checkpoints:
                stage.export(iteration, run.model)

    with StopSignal() as stop:
        while iteration < cfg.iterations and not any_rank(stop.requested, ddp):
            started = time.perf_counter()
            batch = stage.batch(iteration)
            data_seconds = time.perf_counter() - started
            done = stage.step(iteration, batch)
            iteration += 1
            progress.update(done.frames * ddp.world_size, data_seconds, loss=done.loss)
            if iteration % cfg.log_every == 0 or iteration == cfg.iterations or done.log_now:
                record = {k: float(v) for k, v in done.record.items()}
                log.write(iteration=iteration, **record, frames_per_s=progress.rate(),
                          data_share=progress.data_share())
                progress.reset_rate()
            if iteration % cfg.checkpoint_every == 0:
                save()
            if ddp.is_main and cfg.sample_every and iteration % cfg.sample_every == 0:
                stage.samples(iteration, batch, run)
    progress.close()
    save()
    if ddp.is_main and not stage.export_at_checkpoints:
        stage.export(iteration, run.model)
    return TrainResult(run.model, iteration, stage.trained)
