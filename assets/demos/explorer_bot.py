"""An example bot: it explores a worldloop world by holding keys, and saves what it saw.

    worldloop serve --preset tiny &                      # or any model: worldloop serve --model DIR
    python assets/demos/explorer_bot.py --seconds 20 --out runs/explorer.mp4
    python assets/demos/explorer_bot.py --out runs/explorer_frames/   # PNGs instead of a video

The policy is deliberately simple and reads only pixels: walk forward; when the middle of the view has
little contrast (most likely a wall filling the view) or the view stops changing (stuck), turn in a random
direction for a few frames; now and then turn anyway, to see more of the world. It is written against the
Python client (``streaming.client.SyncClient``), the way a game bot or an evaluation script would be.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from worldloop.streaming.client import SyncClient
from worldloop.streaming.recording import Mp4Recorder


class Explorer:
    """Decides the held keys from the latest frame."""

    def __init__(self, rng: random.Random, *, wall_contrast: float = 12.0, still_change: float = 1.5,
                 still_frames: int = 15, wander: float = 0.02) -> None:
        self.rng = rng
        self.wall_contrast = wall_contrast  # std of grey levels in the centre below which we call it a wall
        self.still_change = still_change  # mean absolute change per pixel below which the view is "still"
        self.still_frames = still_frames
        self.wander = wander  # chance per frame of a turn without a reason
        self.turning = 0  # frames of turning left
        self.turn_keys = "turn_left"
        self.still = 0
        self.turns = 0
        self._previous: np.ndarray | None = None

    def decide(self, rgb: np.ndarray) -> str:
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
        h, w = grey.shape
        centre = grey[h // 3: 2 * h // 3, w // 3: 2 * w // 3]
        change = float(np.abs(grey - self._previous).mean()) if self._previous is not None else 255.0
        self._previous = grey
        self.still = self.still + 1 if change < self.still_change else 0
        if self.turning:
            self.turning -= 1
            return self.turn_keys
        blocked = float(centre.std()) < self.wall_contrast or self.still >= self.still_frames
        if blocked or self.rng.random() < self.wander:
            self.turning = self.rng.randint(6, 15)
            self.turn_keys = self.rng.choice(["turn_left", "turn_right"])
            self.still = 0
            self.turns += 1
            return self.turn_keys
        return "forward"


class FrameSaver:
    """Frames to an MP4 (``*.mp4``) or to numbered PNGs in a folder (anything else)."""

    def __init__(self, out: Path, fps: int) -> None:
        self.out, self.fps = out, fps
        self.count = 0
        self._video: Mp4Recorder | None = None
        if out.suffix != ".mp4":
            out.mkdir(parents=True, exist_ok=True)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)

    def save(self, rgb: np.ndarray) -> None:
        if self.out.suffix == ".mp4":
            if self._video is None:
                self._video = Mp4Recorder(self.out, rgb.shape[1], rgb.shape[0], self.fps)
            self._video.write(rgb)
        else:
            cv2.imwrite(str(self.out / f"frame_{self.count:05d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.count += 1

    def close(self) -> None:
        if self._video is not None:
            self._video.close()


def explore(args: argparse.Namespace) -> int:
    explorer = Explorer(random.Random(args.rng_seed))
    saver = FrameSaver(args.out, args.fps)
    held = None
    with SyncClient(args.url, token=args.token) as client:
        ready = client.start(args.prompt, seed=args.seed, fps=args.fps)
        print(f"exploring {ready.model!r} ({ready.width}x{ready.height}, {ready.fps} FPS), {args.seconds} s")
        started = time.monotonic()
        try:
            while time.monotonic() - started < args.seconds:
                frame = client.latest_frame(timeout=10)
                saver.save(frame.image)
                keys = explorer.decide(frame.image)
                if keys != held:
                    client.set_keys(keys)
                    held = keys
        finally:
            saver.close()
    elapsed = time.monotonic() - started
    print(f"saw {saver.count} frames ({saver.count / elapsed:.1f} per second), turned {explorer.turns} "
          f"times; saved to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="ws://127.0.0.1:8765/ws", help="the server's websocket")
    parser.add_argument("--token", default=os.environ.get("WORLDLOOP_TOKEN"),
                        help="default: $WORLDLOOP_TOKEN")
    parser.add_argument("--prompt", default="a dark stone dungeon with torch-lit brick walls")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed")
    parser.add_argument("--rng-seed", type=int, default=0, help="the bot's own randomness")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--fps", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("runs/explorer.mp4"),
                        help="an .mp4 file or a folder")
    args = parser.parse_args(argv)
    try:
        return explore(args)
    except (OSError, TimeoutError) as err:
        print(f"explorer_bot: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
