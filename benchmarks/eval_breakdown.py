"""Where a model's eval figures come from: the eval's rollouts broken down per episode, per key and per time.

``worldloop eval`` reports means; this replays its horizon rollouts (the same held-out worlds, context frames,
keys and seeds) and its prompt switch, and prints for each model:

- per episode: its theme, the theme classifier's accuracy on the engine's frames, on the model's 64 frames
  and after the switch (and the theme it names most), and the first frame at which the surface memory's
  pose parts from the engine's by more than 0.05 tiles (a reprojecting model with a memory; "-": never);
- the inverse-dynamics model per key: how often a held key is read (recall) and an unheld one is read
  (false positives), for the engine's frames and the model's; and the exact-keys accuracy by 16-frame block.

The per-episode view is what found stage 15's fixes (docs/TRAINING.md): the colour memory holding the old
theme after a switch, false walls stopping the camera, the picture going flat after turns.

    python benchmarks/eval_breakdown.py assets/default
    python benchmarks/eval_breakdown.py runs/a/model runs/b/model --episodes 8 --threads 2
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from worldloop.app.loading import shipped_asset
from worldloop.distill.eval.evaluate import context_length, engine_clips, switch_targets
from worldloop.distill.eval.evaluators import load_evaluator, predict_keys, predict_themes
from worldloop.distill.world.engine import World
from worldloop.distill.world.themes import THEMES
from worldloop.models.keys import KEYS
from worldloop.models.world_model import WorldModel

HORIZON, SWITCH = 64, 48  # the eval's defaults
PARTED = 0.05  # tiles


def _themes(classifier: torch.nn.Module, frames: np.ndarray) -> torch.Tensor:
    """The classifier's theme index per frame (E, T)."""
    flat = torch.from_numpy(frames.reshape(-1, *frames.shape[2:]))
    return predict_themes(classifier, flat).cpu().argmax(-1).view(*frames.shape[:2])


def _keys(idm: torch.nn.Module, last: np.ndarray, frames: np.ndarray) -> torch.Tensor:
    """The IDM's held-key probabilities (E, T, keys) for the transitions into each frame."""
    streams = np.concatenate([last[:, None], frames], 1)
    return torch.stack([predict_keys(idm, torch.from_numpy(s)).cpu() for s in streams])


def _switched(clips, targets: list[int], start: int) -> np.ndarray:
    """The engine's frames after the switch: the same mazes in the target themes, at the clips' poses."""
    h, w = clips.frames.shape[2:4]
    world = World(clips.seeds, h, w).rethemed([THEMES[t] for t in targets])
    out = []
    for t in range(start + HORIZON, start + HORIZON + SWITCH):
        world.set_poses(torch.from_numpy(clips.poses[:, t]))
        out.append(world.render().cpu().numpy())
    return np.stack(out, 1)


def breakdown(path: Path, episodes: int, seed: int, idm: torch.nn.Module, classifier: torch.nn.Module,
              save: Path | None = None) -> None:
    """Replay the eval's rollouts and switch for the model at ``path`` and print the breakdown."""
    wm = WorldModel.from_pretrained(path, steps=1, max_sessions=episodes)
    start = context_length(wm, 0)
    clips = engine_clips(*wm.frame_shape, episodes, start + HORIZON + SWITCH, seed, torch.device("cpu"))
    sessions = [wm.new_session(prompt, seed=seed + i, first_frames=clips.frames[i, :start],
                               first_keys=clips.keys[i, :start],
                               first_poses=None if clips.poses is None else clips.poses[i, :start])
                for i, prompt in enumerate(clips.prompts)]  # as the eval's rollout_from_engine starts them
    parted: list[int | None] = [None] * episodes
    frames = []
    for t in range(start, start + HORIZON):
        frames.append(wm.next_frame(sessions, clips.keys[:, t].tolist()))
        for i, s in enumerate(sessions):
            if parted[i] is None and s.memory is not None and clips.poses is not None:
                gap = np.hypot(*(s.memory[1].pose[:2].cpu().numpy() - clips.poses[i, t, :2]))
                parted[i] = t - start + 1 if gap > PARTED else None
    generated = np.stack(frames, 1)
    prompts, targets = switch_targets(clips)
    for s, p in zip(sessions, prompts, strict=True):
        wm.set_prompt(s, p)
    after = np.stack([wm.next_frame(sessions, clips.keys[:, t].tolist())
                      for t in range(start + HORIZON, start + HORIZON + SWITCH)], 1)
    engine = clips.frames[:, start: start + HORIZON]
    own, target = torch.tensor(clips.themes), torch.tensor(targets)
    seen_e, seen_m, seen_a = (_themes(classifier, f) for f in (engine, generated, after))
    print(f"\n{path}: {episodes} held-out worlds from {start} engine frames, {HORIZON} frames, then a switch")
    print("episode  theme          engine  model (names most)        after switch to (names most)"
          "         parts")
    for i in range(episodes):
        most_m = THEMES[Counter(seen_m[i].tolist()).most_common(1)[0][0]]
        most_a = THEMES[Counter(seen_a[i].tolist()).most_common(1)[0][0]]
        print(f"{i:7d}  {THEMES[clips.themes[i]]:<13}  {(seen_e[i] == own[i]).float().mean():6.2f}  "
              f"{(seen_m[i] == own[i]).float().mean():5.2f} ({most_m:<13})  "
              f"{THEMES[targets[i]]:<13} {(seen_a[i] == target[i]).float().mean():5.2f} ({most_a:<13})  "
              f"{'-' if parted[i] is None else parted[i]:>5}")
    print(f"mean     {'':13}  {(seen_e == own[:, None]).float().mean():6.2f}  "
          f"{(seen_m == own[:, None]).float().mean():5.2f}{'':17}  {'':13} "
          f"{(seen_a == target[:, None]).float().mean():5.2f}")
    hits = (seen_a == target[:, None]).float()
    print("adherence by 8 frames after the switch: "
          + " ".join(f"{hits[:, j: j + 8].mean():.2f}" for j in range(0, SWITCH, 8)))
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(save / f"{path.name}.npz", model=np.concatenate([generated, after], 1),
                            engine=np.concatenate([engine, _switched(clips, targets, start)], 1),
                            themes=np.array(clips.themes), targets=np.array(targets))
    keys = torch.from_numpy(clips.keys[:, start: start + HORIZON])
    bits = torch.stack([(keys >> b) & 1 for b in range(len(KEYS))], -1).bool()
    last = clips.frames[:, start - 1]
    print("keys        held  engine recall / false+   model recall / false+")
    read = {who: _keys(idm, last, f) > 0.5 for who, f in (("engine", engine), ("model", generated))}
    for b, name in enumerate(KEYS):
        held = bits[..., b]
        cells = [f"{read[w][..., b][held].float().mean():.2f} / {read[w][..., b][~held].float().mean():.3f}"
                 if held.any() else f"   - / {read[w][..., b][~held].float().mean():.3f}" for w in read]
        print(f"{name:<10}  {int(held.sum()):4d}  {cells[0]:>19}   {cells[1]:>19}")
    for who, r in read.items():
        exact = (r == bits).all(-1).float()
        blocks = " ".join(f"{exact[:, j: j + 16].mean():.2f}" for j in range(0, HORIZON, 16))
        print(f"exact keys, {who}, by 16 frames: {blocks} (all {exact.mean():.3f})")
    for s in sessions:
        wm.close_session(s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path)
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="the eval's --seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save", type=Path, help="write each model's frames and the engine's here (MODEL.npz; "
                                             "after the switch: the same mazes in the new themes)")
    p.add_argument("--idm", type=Path, default=shipped_asset("evaluators/idm"))
    p.add_argument("--classifier", type=Path, default=shipped_asset("evaluators/classifier"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    idm = load_evaluator(args.idm, "idm")
    classifier = load_evaluator(args.classifier, "classifier")
    for path in args.models:
        breakdown(path, args.episodes, args.seed, idm, classifier, args.save)


if __name__ == "__main__":
    main()
