"""The ONNX Runtime backend: the DiT frame step and the decoder run as ONNX Runtime sessions on the CPU.

``WorldModel(..., backend="onnxruntime")`` builds an ``OnnxRuntimeExecutor`` from the graphs of
``models/onnx_export.py``; the rollout loop stays in ``WorldModel`` and hands its two hot calls to the
executor: every denoising step (fused with the cache pass or not) and every decode. The rest — the cache
bookkeeping, the sampler, the noise from each session's generator, prompt re-caching and context frames (a
forward over many frames, rare) — stays in PyTorch float32, so frames match the PyTorch backend within
rounding and are as deterministic per seed.

Where the graphs come from (``graphs_for``): ``MODEL_DIR/onnx/`` when ``worldloop export MODEL --onnx`` wrote
it for these very weights, else a folder under the user's cache (``$WORLDLOOP_CACHE``, default
``~/.cache/worldloop``) named by the weights' digest, exported there on first use (tens of seconds; later
loads reuse it).

``backend="onnxruntime-int8"`` runs int8 copies of those graphs (``models/onnx_quantize.py``): the DiT's
matrix products with int8 weights, the decoder's convolutions int8 where calibration frames are given
(``calibration``, a callable so they are rendered only when the graphs are made), kept under
``$WORLDLOOP_CACHE/onnx-int8/``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from worldloop.models.dit import CachedOutput, DiT
from worldloop.models.kv_cache import CacheView, PromptKV
from worldloop.models.onnx_export import (
    DECODER,
    FORMAT,
    MANIFEST,
    STEP,
    STEP_CONTEXT,
    VERSION,
    export_graphs,
    read_manifest,
    weights_digest,
)
from worldloop.models.onnx_quantize import matches as quantized_matches
from worldloop.models.onnx_quantize import quantize_graphs
from worldloop.models.vae import LatentAutoencoder

log = logging.getLogger(__name__)
ABANDONED_S = 3600  # an unfinished export's hidden folder older than this is removed (``prune_stale``)
MISSING = ("the onnxruntime backend needs worldloop's onnx dependencies: pip install 'worldloop[onnx]' "
           "(onnx, onnxruntime, onnxscript)")


def require_onnxruntime() -> Any:
    """Import onnxruntime (and check the exporter's packages), or raise ImportError with the install line."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError(f"{MISSING} ({err})") from None
    return onnxruntime


def cache_root() -> Path:
    return Path(os.environ.get("WORLDLOOP_CACHE") or Path.home() / ".cache" / "worldloop")


def graphs_for(dit: DiT, vae: LatentAutoencoder, model_dir: str | Path | None = None,
               folder: str | Path | None = None, *, int8: bool = False,
               calibration: Callable[[], np.ndarray] | None = None) -> Path:
    """A folder of graphs for exactly these weights: ``folder`` if given (exported there unless it already
    holds them), else ``model_dir/onnx`` if it matches, else the user cache (exported on first use).

    ``int8``: the int8 graphs instead, quantised from the float32 ones into ``folder`` or the user cache
    (``onnx-int8/``); ``calibration()`` gives uint8 frames (N, H, W, 3) of the world the model was trained on,
    whose latents calibrate the decoder (None: a float32 decoder)."""
    digest = weights_digest(dit, vae)
    if int8:
        decoder_int8 = calibration is not None
        if folder is None and model_dir is not None:  # ``worldloop export --onnx --int8`` wrote them there
            shipped = Path(model_dir) / "onnx-int8"
            if quantized_matches(shipped, digest, True) or quantized_matches(shipped, digest, decoder_int8):
                return shipped
        suffix = "" if decoder_int8 else "-dit-only"
        target = Path(folder) if folder is not None else cache_root() / "onnx-int8" / f"{digest[:24]}{suffix}"
        if not quantized_matches(target, digest, decoder_int8):
            source = graphs_for(dit, vae, model_dir)
            log.warning("quantising the model's ONNX graphs to int8 in %s (once for these weights)", target)
            latents = None if calibration is None else vae.eval().encode_frames(calibration())
            quantize_graphs(source, target, latents)
            if folder is None:
                prune_stale(target.parent)
        return target
    if folder is None and model_dir is not None and _matches(Path(model_dir) / "onnx", digest):
        return Path(model_dir) / "onnx"
    target = Path(folder) if folder is not None else cache_root() / "onnx" / digest[:24]
    if not _matches(target, digest):
        log.warning("exporting the model's ONNX graphs to %s (once for these weights; about a minute)",
                    target)
        export_graphs(dit, vae, target)
        if folder is None:
            prune_stale(target.parent)
    return target


def prune_stale(root: Path, now: float | None = None) -> list[Path]:
    """Remove the cache folders under ``root`` whose graphs are of another (older) worldloop graph format —
    no version of the code that reads this one uses them again, and each holds tens of MiB — and the hidden
    folders of exports that never finished (killed mid-way) once they are an hour old (a younger one may be
    another process's export in progress). Folders of this format (other models' graphs) and anything else
    are kept."""
    removed = []
    now = time.time() if now is None else now
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        if child.name.startswith(".") and child.is_dir():
            if now - child.stat().st_mtime > ABANDONED_S:
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
            continue
        try:
            manifest = json.loads((child / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        if (isinstance(manifest, dict) and manifest.get("format") == FORMAT
                and isinstance(manifest.get("version"), int) and manifest["version"] < VERSION):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    if removed:
        log.info("removed %d stale cached graph folder(s) from %s", len(removed), root)
    return removed


def _matches(folder: Path, digest: str) -> bool:
    manifest = read_manifest(folder)
    files = (STEP_CONTEXT, STEP, DECODER)
    return (manifest is not None and manifest.get("weights_sha256") == digest and "int8" not in manifest
            and all((folder / f).is_file() for f in files))


class OnnxRuntimeExecutor:
    """ONNX Runtime sessions for the frame step (with and without a context frame) and the decoder."""

    def __init__(self, folder: str | Path, dit: DiT, threads: int | None = None) -> None:
        ort = require_onnxruntime()
        self.folder, self.depth = Path(folder), len(dit.blocks)
        self.rope_tables = dit.rope_tables  # the graphs take the new frames' rotary tables as inputs
        self.threads = threads or torch.get_num_threads()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: constant folding notes are not the user's business
        if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
            # As for torch's OpenMP threads (app/cli.py): no busy-waiting on a shared CPU.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        self.sessions = {name: ort.InferenceSession(str(self.folder / name), options, providers=providers)
                         for name in (STEP_CONTEXT, STEP, DECODER)}
        # The graphs' own input lists: a delta DiT's also name ``previous``.
        self.names = {name: [i.name for i in self.sessions[name].get_inputs()]
                      for name in (STEP_CONTEXT, STEP)}

    @classmethod
    def for_model(cls, dit: DiT, vae: LatentAutoencoder, model_dir: str | Path | None = None,
                  folder: str | Path | None = None, threads: int | None = None, *, int8: bool = False,
                  calibration: Callable[[], np.ndarray] | None = None) -> OnnxRuntimeExecutor:
        require_onnxruntime()
        graphs = graphs_for(dit, vae, model_dir, folder, int8=int8, calibration=calibration)
        return cls(graphs, dit, threads)

    def frame_step(self, x: Tensor, sigma: Tensor, keys: Tensor, frames: Tensor, context: int,
                   prompt: PromptKV, cache: CacheView, present: Tensor | None = None) -> CachedOutput | None:
        """``DiT.forward_cached`` for the shapes the graphs have (one noisy frame, after at most one context
        frame) over an uncompacted cache view (``KVCache.view(..., compact=False)``); None for anything else
        (the caller runs PyTorch)."""
        if x.shape[1] != context + 1 or context > 1 or cache.runs != (slice(None),):
            return None
        name = STEP_CONTEXT if context else STEP
        present = torch.ones(frames.shape, dtype=torch.bool) if present is None else present
        cos, sin = self.rope_tables(frames)
        values = {"x": x, "sigma": sigma, "keys": keys, "frames": frames, "rope_cos": cos, "rope_sin": sin,
                  "present": present,
                  "cache_frames": cache.frames, "cache_valid": cache.valid, "cache_sink": cache.sink,
                  "previous": cache.previous, "prompt_mask": prompt.mask}
        for i in range(self.depth):
            values |= {f"past_k.{i}": cache.k[i], f"past_v.{i}": cache.v[i],
                       f"prompt_k.{i}": prompt.k[i], f"prompt_v.{i}": prompt.v[i]}
        feed = {n: _array(values[n]) for n in self.names[name]}
        out = [torch.from_numpy(a) for a in self.sessions[name].run(None, feed)]
        return CachedOutput(*out) if context else CachedOutput(out[0], None, None)

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, C, h, w) → images (B, 3, H, W) in [-1, 1], float32."""
        (image,) = self.sessions[DECODER].run(None, {"latent": _array(latents)})
        return torch.from_numpy(image)


def _array(t: Tensor) -> np.ndarray:
    """A CPU tensor as a contiguous numpy array of the graph's dtype (a view when it already is one)."""
    if t.is_floating_point() and t.dtype != torch.float32:
        t = t.float()
    return t.detach().contiguous().numpy()
