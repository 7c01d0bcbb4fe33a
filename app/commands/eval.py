"""``worldloop eval --model DIR[@STEPS] …``: world models against the built-in world's engine (held-out
seeds).

    worldloop eval --model runs/teacher/model --steps 16 --out runs/eval
    worldloop eval --model runs/student/model --steps 1,2 --drift-seconds 60 --idm runs/idm \
        --classifier runs/classifier
    worldloop eval --model runs/teacher/model@16 --model runs/dmd/model@2,1 --out runs/eval   # side by side
    worldloop eval --model runs/teacher/model@16 --context-sigma 0.2   # re-noise frames in the cache
    worldloop eval --autoencoder runs/vae/model                # the autoencoder alone (its ceiling)

``--model`` is repeatable (``worldloop eval DIR[@STEPS] …``, the models as positional arguments, works too).
DIR@STEPS picks the step counts of one model (--steps, or the model's own, for the others). Writes
report.json, summary.md (the runs side by side, copy-last-frame baseline first, then each model's autoencoder
alone: encode → decode of held-out frames), rollout/drift MP4s, plots and autoencoder*.png (engine |
reconstruction, one row per theme).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from worldloop.app.errors import UserError, user_input
from worldloop.app.loading import add_device_option, shipped_asset


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate models against the engine (PSNR, keys, prompts, drift)",
                              description=__doc__)
    p.add_argument("--model", action="append", default=[], metavar="DIR[@STEPS]", dest="model_options",
                   help="a model directory, optionally @STEPS[,STEPS] (its denoising steps); repeatable")
    p.add_argument("models", nargs="*", metavar="DIR[@STEPS]", help="more models, as --model")
    p.add_argument("--autoencoder", type=Path, metavar="DIR",
                   help="measure only this model directory's autoencoder "
                        "(encode → decode of held-out frames)")
    p.add_argument("--steps", default="", help="denoising steps, comma-separated (default: each model's own)")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="report directory")
    p.add_argument("--idm", type=Path, default=shipped_asset("evaluators/idm"),
                   help="inverse-dynamics model directory (default: the shipped one, 128×128 frames)")
    p.add_argument("--classifier", type=Path, default=shipped_asset("evaluators/classifier"),
                   help="theme classifier directory (default: the shipped one, 128×128 frames)")
    p.add_argument("--episodes", type=int, default=8, help="held-out worlds")
    p.add_argument("--horizons", default="1,4,16,64", help="frames after the context, comma-separated")
    p.add_argument("--context-frames", type=int, default=0,
                   help="engine frames given as context (0: sink + window)")
    p.add_argument("--switch-frames", type=int, default=48, help="frames generated after the prompt switch")
    p.add_argument("--drift-seconds", type=float, default=600.0, help="length of the drift rollout")
    p.add_argument("--drift-sessions", type=int, default=8,
                   help="sessions rolled out for the drift (fewer swing by ±0.4 in the sharpness change)")
    p.add_argument("--drift-every", type=int, default=30, help="frames between drift measurements")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out worlds and the sessions")
    p.add_argument("--context-sigma", type=float, default=None,
                   help="σ generated frames are re-noised to before they enter the cache, for every model "
                        "(default: each model's own sampling.context_sigma)")
    add_device_option(p)
    p.set_defaults(func=run)


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{name} takes comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise UserError(f"--{name} values must be at least 1, got {text!r}")
    return values


def eval_plan(models: list[str], steps_option: str) -> list[tuple[Path, int | None]]:
    """``DIR[@STEPS]`` specs and ``--steps`` → (model directory, denoising steps or None: its own) runs."""
    steps: list[int | None] = list(_ints(steps_option, "steps")) or [None]
    plan: list[tuple[Path, int | None]] = []
    for spec in models:
        text, at, own = spec.rpartition("@") if "@" in spec else (spec, "", "")
        path = Path(text)
        if not path.is_dir():
            raise UserError(f"{path}: not a model directory")
        plan += [(path, n) for n in (_ints(own, "steps") if at else steps)]
    return plan


def run(args: argparse.Namespace) -> int:
    import torch

    from worldloop.distill.eval.evaluate import EvalConfig, run_autoencoder_eval, run_eval

    models = [*args.model_options, *args.models]
    if args.autoencoder is not None:
        if models:
            raise UserError("--autoencoder measures one autoencoder alone; drop the models")
        if not args.autoencoder.is_dir():
            raise UserError(f"{args.autoencoder}: not a model directory")
        row = run_autoencoder_eval(args.autoencoder, args.out, seed=args.seed)["autoencoder_only"][0]
        print(f"{args.autoencoder} autoencoder: PSNR {row['psnr']:.2f} dB (worst {row['psnr_min']:.2f}), "
              f"SSIM {row['ssim']:.3f}, sharpness ratio {row['sharpness_ratio']:.3f}, "
              f"decode {row['decode_ms']:.2f} ms")
        print(f"report: {args.out / 'report.json'}; picture: {args.out / row['picture']}")
        return 0
    if not models:
        raise UserError("give at least one --model DIR (or --autoencoder DIR)")
    plan = eval_plan(models, args.steps)
    horizons = _ints(args.horizons, "horizons")
    if not horizons:
        raise UserError("--horizons needs at least one value")
    with user_input():
        cfg = EvalConfig(episodes=args.episodes, horizons=tuple(horizons), context_frames=args.context_frames,
                         switch_frames=args.switch_frames, drift_seconds=args.drift_seconds,
                         drift_sessions=args.drift_sessions, drift_every=args.drift_every, seed=args.seed,
                         context_sigma=args.context_sigma)
    report = run_eval(plan, cfg, args.out, idm_path=args.idm, classifier_path=args.classifier,
                      device=torch.device(args.device))
    for r in report["runs"]:
        h = r["horizons"]
        psnr = ", ".join(f"h{k} {v['psnr']:.2f} (copy {v['copy_last_psnr']:.2f})" for k, v in h.items())
        print(f"{r['model']} @ {r['steps']} steps: PSNR dB {psnr}")
        for note in r["notes"]:
            print(f"  note: {note}")
    print(f"report: {args.out / 'report.json'}; side by side: {args.out / 'summary.md'}")
    return 0
