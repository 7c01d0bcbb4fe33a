"""Hold one key from engine frames: how long each model keeps the world it started from.

Each model starts from the engine's frames of held-out worlds (as ``play --start world`` does) and plays
with one key held; the engine is stepped by the same key. After the listed frames it prints, per model and
key, the mean PSNR against the engine, the sharpness ratio (Laplacian variance over the engine frame's: 0 is
a flat field, above 1 detail of its own) and the mean brightness (the engine's in the first row). With
``--picture`` it also writes engine | model | … at those frames, one block of rows per world and key.

    python benchmarks/held_keys.py assets/default runs/truth/model
    python benchmarks/held_keys.py runs/a/model runs/b/model --keys forward,turn_left --worlds 4 \\
        --frames 1,4,16,32,48 --picture runs/held.jpg
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from worldloop.app.beside import EngineBeside
from worldloop.app.loading import choose_model, load_model
from worldloop.app.starts import WorldStart, context_frames
from worldloop.distill.eval import metrics
from worldloop.distill.world.themes import describe, sample_params
from worldloop.models.keys import parse_keys

SEED = 10_000_000  # held-out worlds: the eval's seeds, apart from every training run's


def _unit(frame: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255


def hold(models: list, key: int, worlds: int, marks: list[int]) -> tuple[dict, list[np.ndarray]]:
    """Per model (by index) and mark: lists of (PSNR, model sharpness, engine sharpness, brightness,
    engine brightness) over the worlds; and one picture row per world and mark."""
    scores: dict = {(i, m): [] for i in range(len(models)) for m in marks}
    rows: list[np.ndarray] = []
    for w in range(worlds):
        prompt = describe(sample_params(SEED + w))
        shown: dict[int, list[np.ndarray]] = {m: [] for m in marks}
        for i, wm in enumerate(models):
            start = WorldStart(wm.config.height, wm.config.width, context_frames(wm.config))
            first, engine = EngineBeside.start(start, prompt, SEED + w)
            session = wm.new_session(prompt, w, first_frames=first.frames, first_keys=list(first.keys),
                                     first_poses=first.poses)
            for n in range(1, max(marks) + 1):
                frame = wm.next_frame([session], [key])[0]
                truth = engine.next_frame(key)
                if n in shown:
                    if i == 0:
                        shown[n].append(truth)
                    shown[n].append(frame)
                    a, b = _unit(frame), _unit(truth)
                    scores[(i, n)].append((float(metrics.psnr(a, b)[0]), float(metrics.sharpness(a)[0]),
                                           float(metrics.sharpness(b)[0]), float(a.mean()), float(b.mean())))
            wm.close_session(session)
        rows += [np.concatenate(shown[m], 1) for m in marks]
    return scores, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path, help="model directories")
    p.add_argument("--keys", default="forward,turn_left", help="keys to hold, one run each (comma-separated)")
    p.add_argument("--worlds", type=int, default=4, help="held-out worlds")
    p.add_argument("--frames", default="1,4,16,32,48", help="frames to score")
    p.add_argument("--steps", type=int, default=1, help="denoising steps of every model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--picture", type=Path, help="write engine | model | … at the scored frames here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    marks = sorted({int(f) for f in args.frames.split(",")})
    models = []
    for path in args.models:
        wm = load_model(choose_model(path, None, fallback=False))
        wm.steps = args.steps
        models.append(wm)
    pictures = []
    for name in args.keys.split(","):
        key = parse_keys(name)
        scores, rows = hold(models, key, args.worlds, marks)
        pictures += rows
        print(f"holding {name} ({args.worlds} worlds, {args.steps} step): "
              "PSNR / sharpness ratio / brightness")
        engine = [np.mean([s[4] for s in scores[(0, m)]]) for m in marks]
        print(f"  {'engine (brightness)':40s} " + "  ".join(f"f{m}: {b:.3f}"
                                                           for m, b in zip(marks, engine, strict=True)))
        for i, path in enumerate(args.models):
            cells = []
            for m in marks:
                s = np.array(scores[(i, m)])
                ratio = s[:, 1].mean() / max(s[:, 2].mean(), 1e-12)
                cells.append(f"f{m}: {s[:, 0].mean():5.2f} / {ratio:4.2f} / {s[:, 3].mean():.3f}")
            print(f"  {str(path)[-40:]:40s} " + "  ".join(cells))
    if args.picture:
        grid = np.concatenate(pictures, 0)
        Image.fromarray(grid).save(args.picture, quality=90)
        print(f"picture: {args.picture} ({grid.shape[1]}×{grid.shape[0]}; columns: engine, "
              + ", ".join(str(m) for m in args.models) + f"; rows: per key, world and frame {marks})")


if __name__ == "__main__":
    main()
