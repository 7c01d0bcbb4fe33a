"""Offline rollouts: drive a ``WorldModel`` with a key script and a prompt schedule, streaming frames to MP4.

The video is H.264 in *fragmented* MP4 (``streaming.recording.Mp4Recorder``, the server's recorder: a fragment
per second of video, flushed as it is written), so an interrupted run — Ctrl-C, SIGTERM or even SIGKILL —
leaves a playable file of everything up to the last fragment. Frames go straight from the model to the
encoder, so memory stays constant however long the rollout. A JSON sidecar next to the video
(``walk.mp4.json`` for ``walk.mp4``) records the model, seed, prompt schedule, per-frame keys, fps, steps
and timings, and a SHA-256 over the raw frames, so two runs can be compared without decoding.

The rollout loop itself is ``WorldModel.next_frame``; this module only feeds it. Run it with
``worldloop rollout``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worldloop.app.beside import EngineBeside, layout, side_by_side
from worldloop.models.keys import KEYS, parse_keys
from worldloop.models.text import validate_prompt
from worldloop.streaming.session import FrameWriter, StartFrames, StartFrom, start_kwargs

if TYPE_CHECKING:
    from worldloop.models.world_model import WorldModel

# Key policy of the rollout explorer. A model rollout has no map to steer by, so unlike the world's scripted
# explorer it cannot avoid walls; it only produces plausible, varied, forward-biased play.
EXPLORER_ACTIONS: tuple[tuple[str, float], ...] = (
    ("forward", 0.45), ("forward+turn_left", 0.1), ("forward+turn_right", 0.1), ("turn_left", 0.09),
    ("turn_right", 0.09), ("none", 0.07), ("left", 0.04), ("right", 0.04), ("back", 0.02),
)
EXPLORER_HOLD_SECONDS = (0.3, 1.5)  # how long the explorer holds one key state


@dataclass(frozen=True)
class PromptSchedule:
    """Prompts by start frame: ``entries[0]`` starts at frame 0, later ones switch the prompt."""

    entries: tuple[tuple[int, str], ...]

    def __post_init__(self) -> None:
        if not self.entries or self.entries[0][0] != 0:
            raise ValueError("prompt schedule: the first prompt must start at frame 0 (use --prompt)")
        frames = [f for f, _ in self.entries]
        if len(set(frames)) != len(frames):
            raise ValueError("prompt schedule: two prompts start at the same frame")

    @property
    def first(self) -> str:
        return self.entries[0][1]

    def switches(self) -> dict[int, str]:
        """Frame → new prompt, for every entry after the first."""
        return dict(self.entries[1:])

    def to_json(self) -> list[dict[str, Any]]:
        return [{"frame": f, "prompt": p} for f, p in self.entries]


def parse_prompt_at(spec: str, fps: int) -> tuple[int, str]:
    """``"600:neon city"`` (frame 600) or ``"20s:neon city"`` (second 20) → (frame, prompt)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)(s?)\s*:(.*)", spec, flags=re.DOTALL)
    if not match:
        raise ValueError(f"bad --prompt-at {spec!r}: expected FRAME:PROMPT or SECONDSs:PROMPT, "
                         'e.g. 600:"neon city" or 20s:"neon city"')
    number, seconds, prompt = match.groups()
    if not seconds and "." in number:
        raise ValueError(f"bad --prompt-at {spec!r}: a frame must be a whole number (add 's' for seconds)")
    frame = round(float(number) * fps) if seconds else int(number)
    return frame, _checked_prompt(prompt, f"--prompt-at {spec!r}")


def load_schedule_file(path: Path) -> list[tuple[int, str]]:
    """A JSON list of ``{"frame": int, "prompt": str}`` (the episode ``prompts.json`` format)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of {{\"frame\": N, \"prompt\": \"...\"}}")
    entries = []
    for i, item in enumerate(data):
        if not (isinstance(item, dict) and set(item) == {"frame", "prompt"} and type(item["frame"]) is int
                and item["frame"] >= 0 and isinstance(item["prompt"], str)):
            raise ValueError(f'{path}: entry {i} must be {{"frame": N ≥ 0, "prompt": "..."}}, got {item!r}')
        entries.append((item["frame"], _checked_prompt(item["prompt"], f"{path} entry {i}")))
    return entries


def build_schedule(prompt: str | None, prompt_at: Iterable[str], schedule_file: Path | None, fps: int,
                   frames: int) -> PromptSchedule:
    """Merge ``--prompt``, ``--prompt-at`` and a schedule file; every switch must fall inside the rollout."""
    entries = load_schedule_file(schedule_file) if schedule_file else []
    if prompt is not None:
        if any(f == 0 for f, _ in entries):
            raise ValueError("--prompt and the schedule file both set the prompt at frame 0")
        entries.append((0, _checked_prompt(prompt, "--prompt")))
    entries += [parse_prompt_at(spec, fps) for spec in prompt_at]
    entries.sort(key=lambda e: e[0])
    late = [f for f, _ in entries if f >= frames]
    if late:
        raise ValueError(f"prompt schedule: frame {late[0]} is past the last frame ({frames - 1})")
    if not entries:
        raise ValueError("no prompt: pass --prompt TEXT (and --prompt-at FRAME:TEXT) or --schedule FILE")
    return PromptSchedule(tuple(entries))


def _checked_prompt(text: str, where: str) -> str:
    text = text.strip().strip('"').strip()
    if not text:
        raise ValueError(f"{where}: empty prompt")
    try:
        return validate_prompt(text)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def explorer_keys(seed: int, fps: int) -> Iterator[int]:
    """An endless, seeded, sticky and forward-biased key policy: each key state is held 0.3–1.5 s."""
    rng = np.random.default_rng([seed, 0x6B657973])  # its own stream, independent of the model's noise
    names, weights = zip(*EXPLORER_ACTIONS, strict=True)
    p = np.asarray(weights) / sum(weights)
    masks = [parse_keys(n) for n in names]
    lo, hi = (max(1, round(s * fps)) for s in EXPLORER_HOLD_SECONDS)
    while True:
        mask = masks[rng.choice(len(masks), p=p)]
        for _ in range(int(rng.integers(lo, hi + 1))):
            yield mask


def scripted_keys(runs: Iterable[tuple[int, int]], frames: int) -> Iterator[int]:
    """Expand a key script's (frames, mask) runs into per-frame masks; the script must cover ``frames``."""
    runs = list(runs)
    total = sum(count for count, _ in runs)
    if total < frames:
        raise ValueError(f"the key script has {total} frames, the rollout asks for {frames}")
    return itertools.chain.from_iterable(itertools.repeat(mask, count) for count, mask in runs)


@dataclass(frozen=True)
class RolloutPlan:
    """What to roll out: the seed, length, frame rate, prompt schedule, and where the keys come from."""

    seed: int
    frames: int
    fps: int
    schedule: PromptSchedule
    key_source: str  # for the sidecar, e.g. "script walk.txt" or "explorer (seed 3)"
    start_from: StartFrom = "prompt"
    start: StartFrames | None = None  # the context frames the session starts from (None: the prompt alone)
    picture: str | None = None  # for the sidecar: the picture file of a start from a picture
    engine: EngineBeside | None = None  # the world the start came from, run beside the model (stateful)


@dataclass
class RolloutResult:
    """What a rollout produced so far; with its plan it becomes the sidecar (``sidecar``)."""

    frames: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0
    max_frame_ms: float = 0.0
    keys: list[int] = field(default_factory=list)
    digest: Any = field(default_factory=hashlib.sha256)  # SHA-256 over the raw RGB frames, in order
    completed: bool = False

    def timings(self) -> dict[str, float]:
        n = max(self.frames, 1)
        return {
            "wall_seconds": round(self.seconds, 3),
            "model_seconds": round(self.model_seconds, 3),
            "fps": round(self.frames / self.seconds, 2) if self.seconds else 0.0,
            "model_ms_per_frame": round(1000 * self.model_seconds / n, 2),
            "max_model_ms_per_frame": round(self.max_frame_ms, 2),
        }


ProgressFn = Callable[[int, RolloutResult], None]


def rollout(model: WorldModel, plan: RolloutPlan, keys: Iterator[int], writer: FrameWriter, *, scale: int = 1,
            on_frame: ProgressFn | None = None, stop: Callable[[], bool] | None = None) -> RolloutResult:
    """Generate ``plan.frames`` frames with ``model`` and write each as it comes; one session, one by one.

    Keys and prompt switches apply from the frame they are scheduled at. With ``plan.engine`` every written
    frame is [engine | model] (``app/beside.py``): the engine steps under the same keys and prompt switches,
    outside the model's timings. ``scale`` enlarges the written frames by pixel repetition (the digest
    covers the model's own frames). ``stop`` is asked before every frame (the command's SIGTERM handler sets
    it): a stop lands between frames, so the video and the count always agree. On any exception (Ctrl-C)
    the result so far is attached to it as ``err.rollout_result``.
    """
    result = RolloutResult()
    switches = plan.schedule.switches()
    session = None
    start = time.perf_counter()
    try:
        session = model.new_session(plan.schedule.first, seed=plan.seed, **start_kwargs(plan.start))
        for index in range(plan.frames):
            if stop is not None and stop():
                return result
            mask = next(keys)
            t0 = time.perf_counter()
            if index in switches:
                model.set_prompt(session, switches[index])
            frame = model.next_frame([session], keys=[mask])[0]
            dt = time.perf_counter() - t0
            result.model_seconds += dt
            result.max_frame_ms = max(result.max_frame_ms, 1000 * dt)
            shown = frame
            if plan.engine is not None:
                if index in switches:
                    plan.engine.set_prompt(switches[index])
                shown = side_by_side(plan.engine.next_frame(mask), frame)
            writer.write(shown.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else shown)
            result.digest.update(np.ascontiguousarray(frame).tobytes())
            result.keys.append(mask)
            result.frames += 1
            result.seconds = time.perf_counter() - start
            if on_frame:
                on_frame(index, result)
        result.completed = True
    except BaseException as err:
        err.rollout_result = result  # type: ignore[attr-defined]
        raise
    finally:
        result.seconds = time.perf_counter() - start
        if session is not None:
            model.close_session(session)
    return result


def sidecar(plan: RolloutPlan, result: RolloutResult, model: dict[str, Any]) -> dict[str, Any]:
    """The JSON written next to the video; ``model`` describes the model (name, source, trained, steps,
    width, scale); ``layout`` says what a video frame shows (the model alone, or [engine | model])."""
    return {
        "model": model,
        "seed": plan.seed,
        "fps": plan.fps,
        "requested_frames": plan.frames,
        "frames": result.frames,
        "completed": result.completed,
        "prompts": plan.schedule.to_json(),
        "start": {"from": plan.start_from, "context_frames": len(plan.start.frames) if plan.start else 0,
                  **({"picture": plan.picture} if plan.picture else {})},
        "layout": layout(plan.engine is not None, model.get("width", 0), model.get("scale", 1)),
        "key_source": plan.key_source,
        "key_names": list(KEYS),
        "frames_sha256": result.digest.hexdigest(),
        "timings": result.timings(),
        "keys": result.keys,  # one bitmask per frame, bit i ⇔ key_names[i]
    }


def sidecar_path(video: Path) -> Path:
    """``walk.mp4`` → ``walk.mp4.json`` (never ``walk.json``, which could be the run's own schedule file)."""
    return Path(video).with_name(Path(video).name + ".json")


def write_sidecar(video: Path, data: dict[str, Any]) -> Path:
    """Write the sidecar atomically: one top-level field per line, so long key lists stay compact."""
    path = sidecar_path(video)
    fields = {"video": Path(video).name, **data}
    text = "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in fields.items()) + "\n}\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def frames_for(seconds: float | None, frames: int | None, fps: int) -> int:
    """The frame count from ``--frames`` or ``--seconds``."""
    if (seconds is None) == (frames is None):
        raise ValueError("give exactly one of --frames N or --seconds S")
    n = frames if frames is not None else math.ceil(seconds * fps - 1e-9)
    if n < 1:
        raise ValueError(f"the rollout needs at least one frame, got {n}")
    return n
