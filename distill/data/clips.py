"""Training clips: rendered on the fly by the built-in world, or read from recorded episode folders.

A ``ClipBatch`` is B clips of F consecutive frames with the keys that produced them: ``keys[:, i]`` is the
key state held while the world moved from frame i − 1 to frame i (what ``WorldModel.next_frame(keys)`` is
given to produce a frame), ``keys[:, 0]`` the one that led to the first frame.

Both sources are deterministic functions of ``(seed, rank, step)``: ``batch(step, size)`` always returns the
same clips, so a resumed run sees exactly the data the uninterrupted run would have seen, and no iterator
state needs saving.

``WorldClips``: each clip is a fresh world (random maze, theme and jitter from its seed; the prompt is the
world's ``describe()``) whose camera starts at a random empty tile facing a random way, driven by the
scripted explorer (optionally with random keys mixed in) and rendered on the training device. Training
seeds lie below ``HELD_OUT_SEED_START``; evaluation uses seeds from there on (``held_out=True``). Frames
smaller than the engine's minimum (64 px) are rendered at an integer multiple and area-downsampled.

With ``switch_at`` > 0, every ``WorldClips`` clip switches prompt at that frame: from it on, the frames are
the same maze at the same camera poses rendered in another theme (the layout parameters are kept, the look
is the other theme's), and the batch carries the new prompts. That is the engine's truth for "the player
typed a new prompt here".

``EpisodeClips``: random windows of the episodes under a folder, read once with ``read_episode`` (what
``worldloop world record`` writes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from worldloop.distill.data.episodes import EpisodeError, read_episode
from worldloop.distill.world.engine import World
from worldloop.distill.world.explorer import Explorer
from worldloop.distill.world.hashing import hash32
from worldloop.distill.world.themes import THEMES, theme_from_prompt
from worldloop.models.keys import KEYS

HELD_OUT_SEED_START = 1 << 30  # training worlds use seeds below this, evaluation worlds from here on
UNKNOWN_THEME = -100  # a clip whose prompt names no theme (ignored by the classifier's cross-entropy)
MIN_RENDER, MAX_RENDER = 64, 256  # the engine's frame size limits
_AXES = tuple((KEYS.index(a), KEYS.index(b)) for a, b in
              (("forward", "back"), ("left", "right"), ("turn_left", "turn_right")))


@dataclass
class ClipBatch:
    frames: torch.Tensor  # uint8 (B, F, H, W, 3)
    keys: torch.Tensor  # long (B, F) key bitmasks; keys[:, i] produced frame i
    prompts: list[str]  # (B,) one prompt per clip
    themes: torch.Tensor  # long (B,) index into distill.world.themes.THEMES
    poses: torch.Tensor | None = None  # float (B, F, 3) camera x, y (tiles), heading (radians) per frame
    depths: torch.Tensor | None = None  # float (B, F, D) wall distance through D screen columns per frame
    switch_at: int = 0  # > 0: frames from this index on show the world in switch_themes under switch_prompts
    switch_prompts: list[str] | None = None
    switch_themes: torch.Tensor | None = None  # long (B,)
    sky: torch.Tensor | None = None  # bool (B,): the sky above the walls, not a ceiling (with ``depths``)

    def to(self, device: torch.device) -> ClipBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return ClipBatch(self.frames.to(device), self.keys.to(device), self.prompts, self.themes.to(device),
                         move(self.poses), move(self.depths), self.switch_at, self.switch_prompts,
                         move(self.switch_themes), move(self.sky))


class ClipSource(Protocol):
    height: int
    width: int
    frames: int

    def batch(self, step: int, size: int) -> ClipBatch: ...


def render_scale(height: int, width: int) -> int:
    """The integer factor at which frames of this size are rendered (1 unless smaller than 64 px)."""
    k = max(1, math.ceil(MIN_RENDER / min(height, width)))
    if max(height, width) * k > MAX_RENDER or (height * k) % 2 or (width * k) % 2:
        raise ValueError(f"the built-in world cannot render {height}x{width} frames "
                         f"(sizes {MIN_RENDER}–{MAX_RENDER}, even, or an integer fraction of that)")
    return k


def downsample(frames: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 (N, kH, kW, 3) → (N, H, W, 3) by k×k averaging (rounded)."""
    if k == 1:
        return frames
    x = F.avg_pool2d(frames.permute(0, 3, 1, 2).float(), k)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class WorldClips:
    """Clips of fresh built-in worlds, generated on ``device``; see the module docstring."""

    def __init__(self, height: int, width: int, frames: int, device: torch.device | str = "cpu", *,
                 seed: int = 0, rank: int = 0, held_out: bool = False, random_keys: float = 0.0,
                 key_hold: int = 1, depth_columns: int = 0, switch_at: int = 0, still: float = 0.0) -> None:
        if frames < 1:
            raise ValueError(f"clips need at least one frame, got {frames}")
        if not 0 <= switch_at < frames:
            raise ValueError(f"switch_at must be in 0..{frames - 1} (0: no switch), got {switch_at}")
        if not 0.0 <= random_keys <= 1.0:
            raise ValueError(f"random_keys must be a probability, got {random_keys}")
        if key_hold < 1:
            raise ValueError(f"key_hold must be at least 1, got {key_hold}")
        if not 0.0 <= still <= 1.0:
            raise ValueError(f"still must be a probability, got {still}")
        self.scale = render_scale(height, width)
        self.height, self.width, self.frames = height, width, frames
        self.device = torch.device(device)
        self.seed, self.rank, self.held_out = seed, rank, held_out
        self.random_keys, self.key_hold = random_keys, key_hold
        self.still = still  # share of the random key states that hold no key (the camera stands still)
        self.depth_columns = depth_columns  # > 0: clips carry per-column depths (auxiliary targets)
        self.switch_at = switch_at

    def seeds(self, step: int, size: int) -> torch.Tensor:
        """World seeds of a step's clips (B,): hashed below HELD_OUT_SEED_START, or consecutive held-out."""
        index = torch.arange(size, dtype=torch.long)
        if self.held_out:
            return HELD_OUT_SEED_START + self.seed * 1_000_000 + step * size + index
        return hash32(torch.tensor(self.seed), self.rank, step, index) % HELD_OUT_SEED_START

    def batch(self, step: int, size: int) -> ClipBatch:
        seeds = self.seeds(step, size)
        world = World(seeds.tolist(), self.height * self.scale, self.width * self.scale, self.device)
        g = torch.Generator().manual_seed(int(hash32(torch.tensor(self.seed), self.rank, step, 7)))
        world.set_poses(random_poses(world.grid.cpu(), g))
        world.set_poses(open_headings(world, g))
        explorer = Explorer(world.seeds)
        keys = torch.zeros(size, dtype=torch.long, device=self.device)
        other = None
        if self.switch_at:  # its own random numbers: the frames before the switch are the unswitched clip's
            other = self._switched_world(world, torch.Generator().manual_seed(
                int(hash32(torch.tensor(self.seed), self.rank, step, 11))))
        frames, clip_keys = [world.render()], [keys]
        poses, depths = [], []
        held, left = torch.zeros(size, dtype=torch.long), torch.zeros(size, dtype=torch.long)
        for i in range(self.frames):
            poses.append(world.poses.float())
            if self.depth_columns:
                depths.append(world.column_depths(self.depth_columns).float())
            if i == self.frames - 1:
                break
            keys, held, left = self._perturb(explorer.act(world), held, left, g)
            frame = world.next_frame(keys)
            if other is not None and i + 1 >= self.switch_at:
                other.set_poses(world.poses)
                frame = other.render()
            frames.append(frame)
            clip_keys.append(keys)
        video = downsample(torch.stack(frames, 1).flatten(0, 1), self.scale)

        def theme_indices(w: World) -> torch.Tensor:
            return torch.tensor([THEMES.index(p.theme) for p in w.params], device=self.device)

        return ClipBatch(video.view(size, self.frames, self.height, self.width, 3), torch.stack(clip_keys, 1),
                         list(world.prompts), theme_indices(world), torch.stack(poses, 1) if poses else None,
                         torch.stack(depths, 1) if depths else None, self.switch_at,
                         None if other is None else list(other.prompts),
                         None if other is None else theme_indices(other),
                         torch.tensor([p.has_sky for p in world.params], device=self.device)
                         if self.depth_columns else None)

    def _switched_world(self, world: World, g: torch.Generator) -> World:
        """The same mazes in other themes: each world's layout, a random other theme's look."""
        themes = []
        for p in world.params:
            hop = 1 + int(torch.randint(len(THEMES) - 1, (1,), generator=g))
            themes.append(THEMES[(THEMES.index(p.theme) + hop) % len(THEMES)])
        return world.rethemed(themes)

    def _perturb(self, keys: torch.Tensor, held: torch.Tensor, left: torch.Tensor, g: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per clip and frame, with probability ``random_keys`` start holding a random key state for 1 to
        ``key_hold`` frames (uniform); while one is held it replaces the explorer's keys. ``held``/``left``
        (B,) carry the held state and frames left between calls; returns (keys, held, left)."""
        if self.random_keys == 0.0:
            return keys, held, left
        n = keys.shape[0]
        start = (torch.rand(n, generator=g) < self.random_keys) & (left == 0)
        fresh = sample_keys(n, g)
        if self.still > 0:
            fresh = torch.where(torch.rand(n, generator=g) < self.still, 0, fresh)
        held = torch.where(start, fresh, held)
        left = torch.where(start, torch.randint(1, self.key_hold + 1, (n,), generator=g), left)
        use = (left > 0).to(keys.device)
        return torch.where(use, held.to(keys.device), keys), held, (left - 1).clamp_min(0)


def sample_keys(n: int, g: torch.Generator) -> torch.Tensor:
    """n random key states without opposing pairs: per axis (forward/back, strafe, turn) none or one key.

    Opposing keys cancel in the engine, so including them would make keys unobservable from the frames.
    """
    choice = torch.randint(0, 3, (n, 3), generator=g)  # 0 none, 1 the first key of the axis, 2 the second
    bits = torch.zeros(n, dtype=torch.long)
    for axis, (a, b) in enumerate(_AXES):
        bits |= torch.where(choice[:, axis] == 1, 1 << a, 0) | torch.where(choice[:, axis] == 2, 1 << b, 0)
    return bits


def random_poses(grid: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A pose (x, y, angle 0) per world at the centre of a random empty tile of ``grid`` (B, G, G)."""
    size = grid.shape[-1]
    tile = torch.multinomial((grid == 0).flatten(1).float(), 1, generator=g)[:, 0]
    return torch.stack([(tile % size).float() + 0.5, (tile // size).float() + 0.5, torch.zeros(len(tile))], 1)


def open_headings(world: World, g: torch.Generator, directions: int = 16, room: float = 2.0) -> torch.Tensor:
    """The worlds' poses turned to a random direction with at least ``room`` tiles of free view (or the most
    open one), so clips do not start face to face with a wall."""
    offsets = torch.arange(directions) * (2 * math.pi / directions)
    dist = world.probe(offsets).cpu()  # (B, directions)
    best = dist == dist.max(1, keepdim=True).values
    weight = (dist >= min(room, float(dist.max()))).float() + 1e-6 * best
    pick = torch.multinomial(weight, 1, generator=g)[:, 0]
    jitter = (torch.rand(len(pick), generator=g) - 0.5) * (2 * math.pi / directions)
    poses = world.poses.cpu()
    poses[:, 2] = poses[:, 2] + offsets[pick] + jitter
    return poses


class ClipPool:
    """Renders clips once and reuses them: random windows of a pool whose chunks are replaced in turn.

    For the CPU, where rendering costs more than a training step. The pool holds ``clips`` clips of
    ``source.frames`` frames in chunks of ``chunk``; every ``refresh_every`` steps one chunk is replaced by
    newly rendered worlds (round robin). Which worlds a chunk holds at step n is a pure function of n, so
    ``batch(step, size)`` stays deterministic across resumes (a resumed run re-renders its pool).
    """

    def __init__(self, source: WorldClips, clips: int, frames: int, *, chunk: int = 32,
                 refresh_every: int = 25, seed: int = 0, rank: int = 0) -> None:
        if not 1 <= frames <= source.frames:
            raise ValueError(f"pool windows of {frames} frames do not fit clips of {source.frames}")
        self.source, self.frames = source, frames
        self.height, self.width = source.height, source.width
        self.chunk = min(chunk, clips)
        self.chunks = max(1, clips // self.chunk)
        self.refresh_every, self.seed, self.rank = refresh_every, seed, rank
        self._data: list[ClipBatch | None] = [None] * self.chunks
        self._generation = [-1] * self.chunks

    def generation(self, chunk: int, step: int) -> int:
        """How often chunk ``chunk`` has been replaced by ``step`` (refresh e replaces chunk e mod chunks)."""
        done = step // self.refresh_every if self.refresh_every > 0 else 0
        return max(0, (done - chunk + self.chunks - 1) // self.chunks)

    def _chunk(self, j: int, step: int) -> ClipBatch:
        g = self.generation(j, step)
        if self._generation[j] != g:
            self._data[j] = self.source.batch(g * self.chunks + j, self.chunk)
            self._generation[j] = g
        data = self._data[j]
        assert data is not None
        return data

    def batch(self, step: int, size: int) -> ClipBatch:
        pool = [self._chunk(j, step) for j in range(self.chunks)]
        g = torch.Generator().manual_seed(int(hash32(torch.tensor(self.seed), self.rank, step, 11)))
        picks = torch.randint(0, self.chunks * self.chunk, (size,), generator=g).tolist()
        starts = torch.randint(0, self.source.frames - self.frames + 1, (size,), generator=g).tolist()
        out = [(pool[i // self.chunk], i % self.chunk, slice(s, s + self.frames))
               for i, s in zip(picks, starts, strict=True)]

        def windows(field: str) -> torch.Tensor | None:
            if getattr(out[0][0], field) is None:
                return None
            return torch.stack([getattr(c, field)[i, w] for c, i, w in out])

        frames, keys = windows("frames"), windows("keys")
        assert frames is not None and keys is not None
        sky = None if out[0][0].sky is None else torch.stack([c.sky[i] for c, i, _ in out])
        return ClipBatch(frames, keys, [c.prompts[i] for c, i, _ in out],
                         torch.stack([c.themes[i] for c, i, _ in out]), windows("poses"), windows("depths"),
                         sky=sky)


class EpisodeClips:
    """Random windows of recorded episodes (``distill.episodes``): a folder that is an episode, or a folder
    with episodes anywhere below it. Frames are decoded once into memory (the exact ``frames.npy`` when
    present) and resized to the model's frame size if they differ; a window's prompt is the one in force at
    its first frame, its theme the one the prompt names (``UNKNOWN_THEME`` if none)."""

    def __init__(self, root: Path, height: int, width: int, frames: int, *, seed: int = 0,
                 rank: int = 0) -> None:
        self.height, self.width, self.frames, self.seed, self.rank = height, width, frames, seed, rank
        folders = [root] if (root / "meta.json").is_file() else sorted(
            p.parent for p in root.rglob("meta.json") if not any(part.startswith(".") for part in p.parts))
        if not folders:
            raise EpisodeError(f"{root}: no episode folders (a folder with meta.json, video.mp4, keys.json, "
                             f"prompts.json) found")
        self.episodes = [read_episode(f) for f in folders]  # one-line errors naming the bad file
        self.videos = [resize_frames(torch.from_numpy(e.load_frames()), height, width) for e in self.episodes]
        self.windows = torch.tensor([max(0, e.n_frames - frames + 1) for e in self.episodes],
                                    dtype=torch.float)
        if self.windows.sum() == 0:
            raise EpisodeError(f"{root}: every episode is shorter than a clip of {frames} frames")

    def batch(self, step: int, size: int) -> ClipBatch:
        g = torch.Generator().manual_seed(int(hash32(torch.tensor(self.seed), self.rank, step, 13)))
        picks = torch.multinomial(self.windows, size, replacement=True, generator=g).tolist()
        clips, keys, prompts, themes = [], [], [], []
        for i in picks:
            start = int(torch.randint(0, int(self.windows[i]), (1,), generator=g))
            episode = self.episodes[i]
            clips.append(self.videos[i][start: start + self.frames])
            keys.append(torch.from_numpy(episode.keys[start: start + self.frames]))
            prompts.append(episode.prompt_at(start))
            themes.append(theme_index(prompts[-1]))
        return ClipBatch(torch.stack(clips), torch.stack(keys).long(), prompts, torch.tensor(themes))


def theme_index(prompt: str) -> int:
    """The index in THEMES of the theme a prompt names, or UNKNOWN_THEME."""
    try:
        return THEMES.index(theme_from_prompt(prompt))
    except ValueError:
        return UNKNOWN_THEME


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (T, h, w, 3) → (T, height, width, 3): area-averaged when shrinking, bilinear otherwise."""
    if frames.shape[1:3] == (height, width):
        return frames
    x = frames.permute(0, 3, 1, 2).float()
    shrink = height <= frames.shape[1] and width <= frames.shape[2]
    x = F.interpolate(x, (height, width), mode="area" if shrink else "bilinear", align_corners=None)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
