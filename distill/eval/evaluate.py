"""``worldloop eval``: world models against the built-in world's engine, on held-out seeds (DESIGN §7).

Every frame is generated through ``WorldModel`` (the one rollout loop); this module only feeds it engine
context, keys and prompts and measures what comes out. For each model and step count:

1. Horizons: ``episodes`` held-out worlds; the engine's first ``context_frames`` frames become the session's
   context (``new_session(first_frames=...)``), then the model steps with the engine's keys. PSNR and SSIM
   against the engine at each horizon, beside the copy-last-frame baseline (the last context frame).
   The same rollout from the prompt alone (no context frames: the other start ``worldloop play`` offers) is
   reported beside it (``prompt_start``): the same frames, keys and metrics, and the theme classifier's
   accuracy on its frames, so both starts are measured.
2. Key accuracy: the inverse-dynamics model on consecutive generated frames vs the keys given (and on the
   engine's frames, for reference).
3. Prompt adherence: after the horizon frames each session switches (``set_prompt``) to a prompt of another
   theme; the theme classifier on the frames after the switch says whether the model followed.
4. Drift: a long rollout (``drift_seconds`` at the model's FPS) driven by the explorer in a lockstep engine
   world; classifier confidence, sharpness and colour statistics of model and engine frames over time.

Outputs in ``out``: ``report.json``, ``rollout.mp4`` (engine | model per episode), ``drift.mp4`` (engine |
model of every drift session, four to a row, at each measurement), ``horizons.png`` and ``drift.png``
(``distill/eval_plots.py``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from worldloop.distill.data.clips import HELD_OUT_SEED_START, WorldClips, downsample, render_scale
from worldloop.distill.data.media import save_png
from worldloop.distill.eval import metrics
from worldloop.distill.eval.autoencoder import autoencoder_report, sharpness_ratio
from worldloop.distill.eval.evaluators import (
    EvaluatorNet,
    key_accuracy,
    load_evaluator,
    predict_keys,
    predict_themes,
)
from worldloop.distill.world.engine import World
from worldloop.distill.world.explorer import Explorer
from worldloop.distill.world.themes import THEMES, describe, sample_params
from worldloop.models.keys import NUM_KEYS
from worldloop.models.media import write_video
from worldloop.models.text import PromptEncoder
from worldloop.models.world_model import Session, WorldModel


@dataclass(frozen=True)
class EvalConfig:
    episodes: int = 8  # held-out worlds rolled out side by side
    horizons: tuple[int, ...] = (1, 4, 16, 64)
    context_frames: int = 0  # engine frames given as context; 0 = sink + window of the model
    switch_frames: int = 48  # frames generated after the prompt switch
    drift_seconds: float = 600.0
    drift_sessions: int = 8  # two swing by ±0.4 in the sharpness change over a minute
    drift_every: int = 30  # frames between drift measurements
    seed: int = 0
    context_sigma: float | None = None  # overrides each model's sampling.context_sigma (None: its own)
    videos: bool = True  # write rollout/drift MP4s (needs PyAV)

    def __post_init__(self) -> None:
        if self.context_sigma is not None and not 0.0 <= self.context_sigma < 1.0:
            raise ValueError(f"--context-sigma must be in [0, 1), got {self.context_sigma}")
        if self.episodes < 1 or not self.horizons or min(self.horizons) < 1:
            raise ValueError("--episodes and every horizon must be at least 1")
        if min(self.switch_frames, self.drift_every, self.drift_sessions) < 1 or self.context_frames < 0:
            raise ValueError("--context-frames must be ≥ 0; --switch-frames, --drift-every, --drift-sessions "
                             "≥ 1")
        if self.drift_seconds <= 0:
            raise ValueError(f"--drift-seconds must be positive, got {self.drift_seconds}")


@dataclass
class EngineClips:
    """Held-out engine clips: frames uint8 (E, T, H, W, 3), keys (E, T), prompts, theme indices (E,)."""

    frames: np.ndarray
    keys: np.ndarray
    prompts: list[str]
    themes: list[int]
    seeds: list[int] = field(default_factory=list)
    poses: np.ndarray | None = None  # float (E, T, 3): the camera's x, y (tiles), heading (radians)


def engine_clips(height: int, width: int, episodes: int, frames: int, seed: int,
                 device: torch.device) -> EngineClips:
    source = WorldClips(height, width, frames, device, seed=seed, held_out=True)
    batch = source.batch(0, episodes)
    return EngineClips(batch.frames.cpu().numpy(), batch.keys.cpu().numpy(), batch.prompts,
                       batch.themes.tolist(), source.seeds(0, episodes).tolist(),
                       None if batch.poses is None else batch.poses.cpu().numpy())


def context_length(wm: WorldModel, requested: int) -> int:
    dit = wm.config.dit
    return min(requested, dit.sink + dit.window) if requested else dit.sink + dit.window


def rollout_from_engine(wm: WorldModel, clips: EngineClips, context_frames: int, frames: int,
                        seed: int) -> tuple[list[Session], np.ndarray]:
    """Sessions started from the engine's first ``context_frames`` frames, then ``frames`` frames made with
    its keys.

    Returns the open sessions and the generated frames uint8 (E, frames, H, W, 3).
    """
    sessions = [wm.new_session(p, seed=seed + i, first_frames=clips.frames[i, :context_frames],
                               first_keys=clips.keys[i, :context_frames],
                               first_poses=None if clips.poses is None else clips.poses[i, :context_frames])
                for i, p in enumerate(clips.prompts)]
    return sessions, _roll(wm, sessions, clips, context_frames, frames)


def _roll(wm: WorldModel, sessions: list[Session], clips: EngineClips, start: int, frames: int) -> np.ndarray:
    """``frames`` frames made with the engine's keys from clip frame ``start`` on → (E, frames, H, W, 3)."""
    out = [wm.next_frame(sessions, clips.keys[:, t].tolist())
           for t in tqdm(range(start, start + frames), desc="rollout", unit="frame", leave=False)]
    return np.stack(out, 1)


def prompt_start(wm: WorldModel, clips: EngineClips, classifier: EvaluatorNet | None, cfg: EvalConfig,
                 context_frames: int) -> dict[str, Any]:
    """The horizon rollout again from the prompt alone: sessions without context frames make the frames the
    engine shows after its context, with the same keys. Metrics as for the start from engine frames (the
    copy-last baseline stays the last engine context frame, which this start never saw)."""
    sessions = [wm.new_session(p, seed=cfg.seed + i) for i, p in enumerate(clips.prompts)]
    horizon = max(cfg.horizons)
    generated = _roll(wm, sessions, clips, context_frames, horizon)
    for s in sessions:
        wm.close_session(s)
    engine = clips.frames[:, context_frames: context_frames + horizon]
    report: dict[str, Any] = {
        "context_frames": 0,
        "horizons": horizon_metrics(generated, engine, clips.frames[:, context_frames - 1], cfg.horizons)}
    if classifier is not None:
        flat = torch.from_numpy(generated.reshape(-1, *generated.shape[2:]))
        predicted = predict_themes(classifier, flat).cpu().argmax(-1).view(generated.shape[:2])
        report["theme_accuracy"] = float((predicted == torch.tensor(clips.themes)[:, None]).float().mean())
    return report


def horizon_metrics(generated: np.ndarray, engine: np.ndarray, last_context: np.ndarray,
                    horizons: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """PSNR/SSIM (mean over episodes) of generated and copy-last frames at each horizon (1 = first frame),
    and the generated frames' sharpness ratio (their mean Laplacian variance ÷ the engine frames'; 1 = as
    sharp).

    ``psnr_gain`` is the mean per-episode PSNR of the model minus that of copy-last, ``psnr_gain_se`` its
    standard error over the episodes (None with one episode): a gain within ~2 SE of 0 is a tie.
    """
    out: dict[str, dict[str, float | None]] = {}
    last = metrics.from_uint8(last_context)
    for h in horizons:
        truth = metrics.from_uint8(engine[:, h - 1])
        model = metrics.from_uint8(generated[:, h - 1])
        psnr, copy_psnr = _capped(metrics.psnr(model, truth)), _capped(metrics.psnr(last, truth))
        gain = psnr - copy_psnr
        out[str(h)] = {"psnr": float(psnr.mean()), "ssim": float(metrics.ssim(model, truth).mean()),
                       "sharpness_ratio": sharpness_ratio(model, truth),
                       "copy_last_psnr": float(copy_psnr.mean()),
                       "copy_last_ssim": float(metrics.ssim(last, truth).mean()),
                       "psnr_gain": float(gain.mean()),
                       "psnr_gain_se": float(gain.std() / len(gain) ** 0.5) if len(gain) > 1 else None}
    return out


def _capped(values: torch.Tensor) -> torch.Tensor:
    """PSNR per episode, capped at 100 dB (an identical pair gives inf)."""
    return values.clamp(max=100.0)


def idm_metrics(idm: EvaluatorNet, generated: np.ndarray, engine: np.ndarray, last_context: np.ndarray,
                keys: np.ndarray) -> dict[str, Any]:
    """IDM key accuracy on model frames and on engine frames, for the transitions into each frame."""
    def run(frames: np.ndarray) -> torch.Tensor:
        streams = np.concatenate([last_context[:, None], frames], 1)  # (E, T + 1, H, W, 3)
        return torch.cat([predict_keys(idm, torch.from_numpy(s)).cpu() for s in streams])

    target = torch.from_numpy(keys).reshape(-1)
    return {"model": key_accuracy(run(generated), target), "engine": key_accuracy(run(engine), target)}


def switch_targets(clips: EngineClips) -> tuple[list[str], list[int]]:
    """For each episode a prompt of another theme (a world of the same seed with that theme)."""
    prompts, themes = [], []
    for i, (seed, theme) in enumerate(zip(clips.seeds, clips.themes, strict=True)):
        target = (theme + 1 + i % (len(THEMES) - 1)) % len(THEMES)
        prompts.append(describe(sample_params(seed, THEMES[target])))
        themes.append(target)
    return prompts, themes


def prompt_switch(wm: WorldModel, sessions: list[Session], classifier: EvaluatorNet | None,
                  clips: EngineClips, start: int, frames: int, before: np.ndarray
                  ) -> tuple[dict[str, Any], np.ndarray]:
    """Switch every session to another theme's prompt and generate ``frames`` more frames."""
    prompts, targets = switch_targets(clips)
    for s, p in zip(sessions, prompts, strict=True):
        wm.set_prompt(s, p)
    keys = clips.keys[:, start: start + frames]
    after = np.stack([wm.next_frame(sessions, keys[:, t].tolist()) for t in range(keys.shape[1])], 1)
    if classifier is None:
        return {"skipped": "no theme classifier"}, after
    own, target = torch.tensor(clips.themes), torch.tensor(targets)

    def probs(frames_: np.ndarray) -> torch.Tensor:  # (E, T, themes)
        flat = torch.from_numpy(frames_.reshape(-1, *frames_.shape[2:]))
        return predict_themes(classifier, flat).cpu().view(*frames_.shape[:2], -1)

    p_after, p_before = probs(after), probs(before)
    tail = max(1, frames // 4)
    hits = p_after.argmax(-1) == target[:, None]
    return {
        "frames_after_switch": frames,
        "adherence": float(hits.float().mean()),
        "adherence_last_quarter": float(hits[:, -tail:].float().mean()),
        "target_probability": float(p_after.gather(-1, target.view(-1, 1, 1).expand(-1, frames, 1)).mean()),
        "theme_accuracy_before_switch": float((p_before.argmax(-1) == own[:, None]).float().mean()),
        "engine_theme_accuracy": float((probs(clips.frames).argmax(-1) == own[:, None]).float().mean()),
    }, after


def frame_stats(frames: np.ndarray, classifier: EvaluatorNet | None, themes: list[int]) -> dict[str, list]:
    """Per-frame drift statistics of uint8 frames (B, H, W, 3)."""
    x = metrics.from_uint8(frames)
    colour = metrics.colour_stats(x)
    stats = {"sharpness": metrics.sharpness(x).tolist(), "colour_mean": colour.mean.tolist(),
             "colour_std": colour.std.tolist(), "saturation": colour.saturation.tolist()}
    if classifier is not None:
        p = predict_themes(classifier, torch.from_numpy(frames)).cpu()
        stats["confidence"] = p.gather(1, torch.tensor(themes).view(-1, 1))[:, 0].tolist()
    return stats


def drift(wm: WorldModel, classifier: EvaluatorNet | None, cfg: EvalConfig, context_frames: int,
          device: torch.device) -> tuple[dict[str, Any], list[np.ndarray]]:
    """A long explorer-driven rollout; the engine world moves in lockstep and is rendered at measurements."""
    h, w = wm.frame_shape
    k = render_scale(h, w)
    seeds = [HELD_OUT_SEED_START + 500_000 + cfg.seed * 1_000 + i for i in range(cfg.drift_sessions)]
    world = World(seeds, h * k, w * k, device)
    explorer = Explorer(world.seeds)
    themes = [THEMES.index(p.theme) for p in world.params]
    first = [downsample(world.render(), k)]
    first_keys = [torch.zeros(len(seeds), dtype=torch.long)]  # the first frame is made with no keys
    first_poses = [world.poses.cpu()]
    for _ in range(context_frames - 1):
        first_keys.append(explorer.act(world))
        first.append(downsample(world.next_frame(first_keys[-1]), k))
        first_poses.append(world.poses.cpu())
    start = np.stack([f.cpu().numpy() for f in first], 1)
    start_keys = torch.stack([m.cpu() for m in first_keys], 1).numpy()
    start_poses = torch.stack(first_poses, 1).numpy()
    sessions = [wm.new_session(world.prompts[i], seed=cfg.seed + 1000 + i, first_frames=start[i],
                               first_keys=start_keys[i], first_poses=start_poses[i])
                for i in range(len(seeds))]
    total = max(1, round(cfg.drift_seconds * wm.config.fps))
    points: list[dict[str, Any]] = []
    video: list[np.ndarray] = []
    for t in tqdm(range(total), desc=f"drift ({wm.steps} steps)", unit="frame", leave=False):
        keys = explorer.act(world)
        world.move(keys)
        frames = wm.next_frame(sessions, keys.tolist())
        if t % cfg.drift_every == 0 or t == total - 1:
            engine = downsample(world.render(), k).cpu().numpy()
            points.append({"frame": t + 1, "seconds": (t + 1) / wm.config.fps,
                           "model": frame_stats(frames, classifier, themes),
                           "engine": frame_stats(engine, classifier, themes)})
            video.append(_tiles(engine, frames))
    for s in sessions:
        wm.close_session(s)
    return {"frames": total, "sessions": len(seeds), "every": cfg.drift_every, "points": points,
            "summary": drift_summary(points)}, video


def _tiles(engine: np.ndarray, model: np.ndarray, per_row: int = 4) -> np.ndarray:
    """Every session's engine | model frame side by side (uint8 (B, H, W, 3) each), ``per_row`` sessions to a
    row of the picture (the last row padded black)."""
    pairs = np.concatenate([engine, model], 2)
    rows = -(-len(pairs) // per_row)
    pad = rows * min(per_row, len(pairs)) - len(pairs)
    pairs = np.concatenate([pairs, np.zeros((pad, *pairs.shape[1:]), pairs.dtype)])
    return np.concatenate([np.concatenate(list(row), 1) for row in pairs.reshape(rows, -1, *pairs.shape[1:])])


def drift_summary(points: list[dict[str, Any]]) -> dict[str, float]:
    """Mean statistics of the first and last fifth of the measurements, model and engine."""
    n = max(1, len(points) // 5)
    out: dict[str, float] = {}
    for who in ("model", "engine"):
        for key in ("sharpness", "saturation", "confidence"):
            if key not in points[0][who]:
                continue
            for part, chunk in (("first", points[:n]), ("last", points[-n:])):
                out[f"{who}_{key}_{part}"] = float(np.mean([p[who][key] for p in chunk]))
    return out


def evaluate_model(wm: WorldModel, clips: EngineClips, cfg: EvalConfig, idm: EvaluatorNet | None,
                   classifier: EvaluatorNet | None, device: torch.device) -> tuple[dict[str, Any], dict]:
    """Every metric for one model at its step count; also returns the frames for the videos."""
    started = time.perf_counter()
    context_frames = context_length(wm, cfg.context_frames)
    horizon = max(cfg.horizons)
    sessions, generated = rollout_from_engine(wm, clips, context_frames, horizon, cfg.seed)
    engine = clips.frames[:, context_frames: context_frames + horizon]
    last = clips.frames[:, context_frames - 1]
    report: dict[str, Any] = {"steps": wm.steps, "context_frames": context_frames,
                              "horizons": horizon_metrics(generated, engine, last, cfg.horizons)}
    made_with = clips.keys[:, context_frames: context_frames + horizon]
    report["keys"] = (idm_metrics(idm, generated, engine, last, made_with)
                      if idm is not None else {"skipped": "no inverse-dynamics model"})
    report["prompt_switch"], after = prompt_switch(wm, sessions, classifier, clips, context_frames + horizon,
                                                   cfg.switch_frames, generated)
    for s in sessions:
        wm.close_session(s)
    report["prompt_start"] = prompt_start(wm, clips, classifier, cfg, context_frames)
    report["drift"], drift_video = drift(wm, classifier, cfg, context_frames, device)
    report["seconds"] = time.perf_counter() - started
    return report, {"generated": np.concatenate([generated, after], 1), "drift": drift_video}


def load_helpers(idm_path: Path | None, classifier_path: Path | None, frame_shape: tuple[int, int],
                 device: torch.device) -> tuple[EvaluatorNet | None, EvaluatorNet | None, list[str]]:
    """Load the helpers that exist; a missing one is skipped with a note, a wrong-sized one is an error."""
    notes, loaded = [], []
    for kind, path in (("idm", idm_path), ("classifier", classifier_path)):
        if path is None or not (Path(path) / "config.json").exists():
            notes.append(f"{kind}: not found at {path}; train it with `worldloop train {kind}`")
            loaded.append(None)
            continue
        net = load_evaluator(path, kind, device)  # type: ignore[arg-type]
        if (net.config.height, net.config.width) != frame_shape:
            size = f"{net.config.height}x{net.config.width}"
            raise ValueError(f"{path}: the {kind} was trained on {size} frames, the model makes "
                             f"{frame_shape[0]}x{frame_shape[1]}")
        loaded.append(net)
    return loaded[0], loaded[1], notes


def write_report(out: Path, report: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return path


def side_by_side(engine: np.ndarray, generated: np.ndarray, episodes: int = 4) -> list[np.ndarray]:
    """Frames of a grid video: one row per episode, engine left, model right."""
    e = min(episodes, len(generated))
    t = generated.shape[1]
    return [np.concatenate([np.concatenate([engine[i, j], generated[i, j]], 1) for i in range(e)], 0)
            for j in range(t)]


def save_videos(out: Path, clips: EngineClips, context_frames: int, frames: dict[str, Any], fps: int,
                tag: str) -> None:
    generated = frames["generated"]
    engine = clips.frames[:, context_frames: context_frames + generated.shape[1]]
    write_video(out / f"rollout{tag}.mp4", side_by_side(engine, generated), fps)
    if frames["drift"]:
        write_video(out / f"drift{tag}.mp4", frames["drift"], max(1, min(fps, 10)))


def run_eval(plan: list[tuple[Path, int | None]], cfg: EvalConfig, out: Path, *,
             idm_path: Path | None, classifier_path: Path | None, device: torch.device,
             prompt_encoder: PromptEncoder | None = None) -> dict[str, Any]:
    """Evaluate every (model, step count) of ``plan`` (None: the model's own) on the same held-out engine
    clips; write the report, videos, plots and a side-by-side table (``summary.md``)."""
    report: dict[str, Any] = {"config": asdict(cfg), "held_out_seed_start": HELD_OUT_SEED_START, "runs": []}
    clips_by_size: dict[tuple[int, int], EngineClips] = {}
    autoencoders: dict[str, dict[str, Any]] = {}
    for path, n in plan:
        wm = WorldModel.from_pretrained(path, steps=n, device=device, prompt_encoder=prompt_encoder,
                                        max_sessions=max(cfg.episodes, cfg.drift_sessions),
                                        context_sigma=cfg.context_sigma)
        prompt_encoder = wm.prompt_encoder
        idm, classifier, notes = load_helpers(idm_path, classifier_path, wm.frame_shape, device)
        context_frames = context_length(wm, cfg.context_frames)
        size = wm.frame_shape
        needed = context_frames + max(cfg.horizons) + cfg.switch_frames
        if size not in clips_by_size or clips_by_size[size].frames.shape[1] < needed:
            clips_by_size[size] = engine_clips(*size, cfg.episodes, needed, cfg.seed, device)
        result, frames = evaluate_model(wm, clips_by_size[size], cfg, idm, classifier, device)
        tag = f"_{len(report['runs'])}" if len(plan) > 1 else ""
        result = {"model": str(path), "stage": wm.metadata.get("stage"),
                  "train_step": wm.metadata.get("step"), "context_sigma": wm.config.sampling.context_sigma,
                  "notes": notes, **result}
        if str(path) not in autoencoders:  # the model's ceiling: its autoencoder alone, once per model
            autoencoders[str(path)] = autoencoder_section(wm.vae, out, f"_{len(autoencoders)}", cfg.seed)
        result["autoencoder"] = autoencoders[str(path)]
        report["runs"].append(result)
        if cfg.videos:
            save_videos(out, clips_by_size[size], context_frames, frames, wm.config.fps, tag)
    write_report(out, report)
    (out / "summary.md").write_text(summary_table(report))
    from worldloop.distill.eval.plots import plot_drift, plot_horizons

    plot_horizons(report, out / "horizons.png")
    plot_drift(report, out / "drift.png")
    return report


def autoencoder_section(vae: torch.nn.Module, out: Path, tag: str, seed: int = 0) -> dict[str, Any]:
    """``autoencoder_report`` of ``vae`` (encode → decode of held-out frames) with its picture written to
    ``out/autoencoder{tag}.png``: one row per theme, engine | reconstruction."""
    result = autoencoder_report(vae, seed=seed)
    pictures = result.pop("pictures")
    picture = out / f"autoencoder{tag}.png"
    save_png(picture, np.concatenate(list(pictures.values()), 0))
    result["picture"] = picture.name
    return result


def run_autoencoder_eval(path: Path, out: Path, seed: int = 0) -> dict[str, Any]:
    """``worldloop eval --autoencoder DIR``: the autoencoder of a model directory alone."""
    from worldloop.models import checkpoint
    from worldloop.models.vae import LatentAutoencoder

    files = checkpoint.load_model(path, need_dit=False)
    vae = LatentAutoencoder(files.config)
    checkpoint.load_into(vae, {k: v.float() for k, v in files.vae.items()}, path / checkpoint.VAE_FILE)
    report = {"autoencoder_only": [{"model": str(path), **autoencoder_section(vae, out, "", seed)}]}
    write_report(out, report)
    (out / "summary.md").write_text(autoencoder_table(report["autoencoder_only"]))
    return report


def autoencoder_table(rows: list[dict[str, Any]]) -> str:
    """Autoencoder-only rows (encode → decode of held-out engine frames) as a Markdown table."""
    head = ["autoencoder of", "latent", "PSNR", "worst frame", "SSIM", "sharpness ratio",
            "decode ms (bf16, 1 thread)"]
    lines = [head, ["---"] * len(head)]
    for r in rows:
        shape = "×".join(str(v) for v in r["latent"]["shape"])
        lines.append([r["model"], shape, f"{r['psnr']:.2f}", f"{r['psnr_min']:.2f}", f"{r['ssim']:.3f}",
                      f"{r['sharpness_ratio']:.3f}", f"{r['decode_ms']:.2f}"])
    return "\n".join("| " + " | ".join(row) + " |" for row in lines) + "\n"


def summary_table(report: dict[str, Any]) -> str:
    """The runs side by side as a Markdown table, the copy-last-frame baseline first."""
    runs = report["runs"]
    horizons = list(runs[0]["horizons"]) if runs else []
    head = (["model", "steps"] + [f"PSNR h{h}" for h in horizons] + [f"SSIM h{h}" for h in horizons]
            + [f"sharpness h{h}" for h in horizons]
            + ["keys (per key)", "prompt adherence", "drift confidence first → last"])
    rows = [head, ["---"] * len(head)]
    if runs:
        base = runs[0]["horizons"]
        rows.append(["copy last frame", "–"] + [f"{base[h]['copy_last_psnr']:.2f}" for h in horizons]
                    + [f"{base[h]['copy_last_ssim']:.3f}" for h in horizons] + [""] * len(horizons)
                    + ["", "", ""])
    for r in runs:
        keys, adherence = r["keys"].get("model", {}).get("per_key"), r["prompt_switch"].get("adherence")
        keys_text = "–" if keys is None else f"{keys:.3f}"
        adherence_text = "–" if adherence is None else f"{adherence:.3f}"
        summary = r["drift"].get("summary", {})
        first, last = summary.get("model_confidence_first"), summary.get("model_confidence_last")
        name = f"{r['model']} ({r.get('stage') or '?'}, step {r.get('train_step')})"
        if r.get("context_sigma"):
            name += f", context σ {r['context_sigma']:g}"
        rows.append([name, str(r["steps"])] + [_psnr_cell(r["horizons"][h]) for h in horizons]
                    + [f"{r['horizons'][h]['ssim']:.3f}" for h in horizons]
                    + [_number(r["horizons"][h].get("sharpness_ratio"), 3) for h in horizons]
                    + [keys_text, adherence_text,
                       "–" if first is None else f"{first:.2f} → {last:.2f} ({r['drift']['frames']} frames)"])
        if r.get("prompt_start"):  # the same rollout started from the prompt alone
            p = r["prompt_start"]["horizons"]
            rows.append([f"… from the prompt alone (no context frames; theme accuracy "
                         f"{_number(r['prompt_start'].get('theme_accuracy'), 3)})", str(r["steps"])]
                        + [_psnr_cell(p[h]) for h in horizons] + [f"{p[h]['ssim']:.3f}" for h in horizons]
                        + [_number(p[h].get("sharpness_ratio"), 3) for h in horizons] + ["", "", ""])
    notes = ("\nEach model row starts from the engine's first frames (context); the row below it "
             "starts the same rollout from the prompt alone.\nPSNR cells: mean over the episodes (gain over "
             "copy-last ± its standard error over the episodes). Sharpness: the model frames' mean Laplacian "
             "variance ÷ the engine frames' (1 = as sharp as the engine).\n")
    ceiling = [{"model": r["model"], **r["autoencoder"]} for r in runs if r.get("autoencoder")]
    unique = list({r["model"]: r for r in ceiling}.values())
    table = "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n" + notes
    if unique:
        table += ("\nAutoencoder only (encode → decode of the held-out frames; the ceiling of every row "
                  "above):\n\n")
        table += autoencoder_table(unique)
    return table


def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _psnr_cell(h: dict[str, Any]) -> str:
    if h.get("psnr_gain") is None:  # reports written before the gain was measured
        return f"{h['psnr']:.2f}"
    se = "" if h.get("psnr_gain_se") is None else f" ± {h['psnr_gain_se']:.2f}"
    return f"{h['psnr']:.2f} ({h['psnr_gain']:+.2f}{se})"


def quick_eval(path: Path, *, steps: int | None, idm: EvaluatorNet | None, classifier: EvaluatorNet | None,
               episodes: int = 8, horizons: tuple[int, ...] = (1, 4, 16), switch_frames: int = 16,
               seed: int = 0, device: torch.device | str = "cpu", context_sigma: float | None = None,
               prompt_encoder: PromptEncoder | None = None, picture: Path | None = None) -> dict[str, Any]:
    """The fixed short evaluation of the learning-speed benchmark, as one flat dict: PSNR and sharpness ratio
    at each horizon with copy-last beside them, key accuracy (per key and exact) with the always-no-key and
    majority rates beside it, prompt adherence after a switch. The same held-out worlds as ``worldloop eval``
    (engine context, then the engine's keys), without the drift rollout."""
    device = torch.device(device)
    wm = WorldModel.from_pretrained(path, steps=steps, device=device, prompt_encoder=prompt_encoder,
                                    max_sessions=episodes, context_sigma=context_sigma)
    context_frames = context_length(wm, 0)
    horizon = max(horizons)
    clips = engine_clips(*wm.frame_shape, episodes, context_frames + horizon + switch_frames, seed, device)
    sessions, generated = rollout_from_engine(wm, clips, context_frames, horizon, seed)
    engine = clips.frames[:, context_frames: context_frames + horizon]
    last = clips.frames[:, context_frames - 1]
    out: dict[str, Any] = {"steps": wm.steps}
    for h, m in horizon_metrics(generated, engine, last, horizons).items():
        out |= {f"psnr_h{h}": m["psnr"], f"copy_last_psnr_h{h}": m["copy_last_psnr"],
                f"sharpness_h{h}": m["sharpness_ratio"]}
    if picture is not None:
        shown = [h - 1 for h in horizons]
        rows = [np.concatenate([np.concatenate([engine[i, t], generated[i, t]], 1) for t in shown], 1)
                for i in range(min(4, episodes))]
        save_png(picture, np.concatenate(rows, 0))
    made_with = clips.keys[:, context_frames: context_frames + horizon]
    bits = (torch.from_numpy(made_with).reshape(-1, 1).long() >> torch.arange(NUM_KEYS)) & 1
    out["no_key_rate_per_key"] = float(1 - bits.float().mean())
    if idm is not None:
        keys = idm_metrics(idm, generated, engine, last, made_with)
        out |= {"key_per_key": keys["model"]["per_key"], "key_exact": keys["model"]["exact"],
                "key_chance_per_key": keys["model"]["chance_per_key"],
                "engine_key_per_key": keys["engine"]["per_key"], "engine_key_exact": keys["engine"]["exact"]}
    switch, _ = prompt_switch(wm, sessions, classifier, clips, context_frames + horizon, switch_frames,
                              generated)
    out["prompt_adherence"] = switch.get("adherence")
    for s in sessions:
        wm.close_session(s)
    return out
