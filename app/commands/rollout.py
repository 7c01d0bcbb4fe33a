"""``worldloop rollout``: roll the world model out offline into a long video (fragmented MP4) + JSON sidecar.

    worldloop rollout --prompt "ice cave" --seconds 60 --out ice.mp4
    worldloop rollout --prompt "a dungeon" --prompt-at 600:"a neon city" --frames 1200 --keys walk.txt
    worldloop rollout --preset default --schedule prompts.json --seconds 3600 --out hour.mp4  # random
    worldloop rollout --prompt "a dungeon" --first-frame photo.jpg --seconds 10 --out mine.mp4
    worldloop rollout --prompt "ice cave" --prompt-at 4s:"neon city" --seconds 6 --beside-engine --out vs.mp4

Keys come from a key script (``--keys FILE``: one line per frame as for ``worldloop world record``, e.g.
``30*w``, ``w+a``, ``none``; it must cover every frame) or, by default, from the rollout explorer: a
seeded, sticky, forward-biased random key policy (a model rollout has no map, so unlike the built-in
world's explorer it cannot steer around walls). Ctrl-C or SIGTERM stops the rollout and closes the video
cleanly; even a killed run leaves a playable file up to its last one-second fragment.

The rollout starts from the first frames of a fresh built-in world of the prompt's theme, seeded by
``--seed`` (``--start world``, the default), from a picture (``--first-frame IMAGE``, fitted to the model's
frame size) or from the prompt alone (``--start prompt``); the video holds the model's frames only, or with
``--beside-engine`` (world starts only) [engine | model] side by side: the built-in world that gave the first
frames keeps running under the same keys, re-themed (same maze, same pose) when a prompt switch names a theme.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from worldloop.app.beside import EngineBeside, side_by_side_width
from worldloop.app.commands.world import read_key_script
from worldloop.app.errors import UserError, user_input
from worldloop.app.loading import add_model_options, choose_model, load_model
from worldloop.app.rollout import (
    ProgressFn,
    RolloutPlan,
    RolloutResult,
    build_schedule,
    explorer_keys,
    frames_for,
    rollout,
    scripted_keys,
    sidecar,
    sidecar_path,
    write_sidecar,
)
from worldloop.app.starts import WorldStart, add_start_options, starts_from_args
from worldloop.streaming.session import StartFrames, Starts


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("rollout", help="roll the model out offline into an MP4 video",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    p.add_argument("--seed", type=int, default=0, help="seed: same seed, prompts and keys → same video")
    p.add_argument("--prompt", help="the prompt from frame 0")
    p.add_argument("--prompt-at", action="append", default=[], metavar="FRAME:PROMPT",
                   help='switch the prompt at a frame (600:"neon city") or second (20s:...); repeatable')
    p.add_argument("--schedule", type=Path, metavar="FILE",
                   help='prompt schedule as JSON: [{"frame": 0, "prompt": "..."}, ...]')
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--keys", type=Path, metavar="FILE", help="key script (as `worldloop world record`)")
    keys.add_argument("--explorer", action="store_true", help="the seeded random key policy (the default)")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--frames", type=int, help="number of frames")
    length.add_argument("--seconds", type=float, help="length in seconds of video")
    p.add_argument("--fps", type=int, help="video frame rate (default: the model's)")
    p.add_argument("--scale", type=int, default=1, help="enlarge frames by pixel repetition (default: 1)")
    p.add_argument("--crf", type=int, default=18, help="H.264 quality, 0 (lossless) … 51 (default: 18)")
    p.add_argument("--out", type=Path, default=Path("rollout.mp4"), help="video file (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing --out video and its sidecar")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_start_options(p, what="the rollout")
    p.add_argument("--beside-engine", action="store_true",
                   help="every video frame is [engine | model]: the built-in world the rollout started from "
                        "keeps running under the same keys (needs a world start)")
    p.set_defaults(func=run)


def _check_output(path: Path, force: bool) -> None:
    """Fail before loading anything if the video cannot be written, or would replace one without --force."""
    if path.suffix.lower() != ".mp4":
        raise UserError(f"--out must end in .mp4, got {path}")
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(f"--out {path} is a directory")
    if not force and (path.exists() or sidecar_path(path).exists()):
        raise UserError(f"{path} exists; pass --force to replace it")
    if not parent.is_dir():
        raise UserError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"cannot write {path}: permission denied")


def _check_numbers(args: argparse.Namespace) -> None:
    for name, lo, hi in (("steps", 1, 8), ("fps", 1, 240), ("scale", 1, 16), ("crf", 0, 51)):
        value = getattr(args, name)
        if value is not None and not lo <= value <= hi:
            raise UserError(f"--{name} must be in {lo}..{hi}, got {value}")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must be in 0..{2**32 - 1}, got {args.seed}")


@contextmanager
def _sigterm_stops(stopped: list[bool]) -> Iterator[None]:
    """SIGTERM sets ``stopped[0]``: the rollout ends before its next frame and the video is closed."""
    def stop(signum: int, frame: object) -> None:
        stopped[0] = True

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _progress(total: int, quiet: bool) -> tuple[ProgressFn, Callable[[], None]]:
    """A progress bar whose rate is the rollout's FPS: (per-frame callback, close)."""
    bar = tqdm(total=total, unit="frame", desc="rollout", disable=quiet, dynamic_ncols=True, smoothing=0.1)

    def update(index: int, result: RolloutResult) -> None:
        bar.update(1)

    return update, bar.close


def run(args: argparse.Namespace) -> int:
    from worldloop.streaming.recording import Mp4Recorder

    with user_input():  # every option, schedule and script is checked before the model loads
        _check_numbers(args)
        _check_output(args.out, args.force)
        choice = choose_model(args.model, args.preset, fallback=False)
        fps = args.fps or choice.config.fps
        frames = frames_for(args.seconds, args.frames, fps)
        schedule = build_schedule(args.prompt, args.prompt_at, args.schedule, fps, frames)
        if args.keys:
            keys, source = scripted_keys(read_key_script(args.keys), frames), f"script {args.keys}"
        else:
            keys, source = explorer_keys(args.seed, fps), f"explorer (seed {args.seed})"
        starts = starts_from_args(args, choice.config)
        engine = None
        if args.beside_engine:
            start, engine = _engine_start(starts, schedule.first, args.seed)
        else:
            start = starts.frames(starts.default, schedule.first, args.seed, starts.picture)
        plan = RolloutPlan(args.seed, frames, fps, schedule, source, starts.default, start,
                           None if args.first_frame is None else str(args.first_frame), engine)
    if choice.warning():
        print(choice.warning(), file=sys.stderr, flush=True)

    model = load_model(choice, device=args.device, steps=args.steps, max_sessions=1, backend=args.backend)
    height, width = model.frame_shape
    about = {"name": model.config.name, "source": choice.source, "trained": choice.trained,
             "steps": model.steps, "height": height, "width": width, "scale": args.scale}
    if engine is not None:
        width = side_by_side_width(width)
    recorder = Mp4Recorder(args.out, width * args.scale, height * args.scale, fps, crf=args.crf)
    write_sidecar(args.out, sidecar(plan, RolloutResult(), about))  # a killed run still leaves its plan
    update, close_bar = _progress(frames, args.quiet)
    status = 0
    try:
        stopped = [False]
        with _sigterm_stops(stopped):
            try:
                result = rollout(model, plan, keys, recorder, scale=args.scale, on_frame=update,
                                 stop=lambda: stopped[0])
                status = 130 if stopped[0] and not result.completed else 0
            except KeyboardInterrupt as err:
                result, status = getattr(err, "rollout_result", RolloutResult()), 130
    finally:
        close_bar()
        recorder.close()
    write_sidecar(args.out, sidecar(plan, result, about))
    _report(args.out, result, frames)
    return status


def _engine_start(starts: Starts, prompt: str, seed: int) -> tuple[StartFrames, EngineBeside]:
    """``--beside-engine``: the world start and the engine that continues from it; one-line errors for the
    starts that have no engine (a picture, the prompt alone)."""
    if starts.default == "picture":
        raise UserError("--beside-engine needs a world start: a picture (--first-frame) has no engine to "
                        "run beside the model")
    if starts.default != "world" or not isinstance(starts.world, WorldStart):
        raise UserError("--beside-engine needs a world start: drop --start prompt (the prompt alone has no "
                        "engine to run beside the model)")
    return EngineBeside.start(starts.world, prompt, seed)


def _report(out: Path, result: RolloutResult, requested: int) -> None:
    t = result.timings()
    state = "wrote" if result.completed else f"interrupted after {result.frames} of {requested} frames; wrote"
    print(f"worldloop rollout: {state} {out} ({result.frames} frames in {t['wall_seconds']:.1f} s, "
          f"{t['fps']} FPS, model {t['model_ms_per_frame']} ms/frame) and {sidecar_path(out)}",
          file=sys.stderr)
