"""``worldloop distill cd|dmd|truth``: distil the teacher into a 1–2-step student, one subcommand per stage.

``cd`` (causal consistency distillation, ``distill/stages/cd.py``) starts the student from the teacher;
``dmd`` (self-forcing distribution matching, ``distill/stages/dmd.py``) continues from a CD student (or the
teacher); ``truth`` (self-forcing against the engine, ``distill/stages/truth.py``) trains the student, and
optionally the decoder, on its own rollouts against the engine's frames under the same keys. Each exports a
model directory that ``worldloop play``/``serve``/``rollout`` load as they are.

    worldloop distill cd --teacher runs/teacher/model --student-steps 2 --out runs/cd
    worldloop distill dmd --teacher runs/teacher/model --student runs/cd/model --out runs/dmd
    worldloop distill truth --teacher runs/teacher/model --student-steps 1 --out runs/truth

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

from worldloop.app.commands.train import add_run_options, train_config
from worldloop.app.errors import user_input
from worldloop.distill.stages.runtime import TrainConfig, setup_distributed, teardown_distributed
from worldloop.models import checkpoint
from worldloop.models.config import RESAMPLING, REVEAL_FILLS, ModelConfig

STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cd": {"iterations": 4000, "batch_size": 16, "lr": 1e-4, "warmup": 100, "ema_decay": 0.99},
    "dmd": {"iterations": 300, "batch_size": 8, "lr": 2e-5, "warmup": 0, "ema_decay": 0.99},
    "truth": {"iterations": 3000, "batch_size": 4, "lr": 1e-4, "warmup": 20, "ema_decay": 0.99},
}


def register(subparsers: argparse._SubParsersAction) -> None:
    distill = subparsers.add_parser("distill", help="distil the teacher into a 1–2-step student")
    stages = distill.add_subparsers(dest="stage", metavar="STAGE", required=True)
    helps = {"cd": "causal consistency distillation from the teacher",
             "dmd": "short self-forcing distribution-matching distillation (after cd)",
             "truth": "self-forcing against the engine: rollouts regressed onto the engine's frames"}
    for stage, text in helps.items():
        p = stages.add_parser(stage, help=text, description=f"Run {text}.",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        _common_options(p, STAGE_DEFAULTS[stage])
        if stage == "cd":
            p.add_argument("--grid-steps", type=int, default=48,
                           help="denoising steps of the teacher's trajectory grid")
        elif stage == "dmd":
            _dmd_options(p)
        else:
            _truth_options(p)
        p.set_defaults(func=run, sample_every=0)


def _common_options(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    p.add_argument("--teacher", type=Path, required=True, metavar="DIR",
                   help="the causal teacher (from `worldloop train teacher`)")
    p.add_argument("--student-steps", type=int, choices=(1, 2),
                   help="denoising steps of the student (default: 2, or the --student's)")
    p.add_argument("--first-frame-steps", type=int,
                   help="denoising steps of a stream's first frame (default: 4, or the --student's)")
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance of the teacher (default: its own)")
    p.add_argument("--shift", type=float, help="timestep shift of the noise levels (default: the teacher's)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--clip-frames", type=int, help="frames per clip / rollout (default: window + sink + 1)")
    p.add_argument("--compile", action="store_true", help="torch.compile the student (cd)")
    add_run_options(p, defaults)


def _dmd_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", type=Path, metavar="DIR", help="the student to start from (default: "
                   "the teacher); usually the model directory of `distill cd`")
    p.add_argument("--real", type=Path, metavar="DIR",
                   help="real score instead of the teacher, e.g. a bidirectional teacher")
    p.add_argument("--critic-updates", type=int, default=5, help="critic updates per generator update")
    p.add_argument("--critic-lr", type=float, help="learning rate of the critic (default: --lr)")
    p.add_argument("--grad-frames", type=int, default=2, help="newest rollout frames the gradient reaches")
    p.add_argument("--min-sigma", type=float, default=0.02,
                   help="lower end of the re-noising range (before the shift)")
    p.add_argument("--max-sigma", type=float, default=0.98,
                   help="upper end of the re-noising range (before the shift)")


TRUTH_OPTIONS = {  # TruthObjective field → help; the flag is --field-name, type and default the field's
    "train": "what learns: the DiT, the decoder (on generated latents) or both",
    "max_context": "engine frames a stream starts from (1..N, drawn per iteration)",
    "rollout_frames": "frames the student generates per stream and iteration",
    "grad_frames": "newest rollout frames the gradient reaches (0: all)",
    "latent_spectrum_weight": "DiT loss: log-spectrum distance of generated vs engine latents (against blur)",
    "decoder_frames": "generated frames per iteration the decoder trains on",
    "decoder_lr_scale": "the decoder's learning rate as a multiple of --lr",
    "edge_weight": "decoder loss: gradient L1",
    "spectrum_weight": "decoder loss: log-spectrum distance",
    "random_keys": "chance per frame that held random keys take over from the explorer",
    "key_hold": "frames a random key state is held",
    "still_keys": "share of the random key states that hold no key (the camera stands still)",
    "switch_every": "every n-th iteration the prompt switches inside the rollout (0: never)",
    "switch_reuse": "switch iterations that share one rendered switch batch",
    "adversarial_weight": "DiT loss: a patch critic on decoded frames, this × the adaptive weight (0: off)",
    "adversarial_frames": "generated frames per iteration the critic judges (of those with gradients)",
    "critic_channels": "width of the patch critic",
    "critic_lr_scale": "the critic's learning rate as a multiple of --lr",
    "critic_updates": "critic updates per iteration (on the frames it judged)",
    "adversarial_start": "iteration from which the DiT gets the critic's term (the critic learns from 0)",
    "depth_lr_scale": "> 0: a reprojecting student's depth network learns on its own rollouts at this × --lr",
    "texture_weight": "local texture statistics (encoder-feature Gram matrices) of decoded frames against "
                      "the engine's: in the DiT's loss on --adversarial-frames frames, in the decoder's on "
                      "its own (0: off)",
    "texture_grid": "the texture term's tiles: a grid × grid partition of the frame",
    "pixel_weight": "DiT loss: L1 of decoded frames against the engine's, in pixels, on the "
                    "--adversarial-frames frames (0: off)",
}


def _truth_options(p: argparse.ArgumentParser) -> None:
    from worldloop.distill.stages.truth import TRAINS, TruthObjective

    p.add_argument("--student", type=Path, metavar="DIR",
                   help="the student to start from (default: the teacher), e.g. an earlier truth run's model")
    p.add_argument("--vae", type=Path, metavar="DIR",
                   help="the autoencoder to start from (default: the student's), e.g. a decoder run's")
    defaults = TruthObjective()
    for name, text in TRUTH_OPTIONS.items():
        default = getattr(defaults, name)
        kind: dict[str, Any] = {"choices": TRAINS} if name == "train" else {"type": type(default)}
        p.add_argument("--" + name.replace("_", "-"), default=default, help=text, **kind)
    p.add_argument("--context-sigma", type=float,
                   help="σ generated frames get in the cache, baked into the student (default: the start's)")
    p.add_argument("--prediction", choices=["delta", "warp"],
                   help="the student's output (default: the start's); warp from a delta start begins with "
                        "zero flow, so it plays as the start did until the flow trains")
    p.add_argument("--reproject", action="store_true",
                   help="a delta student builds on its previous frame moved by the keys' camera motion "
                        "(models/camera.py); its depth network is fitted on the built-in world first")
    p.add_argument("--resample", choices=list(RESAMPLING),
                   help="how a reprojecting student samples its previous frame (default: the start's, "
                        "bicubic for a new one)")
    p.add_argument("--depth-memory", type=float,
                   help="a reprojecting student's weight of the wall depth carried from frame to frame "
                        "against its depth network's reading, 0..1 (default: the start's, 1 for a new one)")
    p.add_argument("--anchor-frames", type=int,
                   help="a reprojecting student moves its previous frame from an anchor frame renewed every "
                        "this many frames (one resampling instead of one per frame; 0: from the frame "
                        "before; default: the start's)")
    p.add_argument("--anchor-lowpass", type=float,
                   help="with anchors: take only the anchor's detail above a Gaussian blur of this many "
                        "pixels and the frame before's colours below it (0: the anchor whole; default: the "
                        "start's)")
    p.add_argument("--reveal-fill", choices=list(REVEAL_FILLS),
                   help="what a reprojecting student's moved frame shows where a turn uncovers it: the edge "
                        "column repeated, or the wall at the edge continued as a plane in perspective "
                        "(default: the start's)")


def student_model_config(args: argparse.Namespace) -> tuple[ModelConfig, ModelConfig]:
    """The student's config (from --student, else the teacher's) and the teacher's."""
    from worldloop.distill.stages.shared import student_config

    teacher, _ = checkpoint.read_config(args.teacher)
    source = getattr(args, "student", None)
    base = checkpoint.read_config(source)[0] if source else teacher
    steps = args.student_steps or (base.sampling.steps if source else 2)
    first = args.first_frame_steps or (base.sampling.first_frame_steps if source else 4)
    config = student_config(base, steps, first)
    context_sigma = getattr(args, "context_sigma", None)
    if context_sigma is not None:
        if not 0.0 <= context_sigma < 1.0:
            raise ValueError(f"--context-sigma must be in [0, 1), got {context_sigma}")
        config = config.replace(sampling=dataclasses.replace(config.sampling, context_sigma=context_sigma))
    prediction = getattr(args, "prediction", None)
    if prediction is not None:
        config = config.replace(dit=dataclasses.replace(config.dit, prediction=prediction))
    if getattr(args, "reproject", False) and not config.camera.reproject:  # a new reprojecting student
        config = config.replace(camera=dataclasses.replace(config.camera, reproject=True, depth_memory=1.0))
    # CameraConfig fields of the same names as the options.
    for option in ("resample", "depth_memory", "anchor_frames", "anchor_lowpass", "reveal_fill"):
        value = getattr(args, option, None)
        if value is None:
            continue
        if not config.camera.reproject:
            raise ValueError(f"--{option.replace('_', '-')} applies to a reprojecting student (--reproject)")
        config = config.replace(camera=dataclasses.replace(config.camera, **{option: value}))
    return config, teacher


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
            if args.stage == "truth":
                cfg = dataclasses.replace(cfg, clip_frames=objective.clip_frames)
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
    if args.stage == "truth":
        from worldloop.distill.stages.truth import TruthObjective

        return TruthObjective(**{name: getattr(args, name) for name in TRUTH_OPTIONS})
    from worldloop.distill.stages.dmd import DMDObjective

    return DMDObjective(guidance=guidance, critic_steps=args.critic_updates,
                        critic_lr=args.critic_lr or args.lr, grad_frames=args.grad_frames,
                        min_sigma=args.min_sigma, max_sigma=args.max_sigma, shift=shift)


def _run_stage(args: argparse.Namespace, config: ModelConfig, cfg: TrainConfig, ddp: Any,
               objective: Any) -> Any:
    if args.stage == "cd":
        from worldloop.distill.stages.cd import train_cd

        return train_cd(config, cfg, objective, ddp, teacher_dir=args.teacher, resume=args.resume)
    if args.stage == "truth":
        from worldloop.distill.stages.truth import train_truth

        return train_truth(config, cfg, objective, ddp, teacher_dir=args.teacher, student_dir=args.student,
                           resume=args.resume, vae_dir=args.vae)
    from worldloop.distill.stages.dmd import train_dmd

    return train_dmd(config, cfg, objective, ddp, teacher_dir=args.teacher, student_dir=args.student,
                     real_dir=args.real, resume=args.resume)
