"""Where the app's sessions start: frames of a fresh built-in world for the prompt's theme, a user's picture,
or the prompt alone.

Playable world models start from a real frame; a first frame drawn from a prompt alone is unconditional image
generation, far harder for a small model. So ``play``, ``serve``, ``gradio`` and ``rollout`` start every
session from a few frames of a fresh built-in world (``WorldStart``), seeded by the session's seed, of the
theme the prompt names (or one the seed picks when it names none), rendered at the model's frame size: the
camera stands on a random open tile facing open space, and the scripted explorer walks the first frames, as
in the training clips. ``--start prompt`` gives the old prompt-only start; ``--first-frame IMAGE`` starts
from a picture (``models/images.py`` fits it to the frame size).

The streaming layer never imports the built-in world: the app injects ``WorldStart`` into the engine as a
``streaming.session.Starts``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from worldloop.app.errors import UserError
from worldloop.models.config import ModelConfig
from worldloop.streaming.session import START_FROM, StartFrames, Starts

if TYPE_CHECKING:
    import torch

    from worldloop.distill.world.engine import World


START_MOTION_FRAMES = 2  # world frames after the sink: enough to show the model the motion


def context_frames(config: ModelConfig) -> int:
    """How many world frames a session starts from: the sink and a couple more, within the window.

    Measured on the default model (sink 1, window 8; CPU time, one thread, assets/default): time to the
    first frame 64 ms from the prompt alone, 110 / 139 / 209 ms from 1 / 3 / 9 world frames — rendering the
    fresh world is ~70–115 ms of it. Three frames give the model the start's motion at two thirds of the cost
    of a full window.
    """
    return min(config.dit.sink + START_MOTION_FRAMES, config.dit.sink + config.dit.window)


def prompt_theme(prompt: str) -> str | None:
    """The built-in world's theme a prompt names first (None when it names none)."""
    from worldloop.distill.world.themes import THEMES

    text = prompt.lower()
    found = [(text.find(t), t) for t in THEMES if t in text]
    return min(found)[1] if found else None


class WorldStart:
    """``(prompt, seed) → StartFrames``: the first ``frames`` frames of a fresh built-in world (a pure
    function of the prompt's theme and the seed), rendered on ``device`` at ``height``×``width``."""

    def __init__(self, height: int, width: int, frames: int, device: torch.device | str = "cpu") -> None:
        from worldloop.distill.data.clips import render_scale

        if frames < 1:
            raise ValueError(f"a world start needs at least one frame, got {frames}")
        self.scale = render_scale(height, width)  # ValueError for sizes the engine cannot render
        self.height, self.width, self.frames, self.device = height, width, frames, device

    def __call__(self, prompt: str, seed: int) -> StartFrames:
        return self.begin(prompt, seed)[0]

    def begin(self, prompt: str, seed: int) -> tuple[StartFrames, World]:
        """The start frames and the world that rendered them, left at the last one's pose (rendered at
        ``self.scale`` times the frame size), so it can keep running under the rollout's keys."""
        import torch

        from worldloop.distill.data.clips import downsample, open_headings, random_poses
        from worldloop.distill.world.engine import World
        from worldloop.distill.world.explorer import Explorer
        from worldloop.distill.world.themes import sample_params

        k = self.scale
        params = sample_params(seed, prompt_theme(prompt))
        world = World([params], self.height * k, self.width * k, self.device)
        g = torch.Generator().manual_seed(int(seed))
        world.set_poses(random_poses(world.grid.cpu(), g))
        world.set_poses(open_headings(world, g))
        explorer = Explorer(world.seeds)
        frames, keys = [world.render()], [0]  # the first frame is made with no keys, as in training clips
        poses = [world.poses[0].cpu()]
        for _ in range(self.frames - 1):
            held = explorer.act(world)
            frames.append(world.next_frame(held))
            keys.append(int(held[0]))
            poses.append(world.poses[0].cpu())
        video = downsample(torch.cat(frames), k).cpu().numpy()
        return StartFrames(video, tuple(keys), torch.stack(poses).numpy()), world


def add_start_options(parser: argparse.ArgumentParser, *, what: str = "every session") -> None:
    """``--start world|prompt`` and ``--first-frame IMAGE``."""
    parser.add_argument("--start", choices=[s for s in START_FROM if s != "picture"], default=None,
                        help=f"what {what} starts from: frames of a fresh built-in world of the prompt's "
                             "theme (default) or the prompt alone")
    parser.add_argument("--first-frame", type=Path, metavar="IMAGE",
                        help=f"start {what} from this picture (PNG, JPEG or WebP, at most 64 KiB; "
                             "centre-cropped and resized to the model's frame size)")


def load_picture(path: Path, height: int, width: int) -> np.ndarray:
    """``--first-frame IMAGE`` as uint8 (height, width, 3); UserError (one line) naming the file otherwise."""
    from worldloop.models.images import read_picture

    try:
        return read_picture(Path(path).read_bytes(), height, width)
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise UserError(f"--first-frame {path}: {reason}") from None


def starts_from_args(args: argparse.Namespace, config: ModelConfig, device: str = "cpu") -> Starts:
    """The ``Starts`` of a command line: the built-in world always available, the default from the options."""
    if args.start is not None and args.first_frame is not None:
        raise UserError("give either --start or --first-frame, not both")
    picture = None
    if args.first_frame is not None:
        picture = load_picture(args.first_frame, config.height, config.width)
    try:
        world = WorldStart(config.height, config.width, context_frames(config), device)
    except ValueError as err:
        raise UserError(f"cannot start from the built-in world: {err}; use --start prompt") from None
    default = "picture" if picture is not None else args.start or "world"
    return Starts(world, default, picture)
