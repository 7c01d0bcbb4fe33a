"""Train the evaluation helpers on engine frames (``worldloop train idm|classifier``): the inverse-dynamics
model and the theme classifier of ``distill/eval/evaluators.py``.

A plain loop (the helpers are small, one process): AdamW on BCE (idm) or cross-entropy (classifier), then the
accuracy on held-out seeds of the engine, saved with the weights.

    worldloop train idm --preset default --out runs/evaluators/idm
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from worldloop.distill.data.clips import ClipSource, WorldClips
from worldloop.distill.eval.evaluators import (
    EvaluatorConfig,
    EvaluatorNet,
    Kind,
    idm_input,
    key_accuracy,
    save_evaluator,
)
from worldloop.distill.stages.run import JsonlLog, Progress, RunError, StopSignal
from worldloop.distill.stages.runtime import Distributed, TrainConfig
from worldloop.distill.stages.shared import make_clip_source
from worldloop.distill.world.themes import THEMES
from worldloop.models.config import ModelConfig
from worldloop.models.keys import KEYS, NUM_KEYS
from worldloop.models.vae import to_unit


def evaluator_batch(kind: Kind, clips: ClipSource, iteration: int, size: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets for one iteration: every consecutive pair of each clip (idm) or every frame
    (classifier).

    Targets: multi-hot keys (N, NUM_KEYS) float, or theme indices (N,) long.
    """
    batch = clips.batch(iteration, size)
    b, f = batch.frames.shape[:2]
    x = to_unit(batch.frames.flatten(0, 1)).view(b, f, 3, *batch.frames.shape[2:4])
    if kind == "classifier":
        return x.flatten(0, 1), batch.themes.repeat_interleave(f)
    bits = (batch.keys[:, 1:].unsqueeze(-1) >> torch.arange(NUM_KEYS, device=batch.keys.device)) & 1
    return idm_input(x[:, :-1].flatten(0, 1), x[:, 1:].flatten(0, 1)), bits.flatten(0, 1).float()


def evaluator_loss(kind: Kind, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "idm":
        return F.binary_cross_entropy_with_logits(logits.float(), target)
    return F.cross_entropy(logits.float(), target)


@torch.no_grad()
def held_out_accuracy(model: EvaluatorNet, clips: ClipSource, batches: int, size: int) -> dict[str, float]:
    """Accuracy on ``clips`` (a held-out source): key accuracies for the IDM, top-1 for the classifier."""
    model.eval()
    kind = model.config.kind
    outs, targets = [], []
    for i in range(batches):
        x, y = evaluator_batch(kind, clips, i, size)
        outs.append(model(x.to(next(model.parameters()).device)).float().cpu())
        targets.append(y.cpu())
    model.train()
    logits, target = torch.cat(outs), torch.cat(targets)
    if kind == "classifier":
        top1 = (logits.argmax(-1) == target).float().mean().item()
        return {"top1": top1, "chance": 1.0 / len(model.config.labels)}
    masks = (target.long() << torch.arange(NUM_KEYS)).sum(-1)
    return key_accuracy(torch.sigmoid(logits), masks)


def train_evaluator(config: EvaluatorConfig, cfg: TrainConfig, train_clips: ClipSource, held_out: ClipSource,
                    ddp: Distributed, eval_batches: int = 4, eval_batch_size: int = 8
                    ) -> tuple[EvaluatorNet, dict[str, float]]:
    """A plain loop: AdamW on BCE (idm) or cross-entropy (classifier); saves to ``cfg.out``.

    Single process (the helpers are small); stops early and saves on SIGTERM/Ctrl-C or after ``cfg.minutes``
    (the last line of ``log.jsonl`` says how many iterations ran and why it stopped).
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = EvaluatorNet(config).to(ddp.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    log = JsonlLog(out / "log.jsonl")
    frames_per_iteration = cfg.batch_size * (cfg.clip_frames - (config.kind == "idm"))
    progress = Progress(0, cfg.iterations, f"train {config.kind}")
    started, done, stopped = time.monotonic(), 0, None
    with StopSignal() as stop:
        for iteration in range(cfg.iterations):
            if stop.requested:
                stopped = "signal"
            elif cfg.minutes > 0 and time.monotonic() - started >= 60 * cfg.minutes:
                stopped = "minutes"
            if stopped:
                break
            x, y = evaluator_batch(config.kind, train_clips, iteration, cfg.batch_size)
            loss = evaluator_loss(config.kind, model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done = iteration + 1
            progress.update(frames_per_iteration, loss=loss.item())
            if iteration % cfg.log_every == 0 or iteration == cfg.iterations - 1:
                log.write(iteration=iteration, loss=loss.item(), frames_per_s=progress.rate())
                progress.reset_rate()
    progress.close()
    metrics = held_out_accuracy(model, held_out, eval_batches, eval_batch_size)
    log.write(iteration=done, held_out=metrics, stopped=stopped)  # stopped: None, "signal" or "minutes"
    save_evaluator(model.cpu(), out, metrics)
    return model, metrics


def default_config(kind: Kind, height: int, width: int, labels: tuple[str, ...]) -> EvaluatorConfig:
    """Sized to the frame. IDM: cost volume at ≤ 64 px, displacements covering a frame's turn (~6 % of the
    width). Classifier: one stride-2 stage per factor of two down to ~8×8, at most four."""
    if kind == "idm":
        pool = max(1, min(height, width) // 64)
        if height % pool or width % pool:
            pool = 1
        return EvaluatorConfig(kind, height, width, labels, pool=pool,
                               shift_x=max(3, math.ceil(0.06 * width / pool)))
    stages = max(1, min(4, (min(height, width) // 8).bit_length() - 1))
    return EvaluatorConfig(kind, height, width, labels, channels=(32, 64, 128, 128)[:stages], hidden=256)


def train_for_config(kind: Kind, config: ModelConfig, cfg: TrainConfig, ddp: Distributed,
                     held_out_clips: int = 16) -> dict[str, float]:
    """Train the ``kind`` helper at the frame size of ``config`` (one process); returns held-out accuracy.

    The IDM trains on clips where half the frames carry random keys (so every key combination is seen, not
    only the explorer's habits); both report accuracy on explorer clips of held-out seeds.
    """
    if ddp.enabled:
        raise RunError(f"`worldloop train {kind}` runs in one process; start it without torchrun")
    labels = KEYS if kind == "idm" else THEMES
    net_config = default_config(kind, config.height, config.width, labels)
    train_clips = make_clip_source(cfg, config, ddp.device, 0, cfg.clip_frames,
                                   random_keys=0.5 if kind == "idm" else 0.0)
    per_batch = max(1, min(cfg.batch_size, held_out_clips))
    held_out = WorldClips(config.height, config.width, cfg.clip_frames, ddp.device, seed=cfg.seed,
                          held_out=True)
    _, metrics = train_evaluator(net_config, cfg, train_clips, held_out, ddp,
                                 eval_batches=max(1, held_out_clips // per_batch), eval_batch_size=per_batch)
    return metrics
