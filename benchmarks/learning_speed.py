"""Learning per CPU minute: train a teacher from scratch for a fixed process-CPU budget, then run one fixed
short evaluation on held-out worlds, and print one JSON line.

Every run: the same preset and autoencoder (``assets/autoencoder``), seed, thread count and budget; the
training process stops itself after ``--minutes`` of its own CPU time (``--cpu-minutes``, so a busy machine
slows a run down but does not change what it is allowed to compute). The evaluation
(``distill.eval.evaluate.quick_eval``) then measures on 8 held-out worlds, started from 9 engine frames and
driven by the engine's keys: PSNR and sharpness ratio at horizons 1/4/16 with the copy-last-frame baseline
beside them, key accuracy of the shipped inverse-dynamics model per key and exact with the always-no-key rate
beside it, and prompt adherence after a switch to another theme (shipped classifier).

A recipe is a named set of `worldloop train teacher` flags (``RECIPES``: ``v1`` is the recipe before the
learning-speed work (the command's old defaults), ``shipped`` the hand-tuned flags of the teacher in
``assets/default``, ``default`` the command's defaults); flags after ``--`` are appended, so a variant is a
recipe plus what it changes:

    python benchmarks/learning_speed.py --minutes 20 --recipe v1 --name v1 --curve-every 5
    python benchmarks/learning_speed.py --minutes 20 --name x0 -- --prediction x0
    python benchmarks/learning_speed.py --plot runs/learning/v1 runs/learning/default \
        --plot-out docs/training-recipe/curves.png
    python benchmarks/learning_speed.py --table runs/learning/v1 runs/learning/x0   # markdown

``--curve-every M`` exports a snapshot every M CPU minutes and evaluates each afterwards (outside the budget):
the learning curve (PSNR and key accuracy against CPU minutes). Results: ``ROOT/NAME/result.json`` and
``ROOT/NAME/frames.png`` (four held-out worlds, engine | model at horizons 1, 4 and 16), and the same
picture of each snapshot, ``ROOT/NAME/frames-cpuMMMM.MMM.png``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from worldloop.app.loading import shipped_asset
from worldloop.distill.eval.evaluate import load_helpers, quick_eval
from worldloop.models import checkpoint

# `worldloop train teacher` flags of each named recipe (before the variant's own flags).
RECIPES: dict[str, list[str]] = {
    # The recipe of the models trained before this benchmark existed (the command's old defaults).
    "v1": ["--batch-size", "16", "--lr", "3e-4", "--warmup", "500", "--no-bf16", "--shift", "3",
           "--context-noise", "0.1", "--random-keys", "0.1", "--key-hold", "1", "--prediction", "v",
           "--optimizer", "adamw", "--sigma-mean", "0", "--sigma-std", "1"],
    # The hand-tuned flags that trained the teacher in assets/default (README, "Training on this CPU": its
    # second and longest stage), on this benchmark's autoencoder; evaluate it with --eval-context-sigma 0.2.
    "shipped": ["--batch-size", "4", "--clip-frames", "12", "--lr", "6e-4", "--warmup", "30", "--ema-decay",
                "0.996", "--bf16", "--shift", "3", "--context-noise", "0.1", "--random-keys", "0.1",
                "--key-hold", "1", "--prediction", "v", "--optimizer", "adamw"],
    "default": [],  # whatever `worldloop train teacher` does by default
}
FOREVER = str(10**9)  # iterations: the CPU budget is what stops the run


def train(run: Path, args: argparse.Namespace, extra: list[str]) -> float:
    """Train in a child process; returns its CPU minutes (start-up and data included, all threads)."""
    command = [sys.executable, "-m", "worldloop.app.cli", "train", "teacher", "--preset", args.preset,
               "--vae", str(args.vae), "--out", str(run), "--iterations", FOREVER,
               "--cpu-minutes", str(args.minutes), "--threads", str(args.threads), "--seed", str(args.seed),
               "--sample-every", "0", "--checkpoint-every", FOREVER, "--log-every", "5",
               "--snapshot-minutes", str(args.curve_every), *RECIPES[args.recipe], *extra]
    print("training:", " ".join(command[2:]), file=sys.stderr, flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    (run.parent / "cpu_minutes.txt").write_text(f"{cpu / 60:.3f}\n")
    return cpu / 60


def training_figures(run: Path, model: Path) -> dict[str, Any]:
    """Iterations, CPU minutes and frames trained per CPU second, from the run's log and settings, for the
    exported ``model`` (the run's, or its newest snapshot while it still trains)."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    settings = json.loads((run / "train.json").read_text())
    last = records[-1]
    _, metadata = checkpoint.read_config(model)
    iterations = int(metadata.get("step", last["iteration"]))
    frames = iterations * settings["train"]["batch_size"] * settings["train"]["clip_frames"]
    tail = [r["loss"] for r in records[-10:]]
    def recent(key: str) -> list[float]:  # the last 20 logged values that are numbers (NaN: no such frame)
        return [r[key] for r in records[-20:] if key in r and r[key] == r[key]]

    change, steady = recent("loss_key_change"), recent("loss_key_steady")
    whole = run.parent / "cpu_minutes.txt"  # the whole training process, when this script trained it
    minutes = float(whole.read_text()) if whole.is_file() else float(last["cpu_minutes"])
    out = {"iterations": iterations, "cpu_minutes": minutes,
           "frames_per_cpu_s": frames / max(1e-9, 60 * minutes),
           "final_loss": sum(tail) / len(tail)}
    if change and steady:
        out["loss_key_change"] = sum(change) / len(change)
        out["loss_key_steady"] = sum(steady) / len(steady)
    return out


def evaluate(model: Path, args: argparse.Namespace, helpers: tuple[Any, Any], picture: Path | None = None
             ) -> dict[str, Any]:
    return quick_eval(model, steps=args.eval_steps, idm=helpers[0], classifier=helpers[1], picture=picture,
                      episodes=args.episodes, seed=args.eval_seed, context_sigma=args.eval_context_sigma)


def snapshot_minutes(folder: Path) -> float:
    return float(folder.name.removeprefix("cpu"))


def benchmark(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    folder = args.root / args.name
    run = folder / "run"
    if not args.eval_only:
        if folder.exists():
            if not args.force:
                raise SystemExit(f"{folder} exists; pass --force to replace it or --eval-only to re-evaluate")
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        train(run, args, extra)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    snapshots = sorted((run / "snapshots").glob("cpu*")) if (run / "snapshots").is_dir() else []
    # The run's model, or while it still trains (or after a segment that stopped early exported an older
    # model/) whichever of it and the newest snapshot has trained more iterations.
    candidates = [m for m in (run / "model", *snapshots[-1:]) if (m / "config.json").is_file()]
    if not candidates:
        raise SystemExit(f"{run}: neither an exported model nor a snapshot to evaluate yet")
    model = max(candidates, key=lambda m: int(checkpoint.read_config(m)[1].get("step", 0)))
    config, _ = checkpoint.read_config(model)
    frame = (config.height, config.width)
    helpers = load_helpers(None if args.idm == Path("none") else args.idm,
                           None if args.classifier == Path("none") else args.classifier, frame,
                           torch.device("cpu"))
    if args.eval_only and (folder / "result.json").is_file():  # how it was trained stays on record
        before = json.loads((folder / "result.json").read_text())
        args.recipe, extra, args.seed = before["recipe"], before["flags"], before["seed"]
    result: dict[str, Any] = {"name": args.name, "recipe": args.recipe, "flags": extra,
                              "eval_context_sigma": args.eval_context_sigma, "budget_minutes": args.minutes,
                              "threads": args.threads, "seed": args.seed, "preset": args.preset,
                              **training_figures(run, model)}
    evaluated = evaluate(model, args, helpers[:2], folder / "frames.png")
    result |= evaluated
    if model != run / "model":
        result["evaluated"] = model.name
    curve = []
    for snap in snapshots:
        picture = folder / f"frames-{snap.name}.png"
        point = evaluated if snap == model else evaluate(snap, args, helpers[:2], picture)
        curve.append({"cpu_minutes": snapshot_minutes(snap), **point})
    if curve:
        result["curve"] = curve
    result["eval_seconds"] = round(time.perf_counter() - started, 1)
    (folder / "result.json").write_text(json.dumps(result, indent=2))
    return result


def plot(runs: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_psnr, ax_keys) = plt.subplots(1, 2, figsize=(11, 4))
    for folder in runs:
        result = json.loads((folder / "result.json").read_text())
        curve = result.get("curve") or []
        xs = [p["cpu_minutes"] for p in curve]
        ax_psnr.plot(xs, [p["psnr_h4"] for p in curve], marker="o", label=result["name"])
        ax_keys.plot(xs, [p.get("key_per_key") for p in curve], marker="o", label=result["name"])
        if curve:
            ax_psnr.axhline(curve[-1]["copy_last_psnr_h4"], ls=":", c="grey")
            ax_keys.axhline(curve[-1]["no_key_rate_per_key"], ls=":", c="grey")
    ax_psnr.set(xlabel="process CPU minutes", ylabel="PSNR at horizon 4 (dB)",
                title="PSNR vs engine (dotted: copy last frame)")
    ax_keys.set(xlabel="process CPU minutes", ylabel="key accuracy per key (IDM)",
                title="keys followed (dotted: always no key)")
    for ax in (ax_psnr, ax_keys):
        ax.grid(alpha=0.3)
        ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}", file=sys.stderr)


TABLE = (("iterations", "it", 0), ("frames_per_cpu_s", "frames/CPU-s", 1), ("psnr_h1", "PSNR h1", 2),
         ("psnr_h4", "PSNR h4", 2), ("psnr_h16", "PSNR h16", 2), ("sharpness_h1", "sharp h1", 3),
         ("sharpness_h4", "sharp h4", 3), ("key_per_key", "keys/key", 3), ("key_exact", "keys exact", 3),
         ("prompt_adherence", "prompt", 2), ("loss_key_change", "loss after key change", 3),
         ("loss_key_steady", "loss, keys steady", 3))


def table(runs: list[Path]) -> str:
    """A markdown table of finished runs (their result.json), with the baselines in the first row."""
    results = [json.loads((r / "result.json").read_text()) for r in runs]
    sigmas = [r.get("eval_context_sigma") for r in results]  # None: the model's own
    models = [run / "run" / ("snapshots/" + r["evaluated"] if "evaluated" in r else "model")
              for r, run in zip(results, runs, strict=True)]
    sigmas = [checkpoint.read_config(model)[0].sampling.context_sigma if s is None else s
              for s, model in zip(sigmas, models, strict=True)]
    cells = [[str(r["name"]), f"{r['recipe']}: " + (" ".join(r.get("flags", [])) or "–"), str(r["seed"]),
              _cell(sigma, 1), *(_cell(r.get(key), digits) for key, _, digits in TABLE)]
             for r, sigma in zip(results, sigmas, strict=True)]
    first = results[0]
    baseline = ["copy last frame / always no key", "", "", ""] + [
        _cell(first.get(f"copy_last_{key}"), d) if key.startswith("psnr") else
        _cell(first.get("no_key_rate_per_key"), d) if key == "key_per_key" else "" for key, _, d in TABLE]
    head = ["run", "recipe: flags", "seed", "cache σ"] + [label for _, label, _ in TABLE]
    rows = [head, ["---"] * len(head), baseline, *cells]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"


def _cell(value: Any, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0, help="process CPU minutes of training")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the training process and the eval")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--preset", default="default")
    p.add_argument("--vae", type=Path, default=shipped_asset("autoencoder"),
                   help="autoencoder model directory")
    p.add_argument("--recipe", default="default", choices=list(RECIPES),
                   help="named flag set before the extras")
    p.add_argument("--name", default=None, help="run name (default: the recipe's)")
    p.add_argument("--root", type=Path, default=Path("runs/learning"), help="where runs and results go")
    p.add_argument("--curve-every", type=float, default=0.0,
                   help="snapshot and evaluate every this many CPU minutes (0: the end only)")
    p.add_argument("--eval-steps", type=int, default=4, help="denoising steps of the evaluation")
    p.add_argument("--eval-seed", type=int, default=0, help="held-out worlds of the evaluation")
    p.add_argument("--eval-context-sigma", type=float, default=None,
                   help="σ generated frames are re-noised to in the cache (default: the model's own)")
    p.add_argument("--episodes", type=int, default=8, help="held-out worlds evaluated")
    p.add_argument("--idm", type=Path, default=shipped_asset("evaluators/idm"), help="'none' to skip")
    p.add_argument("--classifier", type=Path, default=shipped_asset("evaluators/classifier"),
                   help="'none' to skip")
    p.add_argument("--eval-only", action="store_true", help="re-evaluate an existing run")
    p.add_argument("--force", action="store_true", help="replace an existing run of this name")
    p.add_argument("--plot", type=Path, nargs="+", metavar="RUN", help="plot the curves of these runs")
    p.add_argument("--plot-out", type=Path, default=Path("runs/learning/curves.png"))
    p.add_argument("--table", type=Path, nargs="+", metavar="RUN",
                   help="print a markdown table of these finished runs")
    args = p.parse_args(argv)
    if args.plot:
        plot(args.plot, args.plot_out)
        return 0
    if args.table:
        print(table(args.table), end="")
        return 0
    args.name = args.name or args.recipe
    result = benchmark(args, extra)
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
