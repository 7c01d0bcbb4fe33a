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
        def __init__(self, cfg, ddp, settings):
            super().__init__(cfg, ddp, settings)
            self.trains("net", Net())
        def batch(self, iteration): return ...
        def step(self, iteration, batch):
            loss = ...; grad_norm = self.update(loss, self.trained, iteration)
            return Step(frames=..., loss=loss.item(), record={"loss": loss.item(), "grad_norm": grad_norm})
        def export(self, iteration, out): ...
    train(MyStage(cfg, ddp, settings), cfg, ddp, prepare_run(cfg, settings, resume, ddp), resume=resume)
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
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
    logged_cpu_minutes,
    save_checkpoint,
)
from worldloop.distill.stages.runtime import (
    EMA,
    Distributed,
    TrainConfig,
    TrainResult,
    any_rank,
    autocast,
    local_batch_size,
    lr_at,
    make_optimizer,
    optimizer_step,
    step_generator,
    wrap_model,
)
from worldloop.models.timing import cpu_seconds


@dataclass
class Step:
    """What one iteration did: frames it trained on (this process), the loss shown on the progress bar, and
    the values to log (tensors are read only when a line is written); ``log_now`` forces a log line."""

    frames: int
    loss: float
    record: dict[str, float | torch.Tensor] = field(default_factory=dict)
    log_now: bool = False


class Stage(ABC):
    """A training stage. Its constructor calls ``Stage.__init__`` (config, process, settings — the run's
    ``train.json``, whose model/objective must match on resume) and ``trains(name, module)`` (EMA and
    optimizer, the checkpointed state), then builds the rest; it implements ``batch``, ``step`` and
    ``export``, optionally ``samples`` and ``save_extra``/``load_extra``. The helpers below are the pieces
    of an iteration every stage shares."""

    name: str  # the checkpoint's stage
    title: str  # the progress bar's
    modules: dict[str, nn.Module]
    emas: dict[str, EMA]
    optimizer: torch.optim.Optimizer
    trained: nn.Module  # what ``train`` returns
    export_at_checkpoints = False  # write model/ with every checkpoint (else at the end only)

    def __init__(self, cfg: TrainConfig, ddp: Distributed, settings: dict[str, Any]) -> None:
        self.cfg, self.ddp, self.settings = cfg, ddp, settings
        self.batch_size = local_batch_size(cfg.batch_size, ddp)  # this process's share

    def trains(self, name: str, module: nn.Module) -> EMA:
        """``module`` is what this stage trains: its EMA and AdamW, checkpointed under ``name``."""
        ema = EMA(module, self.cfg.ema_decay)
        self.trained, self.optimizer = module, make_optimizer(module, self.cfg, self.ddp.device)
        self.modules, self.emas = {name: module}, {name: ema}
        return ema

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` compiled and in DDP as the run asks (``runtime.wrap_model``)."""
        return wrap_model(model, self.cfg, self.ddp)

    def generator(self, iteration: int) -> torch.Generator:
        """The iteration's own random numbers, from (seed, iteration, rank): a resumed run draws the same."""
        return step_generator(self.cfg.seed, iteration, self.ddp.rank, self.ddp.device)

    def autocast(self) -> AbstractContextManager[Any]:
        return autocast(self.ddp.device, self.cfg.bf16)

    def lr(self, iteration: int) -> float:
        return lr_at(iteration, self.cfg)

    def update(self, loss: torch.Tensor, model: nn.Module, iteration: int) -> float:
        """Backward and the optimizer update at the iteration's learning rate, then every EMA; returns the
        gradient norm."""
        grad_norm = optimizer_step(loss, model, self.optimizer, self.lr(iteration), self.cfg.grad_clip)
        for name, ema in self.emas.items():
            ema.update(self.modules[name])
        return grad_norm

    @abstractmethod
    def batch(self, iteration: int) -> Any:
        """The iteration's data (a pure function of the iteration, so a resumed run sees the same)."""

    @abstractmethod
    def step(self, iteration: int, batch: Any) -> Step:
        """One optimizer iteration on ``batch``: loss, backward, update (``self.update``); what to log."""

    @abstractmethod
    def export(self, iteration: int, out: Path) -> None:
        """Write the stage's model directory to ``out``."""

    def save_extra(self, run: RunDir) -> None:
        """State kept beside ``checkpoint.pt`` (rank 0, written just before it), e.g. a second optimizer."""
        return  # optional hook: a stage without it does nothing here

    def load_extra(self, run: RunDir) -> None:
        """Read back what ``save_extra`` wrote (on resume, after ``checkpoint.pt``)."""
        return  # optional hook: a stage without it does nothing here

    def samples(self, iteration: int, batch: Any, run: RunDir) -> None:
        """Sample pictures of the current EMA model under ``run.samples`` (rank 0, every ``sample_every``)."""
        return  # optional hook: a stage without it does nothing here


def prepare_run(cfg: TrainConfig, settings: dict[str, Any], resume: bool, ddp: Distributed) -> RunDir:
    """The run folder, checked against ``resume`` before a stage builds anything; rank 0 writes train.json."""
    run = RunDir(Path(cfg.out))
    run.prepare(resume, settings, write=ddp.is_main)
    return run


def snapshot_dir(run: RunDir, minutes: float) -> Path:
    """Where the snapshot taken after ``minutes`` of process CPU time goes: ``snapshots/cpu0010.000``. The
    name is rounded down, so a run's end point never takes the name of a snapshot its resumption makes."""
    return run.root / "snapshots" / f"cpu{math.floor(minutes * 1000) / 1000:08.3f}"


def train(stage: Stage, cfg: TrainConfig, ddp: Distributed, run: RunDir, *, resume: bool) -> TrainResult:
    """Run ``stage`` from its checkpoint (``resume``) or from iteration 0 up to ``cfg.iterations``, or until
    ``cfg.cpu_minutes`` of process CPU time or ``cfg.minutes`` of wall-clock time are spent (then it saves and
    exports as on SIGTERM); ``TrainResult.stopped`` says which."""
    state = {"modules": stage.modules, "emas": stage.emas, "optimizer": stage.optimizer}
    iteration, spent_before = 0, 0.0  # CPU minutes of the run's earlier segments
    if resume:
        resumed = load_checkpoint(run.checkpoint, stage=stage.name, settings=stage.settings, **state)
        iteration = resumed.iteration
        spent_before = resumed.cpu_minutes
        if spent_before is None:
            spent_before = logged_cpu_minutes(run.log, iteration)
        stage.load_extra(run)
    log = JsonlLog(run.log, ddp.is_main)
    progress = Progress(iteration, cfg.iterations, stage.title, ddp.is_main)

    def save() -> None:
        if ddp.is_main:
            stage.save_extra(run)
            save_checkpoint(run.checkpoint, stage=stage.name, iteration=iteration, settings=stage.settings,
                            cpu_minutes=run_minutes(), **state)
            if stage.export_at_checkpoints:
                stage.export(iteration, run.model)

    cpu_start, wall_start = cpu_seconds(), time.monotonic()

    def cpu_minutes() -> float:  # process CPU time since the run (re)started: what --cpu-minutes budgets
        return (cpu_seconds() - cpu_start) / 60

    def run_minutes() -> float:  # process CPU time of the whole run, over all its segments
        return spent_before + cpu_minutes()

    def stop_reason() -> str | None:
        if stop.requested:
            return "signal"
        if cfg.cpu_minutes > 0 and cpu_minutes() >= cfg.cpu_minutes:
            return "cpu_minutes"  # recipes compared at equal CPU minutes, not iterations
        if cfg.minutes > 0 and time.monotonic() - wall_start >= 60 * cfg.minutes:
            return "minutes"  # a wall-clock budget: a GPU lease, a speedrun's share
        return None

    # Model snapshots every cfg.snapshot_minutes of the run's CPU time (learning curves per CPU minute),
    # named by the run's CPU minutes, so a resumed run's curve continues where it stopped.
    snapshots = int(spent_before // cfg.snapshot_minutes) if cfg.snapshot_minutes else 0

    stopped: str | None = None
    with StopSignal() as stop:
        while iteration < cfg.iterations:
            stopped = stop_reason()
            if any_rank(stopped is not None, ddp):
                stopped = stopped or "signal"  # another rank stopped: it was told to
                break
            started = time.perf_counter()
            batch = stage.batch(iteration)
            data_seconds = time.perf_counter() - started
            done = stage.step(iteration, batch)
            iteration += 1
            progress.update(done.frames * ddp.world_size, data_seconds, loss=done.loss)
            if iteration % cfg.log_every == 0 or iteration == cfg.iterations or done.log_now:
                record = {k: float(v) for k, v in done.record.items()}
                if ddp.device.type == "cuda":  # what a bigger batch would have room for, next time
                    record["cuda_peak_gib"] = torch.cuda.max_memory_allocated(ddp.device) / 2**30
                log.write(iteration=iteration, **record, frames_per_s=progress.rate(),
                          seconds_per_iteration=progress.seconds_per_iteration(),
                          data_share=progress.data_share(), cpu_minutes=round(run_minutes(), 3))
                progress.reset_rate()
            if iteration % cfg.checkpoint_every == 0:
                save()
            if ddp.is_main and cfg.sample_every and iteration % cfg.sample_every == 0:
                stage.samples(iteration, batch, run)
            due = cfg.snapshot_minutes and run_minutes() >= (snapshots + 1) * cfg.snapshot_minutes
            if ddp.is_main and due:
                snapshots += 1
                stage.export(iteration, snapshot_dir(run, snapshots * cfg.snapshot_minutes))
    progress.close()
    save()
    if ddp.is_main and cfg.snapshot_minutes and run_minutes() > (snapshots + 0.1) * cfg.snapshot_minutes:
        stage.export(iteration, snapshot_dir(run, run_minutes()))  # the end point of the learning curve
    if ddp.is_main and not stage.export_at_checkpoints:
        stage.export(iteration, run.model)
    return TrainResult(run.model, iteration, stage.trained, stopped)
