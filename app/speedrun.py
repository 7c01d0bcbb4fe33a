"""``worldloop speedrun``: from nothing to a playable model within one time budget (the library behind it).

Stages, in order — every training stage runs through the one training loop (``distill/stages/loop.py``), the
eval helpers through their own small loop:

    vae → teacher → cd → dmd → idm → classifier → export → eval

(the export comes before the eval, so a run cut short while evaluating has its model; a GPU call cut short
in the eval still brings it back: ``app/gpu_check.py``)

``vae`` is skipped when an autoencoder of the preset's latent shape is given (``--vae``; by default
``assets/autoencoder`` when its shape is the preset's, so the ``default`` preset starts from the sharp one).

**The budget.** First each training stage runs ``PROBE_ITERATIONS`` iterations in ``out/probe/`` (the real
stage code on the real data, with the same batch): its median seconds per iteration after the first
(compilation, warm-up) and its fixed cost (building, data pool, export) are measured. What remains of the
budget is split into shares — eval ``EVAL_SHARE``, each helper ``HELPER_SHARE``, the training stages the rest
by ``TIME_WEIGHTS`` — and each training stage's share becomes a number of iterations (share − fixed cost) /
(seconds per iteration). The plan is printed before any stage runs and saved in ``out/speedrun.json``.
While running, a stage also stops at the wall-clock time left to it: the deadline less the planned time of
the stages after it, so a slow stage eats the slack, never its successors' shares.

**Resume.** The plan fixes iterations, not seconds, so a stopped run continues exactly: ``--resume`` reads
the plan, skips finished stages and resumes the stage it stopped in from its checkpoint (a helper or eval
starts again; they are short and seeded). A stop (SIGTERM, Ctrl-C) in any stage, then ``--resume``, ends
in the same model as a run that never stopped (``tests/test_speedrun.py``). A stage cut short by its time
cap counts as finished.

**The recipe.** Each stage takes its command's defaults (``app/commands/train.py``, ``distill.py``) and the
objective's own defaults (``TeacherObjective()``, …), so the teacher recipe of docs/training-recipe.md flows
in; ``RECIPE`` changes only CD and DMD (the settings of the CPU-distilled students, README), and
``CUDA_BATCH`` sets larger batches on a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from worldloop.app.commands.distill import STAGE_DEFAULTS as DISTILL_DEFAULTS
from worldloop.app.commands.train import STAGE_DEFAULTS as TRAIN_DEFAULTS
from worldloop.app.commands.train import teacher_sampling
from worldloop.distill.stages.runtime import Distributed, TrainConfig, TrainResult, setup_distributed
from worldloop.models import checkpoint
from worldloop.models.config import preset
from worldloop.models.timing import hardware

STAGES = ("vae", "teacher", "cd", "dmd", "idm", "classifier", "export", "eval")
TRAINED = ("vae", "teacher", "cd", "dmd")  # probed; their shares become iterations
HELPERS = ("idm", "classifier")
TIME_WEIGHTS = {"vae": 0.30, "teacher": 0.50, "cd": 0.12, "dmd": 0.08}  # of the training stages' time
HELPER_SHARE = 0.03  # of the budget after the probe, each helper
EVAL_SHARE = 0.10  # eval and export
PROBE_ITERATIONS = 4
STATE_FILE = "speedrun.json"
STATE_FORMAT = "worldloop-speedrun-1"
TEACHER_STEPS = 16  # the teacher's own sampler (`train teacher --sample-steps`), used by CD's grid too
STUDENT_STEPS, FIRST_FRAME_STEPS, PLAY_STEPS = 2, 4, 1  # CD/DMD train a 2-step student; it ships at 1 step

# Changes to the stage defaults. The teacher takes its command's defaults as they are (the recipe measured in
# docs/training-recipe.md); CD and DMD the settings of the CPU-distilled students (README); a GPU larger
# batches.
RECIPE: dict[str, dict[str, Any]] = {
    "vae": {},
    "teacher": {},
    "cd": {"lr": 2e-4, "warmup": 20, "batch_size": 4},
    "dmd": {"lr": 5e-5, "batch_size": 4},
    "idm": {},
    "classifier": {},
}
CUDA_BATCH = {"vae": 64, "teacher": 64, "cd": 32, "dmd": 16, "idm": 64, "classifier": 64}  # not yet tuned
CD_GRID_STEPS = 16  # the teacher's own 16-step grid: a short run spreads the consistency target over it


class SpeedrunError(ValueError):
    """A speedrun that cannot start or continue as asked: one line."""


def parse_duration(text: str) -> float:
    """``90s``, ``9m``, ``1.5h``, ``1h30m`` → seconds; a bare number or anything else is an error."""
    parts = re.fullmatch(r"\s*((?:\d+(?:\.\d+)?\s*[hms]\s*)+)", text or "")
    if not parts:
        raise SpeedrunError(f"--budget {text!r}: give a duration with units, e.g. 90s, 9m, 2h or 1h30m")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0}
    seconds = sum(float(n) * scale[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", parts.group(1)))
    if seconds <= 0:
        raise SpeedrunError(f"--budget {text!r} must be positive")
    return seconds


def parse_iterations(text: str | None) -> dict[str, int]:
    """``teacher=500,cd=100`` → fixed iterations of those stages (the others are planned from the budget)."""
    fixed: dict[str, int] = {}
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        name, _, value = item.partition("=")
        if name not in TRAINED + HELPERS or not value.isdigit() or int(value) < 1:
            raise SpeedrunError(f"--iterations {item!r}: expected STAGE=N with N ≥ 1 and STAGE one of "
                                f"{', '.join(TRAINED + HELPERS)}")
        fixed[name] = int(value)
    return fixed


@dataclass(frozen=True)
class SpeedrunOptions:
    """What one speedrun does; saved in ``speedrun.json`` (a resumed run takes them from there)."""

    budget_s: float
    out: str
    preset: str = "default"
    device: str = "cpu"  # resolved: cpu, cuda, cuda:N
    vae: str | None = None  # an autoencoder model directory to reuse (no vae stage); None: train one
    episodes: str | None = None  # train on recorded episodes instead of the built-in world
    iterations: dict[str, int] = field(default_factory=dict)  # fixed iterations of some stages
    seed: int = 0
    bf16: bool = False
    compile: bool = False
    pool_clips: int = -1  # rendered clips reused per stage (-1: 256 on CPU, 4096 on CUDA; TrainConfig)
    evaluate: bool = True  # False: no eval, nor the helpers only the eval uses (evaluate elsewhere, later)

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(s for s in STAGES if (s != "vae" or self.vae is None)
                     and (self.evaluate or s not in HELPERS + ("eval",)))


@dataclass
class StagePlan:
    """One stage's share: seconds of the budget, the measured cost, and the iterations that fit."""

    seconds: float
    iterations: int = 0  # 0: not an iteration-counted stage (eval, export)
    seconds_per_iteration: float | None = None  # measured by the probe (None: not probed)
    overhead_s: float = 0.0  # measured fixed cost: building the stage, its data pool, its export


def split_budget(budget_s: float, stages: tuple[str, ...], measured: dict[str, tuple[float, float]],
                 fixed: dict[str, int], helper_iterations: dict[str, int]) -> dict[str, StagePlan]:
    """Shares of ``budget_s`` (what the probe left) and the iterations each training stage can run in its own.

    ``measured[stage]`` = (seconds per iteration, fixed cost in seconds); ``fixed`` overrides iterations;
    helpers run ``helper_iterations`` (their command's default) unless fixed, cut at their share's time.
    """
    budget_s = max(budget_s, 0.0)  # the probe took it all: one iteration each (the caller warns)
    trained = [s for s in stages if s in TRAINED]
    weights = {s: TIME_WEIGHTS[s] for s in trained}
    helpers = sum(s in HELPERS for s in stages)
    training_s = budget_s * (1 - EVAL_SHARE * ("eval" in stages) - HELPER_SHARE * helpers)
    plan: dict[str, StagePlan] = {}
    for stage in stages:
        if stage in TRAINED:
            seconds = training_s * weights[stage] / sum(weights.values())
            per_it, overhead = measured.get(stage, (None, 0.0))
            if stage in fixed:
                iterations = fixed[stage]
            elif per_it is None:
                raise SpeedrunError(f"no measured throughput for stage {stage!r}")
            else:
                iterations = max(1, math.floor(max(0.0, seconds - overhead) / per_it))
            plan[stage] = StagePlan(seconds, iterations, per_it, overhead)
        elif stage in HELPERS:
            plan[stage] = StagePlan(budget_s * HELPER_SHARE, fixed.get(stage, helper_iterations[stage]))
        elif stage == "eval":
            plan[stage] = StagePlan(budget_s * EVAL_SHARE)
        else:
            plan[stage] = StagePlan(0.0)  # export: seconds, inside eval's share
    return plan


def plan_table(plan: dict[str, StagePlan], outcome: dict[str, dict[str, Any]] | None = None) -> str:
    """The plan (and, given ``outcome``, what each stage did) as a Markdown table."""
    head = ["stage", "share (min)", "measured s/iteration", "fixed cost (s)", "planned iterations"]
    if outcome is not None:
        head += ["iterations run", "minutes", "stopped by"]
    rows = [head, ["---"] * len(head)]
    for stage, p in plan.items():
        per_it = "–" if p.seconds_per_iteration is None else f"{p.seconds_per_iteration:.3f}"
        row = [stage, f"{p.seconds / 60:.2f}", per_it, f"{p.overhead_s:.1f}", str(p.iterations or "–")]
        if outcome is not None:
            o = outcome.get(stage, {})
            row += [str(o.get("iterations", "–")), f"{o.get('seconds', 0.0) / 60:.2f}",
                    str(o.get("stopped") or "–")]
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"


# ----------------------------------------------------------------------------------------------------------
# The stages


def shipped_autoencoder() -> Path:
    """``assets/autoencoder`` (package data when installed, the repository's folder otherwise)."""
    from worldloop.app.loading import DEFAULT_MODEL_DIR

    return DEFAULT_MODEL_DIR.parent / "autoencoder"


def default_vae(preset_name: str) -> str | None:
    """``assets/autoencoder`` when its latent shape and frames are the preset's, else None (train one)."""
    path = shipped_autoencoder()
    if not (path / "config.json").is_file():
        return None
    source, _ = checkpoint.read_config(path)
    config = preset(preset_name)
    fits = (source.vae, source.height, source.width) == (config.vae, config.height, config.width)
    return str(path) if fits else None


class Pipeline:
    """Builds and runs one stage of a speedrun under a run root (``out`` or ``out/probe``)."""

    def __init__(self, options: SpeedrunOptions, ddp: Distributed, prompt_encoder: Any | None) -> None:
        from worldloop.distill.stages.shared import student_config

        self.options, self.ddp = options, ddp
        config = preset(options.preset)
        if options.vae is not None:
            config = checkpoint.with_autoencoder_of(config, options.vae)
        self.config = config
        self.teacher_config = teacher_sampling(config, TEACHER_STEPS)
        self.student_config = student_config(self.teacher_config, STUDENT_STEPS, FIRST_FRAME_STEPS)
        self._encoder = prompt_encoder

    @property
    def encoder(self) -> Any:
        """One prompt encoder shared by every stage and eval (loading MiniLM once)."""
        if self._encoder is None:
            from worldloop.models.text import PromptEncoder

            self._encoder = PromptEncoder(self.config.dit.max_prompt_tokens, device=self.ddp.device)
        return self._encoder

    def train_config(self, stage: str, root: Path, iterations: int, minutes: float,
                     log_every: int = 10) -> TrainConfig:
        stage_defaults = (TRAIN_DEFAULTS | DISTILL_DEFAULTS)[stage] | RECIPE[stage]
        d = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | stage_defaults
        frames = stage_defaults.get("clip_frames") or self.config.dit.window + self.config.dit.sink + 1
        helper = stage in HELPERS
        return TrainConfig(
            iterations=iterations, minutes=minutes, lr=d["lr"],
            batch_size=CUDA_BATCH[stage] if self.ddp.device.type == "cuda" else d["batch_size"],
            warmup=min(d["warmup"], iterations // 10), weight_decay=d["weight_decay"],
            grad_clip=d["grad_clip"], ema_decay=d["ema_decay"], clip_frames=frames, seed=self.options.seed,
            device=str(self.ddp.device), bf16=self.options.bf16 and not helper,
            compile=self.options.compile and not helper, out=str(root / stage), log_every=log_every,
            sample_every=0, checkpoint_every=max(50, iterations // 4),
            episodes=None if helper else self.options.episodes, pool_clips=self.options.pool_clips)

    def vae_dir(self, root: Path) -> Path:
        return Path(self.options.vae) if self.options.vae is not None else root / "vae" / "model"

    def run(self, stage: str, root: Path, cfg: TrainConfig, resume: bool) -> TrainResult | dict[str, Any]:
        """Train ``stage`` under ``root`` with ``cfg``: a ``TrainResult`` (a helper: its last log line)."""
        from worldloop.distill.stages import cd, dmd, teacher, vae
        from worldloop.distill.stages.helpers import train_for_config

        teacher_dir, cd_dir = root / "teacher" / "model", root / "cd" / "model"
        if stage == "vae":
            return vae.train_vae(self.config, cfg, vae.VAEObjective(), self.ddp, resume=resume)
        if stage == "teacher":
            return teacher.train_teacher(self.teacher_config, cfg, teacher.TeacherObjective(), self.ddp,
                                         vae_from=self.vae_dir(root), resume=resume,
                                         prompt_encoder=self.encoder)
        sampling = self.teacher_config.sampling
        if stage == "cd":
            objective = cd.CDObjective(grid_steps=CD_GRID_STEPS, guidance=sampling.guidance,
                                       shift=sampling.shift)
            return cd.train_cd(self.student_config, cfg, objective, self.ddp, teacher_dir=teacher_dir,
                               resume=resume, prompt_encoder=self.encoder)
        if stage == "dmd":
            objective = dataclasses.replace(dmd.DMDObjective(), guidance=sampling.guidance, critic_lr=cfg.lr,
                                            shift=sampling.shift)
            return dmd.train_dmd(self.student_config, cfg, objective, self.ddp, teacher_dir=teacher_dir,
                                 student_dir=cd_dir, resume=resume, prompt_encoder=self.encoder)
        shutil.rmtree(cfg.out, ignore_errors=True)  # a helper has no checkpoint: it starts again
        train_for_config(stage, self.config, cfg, self.ddp)  # type: ignore[arg-type]
        return last_log_line(Path(cfg.out))


def last_log_line(run: Path) -> dict[str, Any]:
    lines = (run / "log.jsonl").read_text().splitlines() if (run / "log.jsonl").is_file() else []
    return json.loads(lines[-1]) if lines else {}


def measure(pipeline: Pipeline, root: Path, stages: tuple[str, ...], say: Callable[[str], None]
            ) -> dict[str, tuple[float, float]]:
    """The probe: ``PROBE_ITERATIONS`` real iterations of each training stage under ``root``; per stage the
    median seconds per iteration after the first, and the rest of the call's time (its fixed cost)."""
    shutil.rmtree(root, ignore_errors=True)
    measured = {}
    for stage in stages:
        say(f"probe: {stage} ({PROBE_ITERATIONS} iterations)")
        started = time.monotonic()
        result = pipeline.run(stage, root, pipeline.train_config(stage, root, PROBE_ITERATIONS, 0.0,
                                                                 log_every=1), resume=False)
        if isinstance(result, TrainResult) and result.stopped == "signal":
            raise KeyboardInterrupt  # stopped while measuring: `--resume` measures again
        total = time.monotonic() - started
        lines = [json.loads(x) for x in (root / stage / "log.jsonl").read_text().splitlines()]
        seconds = [x["seconds_per_iteration"] for x in lines if "seconds_per_iteration" in x]
        per_it = statistics.median(seconds[1:] or seconds)
        measured[stage] = (per_it, max(0.0, total - sum(seconds)))
    return measured


# ----------------------------------------------------------------------------------------------------------
# The run


@dataclass
class SpeedrunResult:
    out: Path
    stopped_in: str | None  # the stage a stop signal ended this process in (continue with --resume)
    model: Path | None  # the exported model directory once the run is complete
    report: Path | None
    state: dict[str, Any]


LONG_EVAL_S = 300.0  # an eval share at least this long (and CUDA) gets the longer evaluation


def eval_config(device: torch.device, seconds: float = float("inf")) -> Any:
    """A short evaluation (it runs inside the budget). The longer one (8 worlds, horizon 64, 10 s of drift)
    only on CUDA with at least ``LONG_EVAL_S`` of share: the 16-step teacher's rollouts of this small model
    are launch-bound there, measured at 4–7 frames/s on an H200 (2026-12-04), no faster than on a CPU."""
    from worldloop.distill.eval.evaluate import EvalConfig
    from worldloop.models.media import videos_available

    if device.type == "cuda" and seconds >= LONG_EVAL_S:
        return EvalConfig(episodes=8, horizons=(1, 4, 16, 64), switch_frames=48, drift_seconds=10,
                          videos=videos_available())
    return EvalConfig(episodes=4, horizons=(1, 4, 16), switch_frames=16, drift_seconds=2,
                      videos=videos_available())


class Speedrun:
    """One speedrun process: plans (or reads the plan of) the run in ``out`` and runs its stages in order."""

    def __init__(self, options: SpeedrunOptions, state: dict[str, Any], *, prompt_encoder: Any = None,
                 say: Callable[[str], None] = print) -> None:
        self.options, self.state, self.say = options, state, say
        self.out = Path(options.out)
        self.ddp = setup_distributed(options.device)
        if self.ddp.enabled:
            raise SpeedrunError("worldloop speedrun runs in one process; start it without torchrun")
        self.pipeline = Pipeline(options, self.ddp, prompt_encoder)
        self.started = time.monotonic()
        self.elapsed_before = float(state.get("elapsed_s", 0.0))

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def save(self) -> None:
        self.state["elapsed_s"] = self.elapsed
        tmp = self.out / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        tmp.replace(self.out / STATE_FILE)

    def plan(self) -> dict[str, StagePlan]:
        return {k: StagePlan(**v) for k, v in self.state["plan"].items()}

    def make_plan(self) -> None:
        o = self.options
        to_probe = tuple(s for s in o.stages if s in TRAINED and s not in o.iterations)
        measured = measure(self.pipeline, self.out / "probe", to_probe, self.say) if to_probe else {}
        helper_iterations = {s: TRAIN_DEFAULTS[s]["iterations"] for s in HELPERS}
        left = o.budget_s - self.elapsed
        if left <= 0:
            self.say(f"speedrun: WARNING measuring throughput took the whole budget ({self.elapsed:.0f} s); "
                     f"every stage runs one iteration")
        plan = split_budget(left, o.stages, measured, o.iterations, helper_iterations)
        self.state["plan"] = {k: asdict(v) for k, v in plan.items()}
        self.state["probe_s"] = self.elapsed
        self.save()

    def run(self) -> SpeedrunResult:
        o = self.options
        self.save()  # from now on `--resume` finds the run, also if it stops while measuring throughput
        if "plan" not in self.state:
            self.make_plan()
        plan = self.plan()
        self.say(f"speedrun plan: {o.budget_s / 60:.2f} min on {self.ddp.device} ({o.preset}), "
                 f"{self.state.get('probe_s', 0.0):.0f} s of it measuring throughput\n" + plan_table(plan))
        deadline = time.monotonic() + o.budget_s - self.elapsed
        outcome = self.state.setdefault("stages", {})
        for i, stage in enumerate(o.stages):
            if outcome.get(stage, {}).get("done"):
                continue
            later = sum(plan[s].seconds for s in o.stages[i + 1:])
            left = deadline - time.monotonic() - later - plan[stage].overhead_s
            self.say(f"speedrun: {stage} ({left / 60:.2f} min left to it)")
            started, record = time.monotonic(), outcome.get(stage, {"seconds": 0.0})
            record.update(self.run_stage(stage, plan[stage], max(left, 1.0)))
            record["seconds"] = record.get("seconds", 0.0) + time.monotonic() - started
            outcome[stage] = record
            self.save()
            if record.get("stopped") == "signal":
                self.say(f"speedrun: stopped in {stage}; continue with `worldloop speedrun --resume --out "
                         f"{self.out}`")
                return SpeedrunResult(self.out, stage, None, None, self.state)
        report = write_report(self.out, o, plan, outcome, self.ddp.device, self.elapsed)
        self.state["finished"] = True
        self.save()
        self.say(f"speedrun: done in {self.elapsed / 60:.2f} min; report {report}; play it with "
                 f"`worldloop play --model {self.out / 'model'}`")
        return SpeedrunResult(self.out, None, self.out / "model", report, self.state)

    def run_stage(self, stage: str, plan: StagePlan, seconds: float) -> dict[str, Any]:
        out = self.out
        if stage in TRAINED + HELPERS:
            cfg = self.pipeline.train_config(stage, out, plan.iterations, seconds / 60)
            resume = (out / stage / "checkpoint.pt").is_file()
            result = self.pipeline.run(stage, out, cfg, resume)
            if isinstance(result, TrainResult):
                done = {"iterations": result.iteration, "stopped": result.stopped}
            else:
                done = {"iterations": result.get("iteration"), "stopped": result.get("stopped")}
            return done | {"done": done["stopped"] != "signal"}
        if stage == "eval":
            from worldloop.distill.eval.evaluate import run_eval

            runs = [(out / "teacher" / "model", None), (out / "dmd" / "model", PLAY_STEPS),
                    (out / "dmd" / "model", STUDENT_STEPS)]
            run_eval(runs, eval_config(self.ddp.device, plan.seconds), out / "eval", idm_path=out / "idm",
                     classifier_path=out / "classifier", device=self.ddp.device,
                     prompt_encoder=self.pipeline.encoder)
            return {"done": True}
        note = (f"worldloop speedrun: {self.options.preset} preset, {self.options.budget_s / 60:.1f} min "
                f"on {hardware(str(self.ddp.device)).get('gpu') or 'CPU'}")
        checkpoint.export_model(out / "dmd" / "model", out / "model", steps=PLAY_STEPS, note=note)
        return {"done": True}


def start(options: SpeedrunOptions, *, resume: bool, prompt_encoder: Any = None,
          say: Callable[[str], None] = print) -> SpeedrunResult:
    """Run a new speedrun in ``options.out``, or (``resume``) continue the one there with its own options."""
    out = Path(options.out)
    state_path = out / STATE_FILE
    if resume:
        if not state_path.is_file():
            raise SpeedrunError(f"--resume: no speedrun in {out} ({STATE_FILE} is missing)")
        state = json.loads(state_path.read_text())
        if state.get("format") != STATE_FORMAT:
            raise SpeedrunError(f"{state_path} is not a worldloop speedrun state")
        options = SpeedrunOptions(**state["options"])
        if state.get("finished"):
            say(f"speedrun in {out} is already finished: {out / 'report.md'}")
            return SpeedrunResult(out, None, out / "model", out / "report.md", state)
    else:
        if state_path.exists():
            raise SpeedrunError(f"{out} already holds a speedrun; pass --resume to continue it or choose "
                                f"another --out")
        out.mkdir(parents=True, exist_ok=True)
        state = {"format": STATE_FORMAT, "options": asdict(options),
                 "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return Speedrun(options, state, prompt_encoder=prompt_encoder, say=say).run()


# ----------------------------------------------------------------------------------------------------------
# The report


CURVES = {"vae": ("loss",), "teacher": ("loss",), "cd": ("loss",), "dmd": ("generator_loss", "critic_loss"),
          "idm": ("loss",), "classifier": ("loss",)}


def plot_curves(out: Path, stages: tuple[str, ...], path: Path) -> Path:
    """One panel per training stage: its logged losses over iterations (``log.jsonl``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in stages if s in CURVES and (out / s / "log.jsonl").is_file()]
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(3.2 * max(1, len(shown)), 2.8), squeeze=False)
    for ax, stage in zip(axes[0], shown, strict=False):
        lines = [json.loads(x) for x in (out / stage / "log.jsonl").read_text().splitlines()]
        for key in CURVES[stage]:
            points = [(x["iteration"], x[key]) for x in lines if isinstance(x.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points, strict=True), label=key)
        ax.set_title(stage)
        ax.set_xlabel("iteration")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(out: Path, options: SpeedrunOptions, plan: dict[str, StagePlan],
                 outcome: dict[str, dict[str, Any]], device: torch.device, elapsed: float) -> Path:
    """``report.md``: the plan beside what each stage did, the eval table, learning curves, the model."""
    hw = hardware(str(device))
    plot_curves(out, options.stages, out / "curves.png")
    summary = out / "eval" / "summary.md"
    vae = options.vae or "trained in this run (stage vae)"
    lines = [
        f"# worldloop speedrun: `{options.preset}` preset on {hw.get('gpu') or hw.get('cpu')}", "",
        f"Budget {options.budget_s / 60:.2f} min, used {elapsed / 60:.2f} min; device {device}; torch "
        f"{hw.get('torch')}; bf16 {options.bf16}, compile {options.compile}; autoencoder: {vae}; data: "
        f"{options.episodes or 'the built-in world'}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.", "",
        "## Stages: plan and outcome", "", plan_table(plan, outcome),
        "## Evaluation (held-out worlds of the engine)", "",
        summary.read_text() if summary.is_file() else "(no evaluation)", "",
        "## Learning curves", "", "![losses](curves.png)", "",
        "## The model", "", f"`{out / 'model'}` (the DMD student at {PLAY_STEPS} step): "
        f"`worldloop play --model {out / 'model'}`", "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
