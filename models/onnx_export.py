"""ONNX graphs of a world model's inference path: the cached DiT frame step and the decoder.

``export_graphs(dit, vae, folder)`` writes three graphs and a manifest (``onnx.json``) into ``folder``:

- ``dit_step_context.onnx`` — one denoising step fused with the cache pass: frame 0 of ``x`` is the previous
  (clean) frame whose k/v the cache stores, frame 1 the noisy new frame (``DiT.forward_cached`` with
  ``context=1`` over 2 frames). What every 1-step frame and the first step of a 2-step frame run.
- ``dit_step.onnx`` — one denoising step of the noisy frame alone (``context=0``, 1 frame): later steps, and
  frames with nothing pending.
- ``decoder.onnx`` — scaled latents (B, C, h, w) → images (B, 3, H, W) clamped to [-1, 1]
  (``LatentAutoencoder.decode``); rounding to uint8 stays in PyTorch (``vae.to_uint8``).

The cache is explicit: every layer's stored k and v come in as inputs ``past_k.{i}``/``past_v.{i}`` of shape
(B, H, F·N, Dh) — F = sink + window + slack frame slots of N tokens, the whole ring of a ``KVCache`` slot,
empty slots masked by ``cache_valid`` — with the slots' absolute frame indices ``cache_frames`` (B, F) and
sink flags ``cache_sink`` (B, F); the prompt's cross-attention k/v per layer come in as
``prompt_k.{i}``/``prompt_v.{i}`` (B, H, T+1, Dh) with ``prompt_mask`` (B, T+1). A delta-predicting DiT's
graphs also take ``previous`` (B, C, h, w): the latent of each row's newest cached frame, zeros when the row
has none (``CacheView.previous``); the fused step adds to the context frame instead where ``present`` marks
it. Velocity and x0 DiTs have no such input. The fused step returns the clean frame's new k/v as
``new_k``/``new_v`` (depth, B, H, N, Dh); the caller writes them into its cache (the graphs write nothing).
The new frames' rotary tables come in as ``rope_cos``/``rope_sin`` (2, B, 1, G·N, Dh) (``DiT.rope_tables``,
computed in float64 by the caller: they depend on absolute frame indices, which grow without bound); the
cached k carry their phase already. The graphs hold the weights with attention's 1/√Dh folded into q's gains
(``DiT.fold_attention_scale``). Everything is float32 except frame indices (int64) and flags (bool). The batch
axis B is dynamic (axis 1 of the rotary tables and of ``new_k``/``new_v``: ``batch_axis``); every other axis
is fixed by the config. Opset ``OPSET`` (18: ONNX Runtime ≥ 1.14 and TensorRT ≥ 8.6 read it).

Each export is checked against PyTorch (float32) on a half-filled cache with ONNX Runtime when it is
installed: the largest absolute difference of every output is stored in the manifest and must stay under
``TOLERANCE``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from worldloop.models.config import ModelConfig
from worldloop.models.dit import DiT, Rotary
from worldloop.models.kv_cache import CacheView, PromptKV
from worldloop.models.vae import LatentAutoencoder

OPSET = 18
FORMAT = "worldloop-onnx"
VERSION = 2  # 2: the cache holds k with rotary phase; the step graphs take the new frames' tables
MANIFEST = "onnx.json"
STEP_CONTEXT, STEP, DECODER = "dit_step_context.onnx", "dit_step.onnx", "decoder.onnx"
TOLERANCE = 1e-3  # largest absolute difference to PyTorch float32 (v, k/v and images are of order 1)
ROPE_INPUTS = ("rope_cos", "rope_sin")
STEP_INPUTS = ("x", "sigma", "keys", "frames", *ROPE_INPUTS, "present", "cache_frames",
               "cache_valid", "cache_sink", "previous", "prompt_mask")
LAYER_INPUTS = ("past_k", "past_v", "prompt_k", "prompt_v")


def layer_names(depth: int) -> list[str]:
    """The per-layer input names, in graph order: past k, past v, prompt k, prompt v."""
    return [f"{kind}.{i}" for kind in LAYER_INPUTS for i in range(depth)]


def step_input_names(depth: int, context: int, delta: bool) -> list[str]:
    """A frame-step graph's input names, in graph order: ``present`` only with a context frame (placeholder
    frames), ``previous`` only for a DiT that builds on it ("delta", "warp")."""
    kept = [n for n in STEP_INPUTS if (n != "present" or context) and (n != "previous" or delta)]
    return kept + layer_names(depth)


class FrameStepGraph(nn.Module):
    """``DiT.forward_cached`` with the cache and the prompt k/v as flat tensors (the graph's inputs)."""

    def __init__(self, dit: DiT, context: int) -> None:
        super().__init__()
        self.dit, self.context = dit, context
        self.names = step_input_names(len(dit.blocks), context, dit.cfg.reads_previous)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        named = dict(zip(self.names, inputs, strict=True))
        layers = {kind: [named[f"{kind}.{i}"] for i in range(len(self.dit.blocks))] for kind in LAYER_INPUTS}
        prompt = PromptKV(layers["prompt_k"], layers["prompt_v"], named["prompt_mask"])
        x = named["x"]
        previous = named.get("previous", torch.zeros_like(x[:, 0]))  # read by delta-predicting DiTs only
        view = CacheView(layers["past_k"], layers["past_v"], (slice(None),), named["cache_frames"],
                         named["cache_valid"], named["cache_sink"], prompt, previous)
        out = self.dit.forward_cached(x, named["sigma"], named["keys"], named["frames"], self.context, prompt,
                                      view, named.get("present"), rope=(named["rope_cos"], named["rope_sin"]))
        return (out.v, out.k, out.v_cache) if self.context else (out.v,)


class DecoderGraph(nn.Module):
    def __init__(self, vae: LatentAutoencoder) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.vae.decode(inputs[0])  # (B, C, h, w) → (B, 3, H, W)


def example_step_inputs(config: ModelConfig, context: int, batch: int = 2, filled: int | None = None,
                        seed: int = 0) -> list[Tensor]:
    """Inputs of a frame-step graph: a cache with ``filled`` frames stored (default: half the slots; the
    sink and the newest ones), random k/v and latents, the next frame(s) after them. With a context frame
    and more than one row, row 0's context frame is a placeholder, so a delta DiT's fused step adds to the
    cached ``previous`` there and to the context frame elsewhere."""
    d, g = config.dit, torch.Generator().manual_seed(seed)
    slots, n, t = d.cache_frames, config.tokens_per_frame, d.max_prompt_tokens + 1
    filled = max(1, slots // 2) if filled is None else filled
    stored = torch.arange(slots)
    cache_frames = torch.where(stored < filled, stored, -1).expand(batch, slots).clone()
    frames = torch.arange(filled, filled + context + 1).expand(batch, context + 1).clone()
    latent = (config.latent_channels, *config.latent_size)
    present = torch.ones(batch, context + 1, dtype=torch.bool)
    if context and batch > 1:
        present[0, 0] = False
    grid = (config.latent_size[0] // d.patch_size, config.latent_size[1] // d.patch_size)
    rope = Rotary(d.head_dim, grid, d.rope_theta).qk_tables(frames, d.sink)  # as DiT.rope_tables
    inputs = {"x": torch.randn(batch, context + 1, *latent, generator=g),
              "rope_cos": rope[0], "rope_sin": rope[1],
              "sigma": torch.rand(batch, context + 1, generator=g),
              "keys": (torch.rand(batch, context + 1, d.num_keys, generator=g) > 0.5).float(),
              "frames": frames, "present": present,
              "cache_frames": cache_frames, "cache_valid": cache_frames >= 0,
              "cache_sink": (cache_frames >= 0) & (stored < d.sink),
              "previous": torch.randn(batch, *latent, generator=g),
              "prompt_mask": torch.arange(t).expand(batch, t) < 5}
    past = [torch.randn(batch, d.heads, slots * n, d.head_dim, generator=g) for _ in range(2 * d.depth)]
    prompt = [torch.randn(batch, d.heads, t, d.head_dim, generator=g) for _ in range(2 * d.depth)]
    names = step_input_names(d.depth, context, d.reads_previous)[: -4 * d.depth]
    return [inputs[name] for name in names] + past + prompt


def weights_digest(dit: DiT, vae: LatentAutoencoder) -> str:
    """sha256 of the config, the export format and every weight (as float32): names a set of graphs."""
    h = hashlib.sha256(f"{FORMAT} {VERSION} opset {OPSET}\n{dit.config.to_json()}".encode())
    for prefix, module in (("dit.", dit), ("vae.", vae)):
        for name, tensor in module.state_dict().items():
            h.update((prefix + name).encode())
            h.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest of a graph folder, or None when there is no readable one."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(manifest, dict) and (manifest.get("format"), manifest.get("version")) == (FORMAT, VERSION)
    return manifest if ok else None


def _export(module: nn.Module, inputs: list[Tensor], names: list[str], outputs: list[str], path: Path
            ) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    # torch.export sees the flat arguments of ``forward(*inputs)`` as one tuple.
    dynamic = (tuple({batch_axis(name): batch} for name in names),)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # notes on torchvision operators and axis names are noise here
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module.eval(), tuple(inputs), input_names=names,
                                        output_names=outputs, dynamic_shapes=dynamic, dynamo=True,
                                        opset_version=OPSET, optimize=True, verbose=False)
    finally:
        quiet.setLevel(level)
    program.save(str(path))


def _graphs(dit: DiT, vae: LatentAutoencoder) -> Iterator[tuple[str, nn.Module, list[Tensor], list[str],
                                                                  list[str]]]:
    config = dit.config
    for file, context in ((STEP_CONTEXT, 1), (STEP, 0)):
        outputs = ["v", "new_k", "new_v"] if context else ["v"]
        graph = FrameStepGraph(dit, context)
        yield file, graph, example_step_inputs(config, context), graph.names, outputs
    latent = torch.randn(2, config.latent_channels, *config.latent_size, generator=torch.Generator())
    yield DECODER, DecoderGraph(vae), [latent], ["latent"], ["image"]


def export_graphs(dit: DiT, vae: LatentAutoencoder, folder: str | Path, *, check: bool = True
                  ) -> dict[str, Any]:
    """Write the graphs and ``onnx.json`` into ``folder`` (replaced when complete) → the manifest.

    The modules are exported as float32 copies in eval mode. With ``check`` (and ONNX Runtime installed) every
    graph is run on its example inputs and compared with PyTorch; a difference over ``TOLERANCE`` raises
    ``ValueError``.
    """
    folder = Path(folder)
    dit32 = _float_copy(dit)
    vae32 = _float_copy(vae)
    digest = weights_digest(dit32, vae32)  # of the weights as given; the graphs hold them with scale folded
    dit32.fold_attention_scale()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        graphs: dict[str, Any] = {}
        for file, module, inputs, names, outputs in _graphs(dit32, vae32):
            with torch.no_grad():
                _export(module, inputs, names, outputs, tmp / file)
                expected = module(*inputs)
            expected = expected if isinstance(expected, tuple) else (expected,)
            graphs[file] = {"inputs": {n: _shape(n, t) for n, t in zip(names, inputs, strict=True)},
                            "outputs": {n: _shape(n, t) for n, t in zip(outputs, expected, strict=True)}}
            if check:
                graphs[file]["max_abs_diff"] = _check(tmp / file, names, inputs, outputs, expected)
        manifest = {"format": FORMAT, "version": VERSION, "opset": OPSET, "weights_sha256": digest,
                    "tolerance": TOLERANCE, "torch": torch.__version__, "config": dit32.config.to_dict(),
                    "graphs": graphs}
        publish(tmp, folder, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def publish(tmp: Path, folder: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` into the finished scratch folder ``tmp`` and put it in ``folder``'s place (a
    reader never sees half a folder: the old one is moved aside first, then removed)."""
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    old = folder.with_name(f".{folder.name}-old-{uuid.uuid4().hex[:8]}")
    if folder.exists():
        folder.rename(old)
    tmp.chmod(0o755)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _float_copy(module: nn.Module) -> Any:
    import copy

    return copy.deepcopy(module).float().eval().requires_grad_(False)


def batch_axis(name: str) -> int:
    """Which axis of a graph input or output is the batch: 1 for the rotary tables (q's and k's stacked) and
    the new k/v (one per layer), 0 for everything else."""
    return 1 if name in (*ROPE_INPUTS, "new_k", "new_v") else 0


def _shape(name: str, t: Tensor) -> dict[str, Any]:
    shape: list[Any] = list(t.shape)
    shape[batch_axis(name)] = "B"
    return {"shape": shape, "dtype": str(t.dtype).removeprefix("torch.")}


def _check(path: Path, names: list[str], inputs: list[Tensor], outputs: list[str],
           expected: tuple[Tensor, ...]) -> dict[str, float] | None:
    """Largest |ONNX Runtime - PyTorch| per output (None without onnxruntime); over TOLERANCE: ValueError."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(outputs, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})
    diffs = {n: float((torch.from_numpy(g) - e).abs().max()) for n, g, e in zip(outputs, got, expected,
                                                                                  strict=True)}
    worst = max(diffs, key=diffs.get)
    if diffs[worst] > TOLERANCE:
        raise ValueError(f"{path.name}: output {worst} differs from PyTorch by {diffs[worst]:.2e} "
                         f"(tolerance {TOLERANCE:g})")
    return diffs
