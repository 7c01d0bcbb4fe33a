"""``worldloop train vae|teacher|idm|classifier``: the training stages, one subcommand each.

Options are parsed here, once, into frozen configs (``ModelConfig``, ``TrainConfig`` and the stage's
objective); the trainers in ``distill/`` never see argparse. Several processes: ``torchrun
--nproc-per-node N $(which worldloop) train teacher ...`` (DDP; gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from worldloop.app.errors import user_input
from worldloop.app.loading import add_device_option
from worldloop.distill.stages.runtime import (
    Distributed,
    TrainConfig,
    fast_bf16,
    local_batch_size,
    setup_distributed,
    teardown_distributed,
)
from worldloop.models import checkpoint
from worldloop.models.config import PREDICTIONS, PRESETS, ModelConfig, preset

# Per-stage defaults that differ from TrainConfig's.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "vae": {"iterations": 3000, "batch_size": 16, "lr": 1e-3, "warmup": 100, "clip_frames": None},
    # The recipe of docs/training-recipe.md (measured on this 2-core CPU at equal CPU minutes).
    "teacher": {"iterations": 20000, "batch_size": 4, "lr": 1e-3, "warmup": 20, "clip_frames": None},
    "idm": {"iterations": 600, "batch_size": 16, "lr": 1e-3, "warmup": 0, "clip_frames": 4},
    "classifier": {"iterations": 400, "batch_size": 16, "lr": 1e-3, "warmup": 0, "clip_frames": 2},
}


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train the autoencoder, the teacher or the eval helpers")
    stages = train.add_subparsers(dest="stage", metavar="STAGE", required=True)
    helps = {"vae": "the latent autoencoder on world frames",
             "teacher": "the causal DiT teacher (teacher forcing, flow matching)",
             "idm": "the inverse-dynamics model (two frames → keys) used by `worldloop eval`",
             "classifier": "the theme classifier (frame → theme) used by `worldloop eval`"}
    for stage, text in helps.items():
        p = stages.add_parser(stage, help=text, description=f"Train {text}.",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        _common_options(p, stage)
        if stage == "vae":
            p.add_argument("--noise-std", type=float, default=0.1, help="latent noise σ (fixed-variance VAE)")
            p.add_argument("--kl-weight", type=float, default=1e-3, help="weight of the KL term")
            p.add_argument("--edge-weight", type=float, default=0.5, help="weight of the image-gradient L1")
            p.add_argument("--spectrum-weight", type=float, default=0.0,
                           help="weight of the log-amplitude spectrum L1 (models.vae.spectrum_distance)")
            p.add_argument("--adversarial-weight", type=float, default=0.0,
                           help="patch-critic term, times its adaptive weight (0: no critic)")
            p.add_argument("--adversarial-start", type=int, default=0,
                           help="iteration from which the critic trains and its term applies")
            p.add_argument("--decoder-only", action="store_true",
                           help="freeze the encoder of --init-from and fine-tune only the decoder")
            p.add_argument("--roundtrip-weight", type=float, default=0.0,
                           help="weight of the reconstruction encoded and decoded once more against the "
                                "image (keeps the round trips a reprojecting model makes from compounding)")
        if stage == "teacher":
            _teacher_options(p)
        p.set_defaults(func=run)


def _common_options(p: argparse.ArgumentParser, stage: str) -> None:
    p.add_argument("--preset", default="default", choices=list(PRESETS), help="model config preset")
    p.add_argument("--out", type=Path, default=Path("runs") / stage, help="run directory")
    p.add_argument("--clip-frames", type=int, default=STAGE_DEFAULTS[stage]["clip_frames"],
                   help="frames per training clip (default for the teacher: window + sink + 1)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sample-every", type=int, default=500,
                   help="iterations between sample PNG/MP4s (0: never)")
    add_run_options(p, STAGE_DEFAULTS[stage])
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"],
                   help="adamw, or muon: Muon on the transformer blocks' hidden matrices, AdamW on the rest")
    if stage in ("vae", "teacher"):
        p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
        p.add_argument("--init-from", type=Path, metavar="DIR",
                       help="start from a model directory's weights (and EMA) with a fresh optimizer")


def add_run_options(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """The options every training and distillation stage shares: length, optimizer, device, logging, data."""
    d = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | defaults
    p.add_argument("--iterations", type=int, default=d["iterations"], help="optimizer updates in all")
    p.add_argument("--cpu-minutes", type=float, default=0.0,
                   help="also stop (saving and exporting) after this much process CPU time; 0: no limit")
    p.add_argument("--minutes", type=float, default=0.0,
                   help="also stop (saving and exporting) after this much wall-clock time; 0: no limit")
    p.add_argument("--snapshot-minutes", type=float, default=0.0,
                   help="export the model to snapshots/ every this many process CPU minutes (0: never)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="global batch")
    p.add_argument("--lr", type=float, default=d["lr"], help="learning rate")
    p.add_argument("--warmup", type=int, default=d["warmup"], help="linear warm-up iterations")
    p.add_argument("--cooldown", type=int, default=0,
                   help="the last this many of --iterations decay the learning rate linearly towards 0 "
                        "(to end a long run: --resume it with its final --iterations)")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="optimizer weight decay")
    p.add_argument("--grad-clip", type=float, default=d["grad_clip"],
                   help="largest gradient norm (0: no clipping)")
    p.add_argument("--ema-decay", type=float, default=d["ema_decay"],
                   help="decay of the weights' moving average (the EMA weights are what an export plays)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the training worlds")
    add_device_option(p)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA and for CPUs with AVX512-BF16 or AMX)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch's default)")
    p.add_argument("--log-every", type=int, default=d["log_every"], help="iterations between log lines")
    p.add_argument("--checkpoint-every", type=int, default=d["checkpoint_every"],
                   help="iterations between checkpoints (and model directory exports)")
    p.add_argument("--episodes", type=Path,
                   help="train on clips of the recorded episode folders under this path")
    p.add_argument("--pool-clips", type=int, default=-1,
                   help="reuse rendered clips from a pool this big (-1: 256 on CPU, 4096 on CUDA; 0: off)")
    p.add_argument("--pool-refresh", type=int, default=25,
                   help="iterations between re-rendering a pool chunk")


def _teacher_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae", type=Path, metavar="DIR", help="autoencoder from `worldloop train vae`")
    p.add_argument("--bidirectional", action="store_true", help="full attention inside a clip (DMD teacher)")
    p.add_argument("--sample-steps", type=int, default=16,
                   help="denoising steps the exported teacher samples with (its config's sampling.steps)")
    p.add_argument("--shift", type=float, default=3.0, help="timestep shift of training noise levels")
    p.add_argument("--context-noise", type=float, default=0.7, help="max σ of the clean-context augmentation")
    p.add_argument("--key-dropout", type=float, default=0.1,
                   help="fraction of frames trained without their keys (the null condition)")
    p.add_argument("--prompt-dropout", type=float, default=0.1,
                   help="fraction of clips trained without their prompt (for classifier-free guidance)")
    p.add_argument("--random-keys", type=float, default=0.1,
                   help="chance per frame of starting to hold random keys instead of the explorer's")
    p.add_argument("--key-hold", type=int, default=1,
                   help="random keys, once drawn, are held for 1..N frames")
    p.add_argument("--sigma-mean", type=float, default=0.0, help="logit-normal location of training σ")
    p.add_argument("--sigma-std", type=float, default=1.0, help="logit-normal scale of training σ")
    p.add_argument("--prediction", choices=list(PREDICTIONS), default=None,
                   help="what the DiT outputs: v (velocity), x0 (the clean frame; σ²-weighted loss), "
                        "delta (the clean frame minus the previous one; x0 loss) or warp (a flow field that "
                        "moves the previous frame, plus a residual; x0 loss; --init-from a delta model "
                        "starts with zero flow); default: the preset's")
    p.add_argument("--depth-weight", type=float, default=0.0,
                   help="auxiliary loss: log wall depth per token column, from the engine (adds aux heads)")
    p.add_argument("--motion-weight", type=float, default=0.0,
                   help="auxiliary loss: camera motion since the last frame, from the engine "
                        "(adds aux heads)")
    p.add_argument("--dit-depth", type=int, help="transformer layers (default: the preset's)")
    p.add_argument("--dit-dim", type=int, help="transformer width (default: the preset's)")
    p.add_argument("--dit-heads", type=int, help="attention heads (default: the preset's)")


def model_config(args: argparse.Namespace) -> ModelConfig:
    config = preset(args.preset)
    # The autoencoder a run starts from decides the latent shape: the preset takes its section.
    source = getattr(args, "vae", None) or (getattr(args, "init_from", None) if args.stage == "vae" else None)
    if source is not None:
        config = checkpoint.with_autoencoder_of(config, source)
    if getattr(args, "bidirectional", False):  # a delta output needs a previous frame: x0 unless told
        prediction = "x0" if config.dit.reads_previous else config.dit.prediction
        dit = dataclasses.replace(config.dit, bidirectional=True, prediction=prediction)
        config = config.replace(dit=dit)
    dit_overrides = {name: getattr(args, option, None) for name, option in
                     (("prediction", "prediction"), ("depth", "dit_depth"), ("dim", "dit_dim"),
                      ("heads", "dit_heads"))}
    dit_overrides = {k: v for k, v in dit_overrides.items() if v is not None}
    if getattr(args, "depth_weight", 0) > 0 or getattr(args, "motion_weight", 0) > 0:
        dit_overrides["aux_heads"] = True
    if dit_overrides:
        config = config.replace(dit=dataclasses.replace(config.dit, **dit_overrides))
    if args.stage == "teacher":
        config = teacher_sampling(config, args.sample_steps)
    return config


def teacher_sampling(config: ModelConfig, steps: int) -> ModelConfig:
    """``config`` sampling with ``steps`` denoising steps, as the teacher is exported (``--sample-steps``)."""
    if not 1 <= steps <= 1000:
        raise ValueError(f"--sample-steps {steps} is out of range 1..1000")
    sampling = dataclasses.replace(config.sampling, steps=steps,
                                   first_frame_steps=max(steps, config.sampling.first_frame_steps))
    return config.replace(sampling=sampling)


def train_config(args: argparse.Namespace, config: ModelConfig, ddp: Distributed) -> TrainConfig:
    clip = args.clip_frames or config.dit.window + config.dit.sink + 1
    bf16 = fast_bf16(ddp.device) if args.bf16 is None else args.bf16
    local_batch_size(args.batch_size, ddp)  # divisible by the processes, checked here at the edge
    return TrainConfig(
        iterations=args.iterations, cpu_minutes=args.cpu_minutes, minutes=args.minutes,
        batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, cooldown=args.cooldown,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, ema_decay=args.ema_decay, clip_frames=clip,
        seed=args.seed, device=str(ddp.device), bf16=bf16, compile=args.compile, out=str(args.out),
        log_every=args.log_every, sample_every=args.sample_every, checkpoint_every=args.checkpoint_every,
        episodes=str(args.episodes) if args.episodes else None, pool_clips=args.pool_clips,
        pool_refresh=args.pool_refresh, optimizer=getattr(args, "optimizer", "adamw"),
        snapshot_minutes=getattr(args, "snapshot_minutes", 0.0),
    )


def run(args: argparse.Namespace) -> int:
    with user_input():  # options and configs; what the run itself raises keeps its traceback
        if args.threads < 0:
            raise ValueError(f"--threads {args.threads} is out of range")
        config = model_config(args)
        objective = _objective(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    with user_input():
        ddp = setup_distributed(args.device)
    try:
        with user_input():
            cfg = train_config(args, config, ddp)
        result = _run_stage(args, config, cfg, ddp, objective)
    finally:
        teardown_distributed()
    if ddp.is_main:
        print(result)
    return 0


def _objective(args: argparse.Namespace) -> Any:
    if args.stage == "vae":
        from worldloop.distill.stages.vae import VAEObjective

        return VAEObjective(args.noise_std, args.kl_weight, args.edge_weight, args.spectrum_weight,
                            args.adversarial_weight, args.adversarial_start, decoder_only=args.decoder_only,
                            roundtrip_weight=args.roundtrip_weight)
    if args.stage == "teacher":
        from worldloop.distill.stages.teacher import TeacherObjective

        return TeacherObjective(shift=args.shift, sigma_mean=args.sigma_mean, sigma_std=args.sigma_std,
                                context_noise=args.context_noise, key_dropout=args.key_dropout,
                                prompt_dropout=args.prompt_dropout, random_keys=args.random_keys,
                                key_hold=args.key_hold, depth_weight=args.depth_weight,
                                motion_weight=args.motion_weight)
    return None


def _run_stage(args: argparse.Namespace, config: ModelConfig, cfg: TrainConfig, ddp: Distributed,
               objective: Any) -> str:
    if args.stage == "vae":
        from worldloop.distill.stages.vae import train_vae

        result = train_vae(config, cfg, objective, ddp, resume=args.resume, init_from=args.init_from)
        return f"iteration {result.iteration}; model directory: {result.model_dir}"
    if args.stage == "teacher":
        from worldloop.distill.stages.teacher import train_teacher

        result = train_teacher(config, cfg, objective, ddp, vae_from=args.vae, resume=args.resume,
                               init_from=args.init_from)
        return f"iteration {result.iteration}; model directory: {result.model_dir}"
    from worldloop.distill.stages.helpers import train_for_config

    metrics = train_for_config(args.stage, config, cfg, ddp)
    shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
    return f"{args.stage} saved to {cfg.out}; held-out accuracy: {shown}"
