"""``worldloop world``: the built-in world — record episodes, list the themes, render the theme pictures.

    worldloop world record --out episodes/dungeon-3 --theme dungeon --seed 3 --frames 600 --size 128
    worldloop world record --out ep --keys walk.txt --size 160x120 --fps 30 --lossless
    worldloop world themes
    worldloop world themes --seed 4 --pictures docs/themes --sheet docs/themes.png   # the docs pictures

Key scripts (``--keys FILE``) hold one frame per line: the keys held in that frame, joined by ``+``
(w a s d = forward, strafe left, back, strafe right; q e = turn left, turn right; or the full names
forward, back, left, right, turn_left, turn_right), ``none`` (or ``-``) for no key, and ``N*KEYS`` to repeat
a line N times. Blank lines and ``#`` comments are skipped. Example:

    # walk, look left, walk on diagonally
    30*w
    10*q
    w+a
    none
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from worldloop.app.errors import UserError, user_input
from worldloop.app.loading import add_device_option
from worldloop.distill.data.episodes import EpisodeMeta, EpisodeWriter
from worldloop.distill.world.engine import World, check_size
from worldloop.distill.world.explorer import Explorer
from worldloop.distill.world.themes import THEMES, describe, sample_params
from worldloop.models.device import resolve_device
from worldloop.models.keys import parse_keys

MAX_SCRIPT_REPEAT = 1_000_000


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("world", help="the built-in world: record episodes, list themes",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = group.add_subparsers(dest="world_command", metavar="SUBCOMMAND", required=True)
    rec = commands.add_parser("record", help="record an episode (video, keys, prompt, poses)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rec.add_argument("--out", type=Path, required=True, help="episode folder to create")
    rec.add_argument("--seed", type=int, default=0, help="world seed: maze, jitter, explorer (default 0)")
    rec.add_argument("--theme", default="random", help=f"{', '.join(THEMES)}, or random (default)")
    rec.add_argument("--frames", type=int, help="frames to record (default 300, or the key script's length)")
    rec.add_argument("--size", default="128", help="N or WIDTHxHEIGHT, even, 64..256 (default 128)")
    rec.add_argument("--fps", type=int, default=30, help="video frame rate (default 30)")
    rec.add_argument("--keys", type=Path, metavar="FILE", help="key script (see above); default: explorer")
    rec.add_argument("--lossless", action="store_true", help="also store the exact frames (frames.npy)")
    rec.add_argument("--force", action="store_true", help="replace an existing episode folder")
    add_device_option(rec)
    rec.set_defaults(func=record)
    themes = commands.add_parser("themes", help="list the themes with a sample prompt each")
    themes.add_argument("--seed", type=int, default=0, help="seed of the sample worlds (default 0)")
    themes.add_argument("--pictures", type=Path, metavar="DIR", help="write a picture per theme into DIR")
    themes.add_argument("--sheet", type=Path, metavar="FILE", help="write a contact sheet (PNG)")
    themes.set_defaults(func=list_themes)


def parse_size(spec: str) -> tuple[int, int]:
    """``"128"`` or ``"160x120"`` (width x height) → (height, width), checked like the engine does."""
    parts = spec.lower().split("x")
    try:
        if len(parts) not in (1, 2):
            raise ValueError
        width, height = int(parts[0]), int(parts[-1])
    except ValueError:
        raise UserError(f"--size must be N or WIDTHxHEIGHT, got {spec!r}") from None
    check_size(height, width)
    return height, width


def parse_key_script(text: str, source: str = "key script") -> list[tuple[int, int]]:
    """Key script text → runs of (frames, key bitmask); ValueErrors name ``source`` and the line number."""
    runs: list[tuple[int, int]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        count, _, keys = line.rpartition("*")
        try:
            repeat = int(count) if count.strip() else 1
            if not 1 <= repeat <= MAX_SCRIPT_REPEAT:
                raise ValueError(f"repeat count must be 1..{MAX_SCRIPT_REPEAT}, got {repeat}")
            mask = parse_keys("none" if keys.strip() == "-" else keys)
        except ValueError as err:
            raise ValueError(f"{source}:{number}: {err} in {raw.strip()!r}") from None
        runs.append((repeat, mask))
    if not runs:
        raise ValueError(f"{source}: no frames (one line per frame, e.g. 'w', 'w+a', '30*w', 'none')")
    return runs


def read_key_script(path: Path) -> list[tuple[int, int]]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read key script {path}: {getattr(err, 'strerror', None) or err}") from None
    return parse_key_script(text, str(path))


def _expand(runs: list[tuple[int, int]], frames: int | None, source: Path) -> list[int]:
    total = sum(n for n, _ in runs)
    if frames is not None and frames > total:
        raise UserError(f"{source}: the key script has {total} frames, --frames asks for {frames}")
    keys: list[int] = []
    for n, mask in runs:
        keys.extend([mask] * min(n, (frames or total) - len(keys)))
    return keys


def record(args: argparse.Namespace) -> int:
    with user_input():  # check every input before anything is created
        world, script, writer = _prepare_recording(args)
    frames = len(script) if script is not None else (args.frames or 300)
    explorer = None if script is not None else Explorer(world.seeds)
    collided: list[int] = []
    with writer:
        for t in tqdm(range(frames), desc="recording", unit="frame", disable=None, leave=False):
            keys = torch.tensor([script[t]]) if script is not None else explorer.act(world)
            frame = world.next_frame(keys)[0].cpu().numpy()
            writer.append(frame, int(keys[0]), world.poses[0].tolist())
            if world.collided[0]:
                collided.append(t)
        writer.extra["collided_frames"] = collided  # frames whose move was (partly) blocked by a wall
    height, width = world.height, world.width
    print(f"recorded {frames} frames ({width}x{height}, {args.fps} fps) to {args.out}\n"
          f"prompt: {world.prompts[0]}")
    return 0


def _prepare_recording(args: argparse.Namespace) -> tuple[World, list[int] | None, EpisodeWriter]:
    """The world, the key script (None: the explorer drives) and the episode writer, or an error."""
    height, width = parse_size(args.size)
    if args.theme != "random" and args.theme not in THEMES:
        raise UserError(f"unknown theme {args.theme!r}; choose one of {', '.join(THEMES)} or random")
    if args.frames is not None and args.frames < 1:
        raise UserError(f"--frames must be positive, got {args.frames}")
    if not 1 <= args.fps <= 240:
        raise UserError(f"--fps must be 1..240, got {args.fps}")
    device = resolve_device(args.device)
    script = _expand(read_key_script(args.keys), args.frames, args.keys) if args.keys else None
    params = sample_params(args.seed, None if args.theme == "random" else args.theme)
    world = World([params], height, width, device)
    meta = EpisodeMeta(fps=args.fps, source="world", seed=args.seed, params=params.to_dict(),
                       extra={"policy": "key script" if script is not None else "explorer",
                              "world_config": dataclasses.asdict(world.config)})
    writer = EpisodeWriter(args.out, meta, world.prompts[0], lossless=args.lossless, overwrite=args.force)
    return world, script, writer


def list_themes(args: argparse.Namespace) -> int:
    for theme in THEMES:
        print(f"{theme:14s} {describe(sample_params(args.seed, theme))}")
    if args.pictures or args.sheet:
        pictures = theme_pictures(args.seed)
        if args.pictures:
            for theme, image in pictures.items():
                _write_png(args.pictures / f"{theme.replace(' ', '_')}.png", image)
        if args.sheet:
            _write_png(args.sheet, contact_sheet(pictures))
    return 0


def theme_pictures(seed: int, size: int = 128,
                   warmup: tuple[int, ...] = (30, 90, 150, 210)) -> dict[str, np.ndarray]:
    """Per theme a 2×2 grid of frames from four worlds after some explorer frames → (2s, 2s, 3) uint8."""
    params = [sample_params(seed + i, theme) for theme in THEMES for i in range(len(warmup))]
    world = World(params, size, size)
    explorer = Explorer(world.seeds)
    limit = torch.tensor(warmup * len(THEMES))
    for t in range(max(warmup)):
        world.move(torch.where(limit > t, explorer.act(world), 0))
    frames = world.render().cpu().numpy()
    out = {}
    for k, theme in enumerate(THEMES):
        f = frames[k * 4: k * 4 + 4]
        out[theme] = np.concatenate([np.concatenate(f[:2], 1), np.concatenate(f[2:], 1)], 0)
    return out


def contact_sheet(pictures: dict[str, np.ndarray], columns: int = 4) -> np.ndarray:
    """Theme pictures in a grid, each labelled with its theme name underneath."""
    import cv2

    tiles = []
    for theme, image in pictures.items():
        label = np.full((28, image.shape[1], 3), 24, dtype=np.uint8)
        cv2.putText(label, theme, (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (235, 235, 235), 1, cv2.LINE_AA)
        tiles.append(np.concatenate([image, label], 0))
    while len(tiles) % columns:
        tiles.append(np.full_like(tiles[0], 24))
    rows = [np.concatenate(tiles[i: i + columns], 1) for i in range(0, len(tiles), columns)]
    return np.concatenate(rows, 0)


def _write_png(path: Path, image: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image[..., ::-1]):
        raise UserError(f"cannot write {path}")
    print(f"wrote {path}", file=sys.stderr)
