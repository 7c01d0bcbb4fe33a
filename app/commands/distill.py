"""``worldloop distill cd|dmd``: distil the teacher into a 1–2-step student, one subcommand per stage.

``cd`` (causal consistency distillation, ``distill/stages/cd.py``) starts the student from the teacher;
``dmd`` (self-forcing distribution matching, ``distill/stages/dmd.py``) continues from a CD student (or the
teacher). Both export a model directory that ``worldloop play``/``serve``/``rollout`` load as they are.

    worldloop distill cd --teacher runs/teacher/model --student-steps 2 --out runs/cd
    worldloop distill dmd --teacher runs/teacher/model --student runs/cd/model --out runs/dmd

Learning rates: the student starts from trained weights, so both stages fine-tune below the teacher's 3e-4;
DMD is kept short and gentle (2e-5, 300 iterations, a critic update every iteration and a generator update
every fifth) because an over-trained DMD student loses motion. These are starting points, not tuned values.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from worldloop.app.commands.train import train_config
from worldloop.app.errors import user_input
from worldloop.distill.stages.runtime import TrainConfig, setup_distributed, teardown_distributed
from worldloop.models import checkpoint
from worldloop.models.config import ModelConfig

STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cd": {"iterations": 4000, "batch_size": 16, "lr": 1e-4, "warmup": 100, "ema_decay": 0.99},
    "dmd": {"iterations": 300, "batch_size": 8, "lr": 2e-5, "warmup": 0, "ema_decay": 0.99},
}


def register(subparsers: argparse._SubParsersAction) -> None:
    distill = subparsers.add_parser("distill", help="distil the teacher into a 1–2-step student")
    stages = distill.add_subparsers(dest="stage", metavar="STAGE", required=True)
    helps = {"cd": "causal consistency distillation from the teacher",
             "dmd": "short self-forcing distribution-matching distillation (after cd)"}
    for stage, text in helps.items():
        p = stages.add_parser(stage, help=text, description=f"Run {text}.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        _common_options(p, STAGE_DEFAULTS[stage])
        if stage == "cd":
            p.add_argument("--grid-steps", type=int, default=48,
                           help="levels of the teacher's trajectory grid")
        else:
            _dmd_options(p)
        p.set_defaults(func=run, sample_every=0)


def _common_options(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    d = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | defaults
    p.add_argument("--teacher", type=Path, required=True, metavar="MODEL_DIR",
                   help="the causal teacher (from `worldloop train teacher`)")
    p.add_argument("--student-steps", type=int, choices=(1, 2),
                   help="denoising steps of the student (default: 2, or the --student's)")
    p.add_argument("--first-frame-steps", type=int,
                   help="steps of a stream's first frame (default: 4, or the --student's)")
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance of the teacher (default: its own)")
    p.add_argument("--shift", type=float, help="timestep shift of the noise levels (default: the teacher's)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--iterations", type=int, default=d["iterations"], help="total iterations")
    p.add_argument("--cpu-minutes", type=float, default=0.0,
                   help="also stop (saving and exporting) after this much process CPU time; 0: no limit")
    p.add_argument("--minutes", type=float, default=0.0,
                   help="also stop (saving and exporting) after this much wall-clock time; 0: no limit")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="global batch")
    p.add_argument("--lr", type=float, default=d["lr"], help="learning rate of the student")
    p.add_argument("--warmup", type=int, default=d["warmup"], help="linear warm-up iterations")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--grad-clip", type=float, default=d["grad_clip"], help="0 disables clipping")
    p.add_argument("--ema-decay", type=float, default=d["ema_decay"])
    p.add_argument("--clip-frames", type=int, help="frames per clip / rollout (default: window + sink + 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA and for CPUs with AVX512-BF16 or AMX)")
    p.add_argument("--compile", action="store_true", help="torch.compile the student (cd)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch's default)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=500,
                   help="iterations between checkpoints and exports")
    p.add_argument("--episodes", type=Path, help="clips from recorded episode folders under this path")
    p.add_argument("--pool-clips", type=int, default=-1,
                   help="reuse rendered clips from a pool this big (-1: 256 on CPU, 4096 on CUDA; 0: off)")
    p.add_argument("--pool-refresh", type=int, default=25,
                   help="iterations between re-rendering a pool chunk")


def _dmd_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", type=Path, metavar="MODEL_DIR", help="the student to start from (default: "
                   "the teacher); usually the model directory of `distill cd`")
    p.add_argument("--real", type=Path, metavar="MODEL_DIR",
                   help="real score instead of the teacher, e.g. a bidirectional teacher")
    p.add_argument("--critic-steps", type=int, default=5, help="critic updates per generator update")
    p.add_argument("--critic-lr", type=float, help="learning rate of the critic (default: --lr)")
    p.add_argument("--grad-frames", type=int, default=2, help="newest rollout frames the gradient reaches")
    p.add_argument("--min-sigma", type=float, default=0.02, help="re-noising range, before the shift")
    p.add_argument("--max-sigma", type=float, default=0.98)


def student_model_config(args: argparse.Namespace) -> tuple[ModelConfig, ModelConfig]:
    """The student's config (from --student, else the teacher's) and the teacher's."""
    from worldloop.distill.stages.shared import student_config

    teacher, _ = checkpoint.read_config(args.teacher)
    source = getattr(args, "student", None)
    base = checkpoint.read_config(source)[0] if source else teacher
    steps = args.student_steps or (base.sampling.steps if source else 2)
    first = args.first_frame_steps or (base.sampling.first_frame_steps if source else 4)
    return student_config(base, steps, first), teacher


def run(args: argparse.Namespace) -> int:
    with user_input():  # options and configs; what the run itself raises keeps its traceback
        if args.threads < 0:
            raise ValueError(f"--threads {args.threads} is out of range")
        config, teacher = student_model_config(args)
        objective = _objective(args, teacher)
    if args.threads:
        torch.set_num_threads(args.threads)
    with user_input():
        ddp = setup_distributed(args.device)
    try:
        with user_input():
            cfg = train_config(args, config, ddp)
            if args.stage == "dmd" and objective.grad_frames > cfg.clip_frames:
                raise ValueError(f"--grad-frames {objective.grad_frames} exceeds --clip-frames "
                                 f"{cfg.clip_frames}")
        result = _run_stage(args, config, cfg, ddp, objective)
    finally:
        teardown_distributed()
    if ddp.is_main:
        print(f"iteration {result.iteration}; model directory: {result.model_dir}")
    return 0


def _objective(args: argparse.Namespace, teacher: ModelConfig) -> Any:
    guidance = teacher.sampling.guidance if args.guidance is None else args.guidance
    shift = teacher.sampling.shift if args.shift is None else args.shift
    if args.stage == "cd":
        from worldloop.distill.stages.cd import CDObjective

        return CDObjective(grid_steps=args.grid_steps, guidance=guidance, shift=shift)
    from worldloop.distill.stages.dmd import DMDObjective

    return DMDObjective(guidance=guidance, critic_steps=args.critic_steps,
                        critic_lr=args.critic_lr or args.lr, grad_frames=args.grad_frames,
                        min_sigma=args.min_sigma, max_sigma=args.max_sigma, shift=shift)


def _run_stage(args: argparse.Namespace, config: ModelConfig, cfg: TrainConfig, ddp: Any,
               objective: Any) -> Any:
    if args.stage == "cd":
        from worldloop.distill.stages.cd import train_cd

        return train_cd(config, cfg, objective, ddp, teacher_dir=args.teacher, resume=args.resume)
    from worldloop.distill.stages.dmd import train_dmd

    return train_dmd(config, cfg, objective, ddp, teacher_dir=args.teacher, student_dir=args.student,
                     real_dir=args.real, resume=args.resume)
