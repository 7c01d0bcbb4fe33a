"""Make the README's demo GIF: the model played with a fixed key tour beside the engine under the same keys.

    python scripts/demo_gif.py                       # assets/default → docs/demo.gif
    python scripts/demo_gif.py --model runs/x/model --out /tmp/demo.gif --seed 3 --prompt "an ice cave"

1. ``worldloop rollout --beside-engine`` (the one rollout loop) plays ``assets/demos/tour.keys`` (6 s: walk,
   turn, strafe, walk) from a world start, switching the prompt at 4.5 s, into a temporary MP4 at 2× scale
   and near-lossless quality; every frame is [engine | model]. The prompts default to the ones the model was
   trained on: the description of the start world (a dungeon for ``--seed``) and of the same maze in the
   neon city (``--then``).
2. The MP4 is decoded with PyAV, thinned to ``--gif-fps`` (15: every second frame of a 30 FPS model), given a
   caption row ("engine" | "model: <theme>") and written as a GIF with Pillow: at 2× with 256 colours a frame,
   else at 2× with 128, else at 1×, the first that stays under ``--max-mb`` (3 MB). Pillow's max-coverage
   quantizer: on the shipped model's tour it kept 43–47 dB against the video where median cut kept 42 dB at a
   larger file, and the fast octree banded the model's smooth frames (~47 colours).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from worldloop.app.beside import world_prompts
from worldloop.app.cli import main as worldloop
from worldloop.app.commands.world import read_key_script
from worldloop.app.starts import prompt_theme

REPO = Path(__file__).resolve().parent.parent
TOUR = REPO / "assets" / "demos" / "tour.keys"
TOUR_SEED = 243  # of seeds 0–299, one whose dungeon the tour walks along corridors (13 of 180 frames bump)
SWITCH_SECONDS = 4.5  # the prompt switch, near the end of the 6 s tour
VIDEO_SCALE = 2  # the rollout's --scale: 2×2 pixel blocks keep H.264's half-resolution colour exact
DEFAULT_THEMES = ("dungeon", "neon city")  # the start world's theme and the one the prompt switches to
ATTEMPTS = ((2, 256), (2, 128), (1, 256))  # (scale, colours per frame), best first
CAPTION = 12  # caption row height at 1× (the default bitmap font is 11 px tall)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model directory (default: assets/default)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "demo.gif",
                   help="GIF file (default: docs/demo.gif)")
    p.add_argument("--seed", type=int, default=TOUR_SEED,
                   help="world and sampling seed (default: %(default)s)")
    p.add_argument("--prompt", help="the first prompt (default: the description of the seed's dungeon)")
    p.add_argument("--then", help="the prompt from 4.5 s on (default: the maze's description as a neon city)")
    p.add_argument("--keys", type=Path, default=TOUR, help="key script (default: assets/demos/tour.keys)")
    p.add_argument("--gif-fps", type=int, default=15, help="GIF frame rate (default: %(default)s)")
    p.add_argument("--max-mb", type=float, default=3.0, help="largest GIF kept at 2× (default: %(default)s)")
    return p.parse_args(argv)


def roll_out(args: argparse.Namespace, video: Path) -> None:
    """The beside-engine rollout of the tour into ``video`` (worldloop rollout, in this process)."""
    frames = sum(n for n, _ in read_key_script(args.keys))
    switch = f"{SWITCH_SECONDS}s:{args.then}"
    argv = ["rollout", "--beside-engine", "--keys", str(args.keys), "--frames", str(frames),
            "--seed", str(args.seed), "--prompt", args.prompt, "--prompt-at", switch,
            "--scale", str(VIDEO_SCALE), "--crf", "4", "--quiet", "--device", "cpu", "--out", str(video)]
    if args.model is not None:
        argv += ["--model", str(args.model)]
    status = worldloop(argv)
    if status != 0:
        raise SystemExit(status)


def read_video(video: Path, gif_fps: int) -> tuple[list[np.ndarray], int, int]:
    """Every ``stride``-th frame of the video (about ``gif_fps`` a second), the video's FPS and the stride."""
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        fps = round(float(stream.average_rate or stream.guessed_rate))
        stride = max(1, round(fps / gif_fps))
        frames = [f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(stream))
                  if i % stride == 0]
    return frames, fps, stride


def captioned(frame: np.ndarray, labels: tuple[str, str], scale: int) -> Image.Image:
    """A side-by-side frame of the video (at VIDEO_SCALE) at ``scale``× (1 or 2) under a caption row naming
    each panel."""
    step = VIDEO_SCALE // scale
    frame = frame[::step, ::step]
    height, width = frame.shape[:2]
    row = CAPTION * scale
    canvas = Image.new("RGB", (width, height + row), (16, 16, 16))
    canvas.paste(Image.fromarray(frame), (0, row))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=10 * scale)
    for i, text in enumerate(labels):  # centred over each half
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x = (2 * i + 1) * width // 4 - (right - left) // 2
        draw.text((x, (row - (bottom - top)) // 2 - top), text, fill=(235, 235, 235), font=font)
    return canvas


def durations(count: int, seconds: float) -> list[int]:
    """Per-frame GIF delays in ms on GIF's 10 ms grid, rounded cumulatively: the rate is exact on average."""
    ticks = [round(i * seconds * 100) for i in range(count + 1)]
    return [10 * (b - a) for a, b in zip(ticks, ticks[1:], strict=False)]


def write_gif(path: Path, images: list[Image.Image], delays: list[int], colours: int) -> None:
    paletted = [im.quantize(colors=colours, method=Image.Quantize.MAXCOVERAGE, dither=Image.Dither.NONE)
                for im in images]
    paletted[0].save(path, save_all=True, append_images=paletted[1:], duration=delays, loop=0, optimize=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    first, then = world_prompts(args.seed, DEFAULT_THEMES)
    args.prompt, args.then = args.prompt or first, args.then or then
    if args.out.suffix.lower() != ".gif":
        print(f"demo_gif: --out must end in .gif, got {args.out}", file=sys.stderr)
        return 2
    if not 1 <= args.gif_fps <= 50:
        print(f"demo_gif: --gif-fps must be in 1..50, got {args.gif_fps}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "demo.mp4"
        roll_out(args, video)
        frames, fps, stride = read_video(video, args.gif_fps)
    switch = round(SWITCH_SECONDS * fps)  # the video frame the prompt switches at (as --prompt-at 4.5s:)
    themes = [prompt_theme(args.prompt), prompt_theme(args.then)]
    labels = [("engine", f"model: {themes[i * stride >= switch] or 'no theme'}") for i in range(len(frames))]
    seconds = stride / fps  # per GIF frame
    delays = durations(len(frames), seconds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for scale, colours in ATTEMPTS:
        images = [captioned(f, lab, scale) for f, lab in zip(frames, labels, strict=True)]
        write_gif(args.out, images, delays, colours)
        size = args.out.stat().st_size
        if size <= args.max_mb * 1e6 or (scale, colours) == ATTEMPTS[-1]:
            break
        print(f"demo_gif: {size / 1e6:.2f} MB at {scale}× with {colours} colours is over {args.max_mb} MB",
              file=sys.stderr)
    width, height = Image.open(args.out).size
    print(f"demo_gif: wrote {args.out} ({len(frames)} frames, {width}×{height}, {1 / seconds:.1f} FPS, "
          f"{scale}×, {colours} colours, {size / 1e6:.2f} MB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
