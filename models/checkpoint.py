"""Model directories and training checkpoints: safetensors weights plus JSON that carries the config.

A model directory (what ``WorldModel.from_pretrained`` reads):

    config.json           {"format": "worldloop-model", "version": 1, "config": ModelConfig.to_dict(),
                           "metadata": {"preset", "created", "step", ...training info}}
    README.md             the model card (models/model_card.py): YAML front matter, then what it is,
                          how it was trained, its eval figures
    dit.safetensors       DiT weights (optional when dit_ema.safetensors is there)
    dit_ema.safetensors   EMA of the DiT weights (optional; bfloat16 by default — what ships)
    vae.safetensors       autoencoder weights

``export_model`` writes the shipping form (``assets/default``): config, the EMA weights only and the
autoencoder, about half the size of a training export.

Training checkpoints use ``save_state``/``load_state``: one safetensors file per module, with string metadata
in its header. A module over ``SHARD_BYTES`` is written as shards ``dit-00001-of-00003.safetensors``, … (each
under the 16 MiB a file that a GPU session can carry back) with a shard index ``dit.safetensors.index.json``
as Hugging Face writes it (``{"metadata": {"total_size": bytes}, "weight_map": {tensor: shard file}}``);
readers take either form under the plain name, and shards without an index (older directories) too.
Every problem — a missing file, a truncated or garbage file, a config that does not parse, missing/unexpected
tensors, a shape that does not match the config, incomplete or mixed shards — raises ``CheckpointError``
naming the file and the problem.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from worldloop.models.config import ModelConfig
from worldloop.models.dit import DiT
from worldloop.models.model_card import CARD_FILE, eval_rows, model_card
from worldloop.models.surface_memory import LOOKS_FILE
from worldloop.models.vae import LatentAutoencoder

FORMAT = "worldloop-model"
VERSION = 1
CONFIG_FILE, DIT_FILE, VAE_FILE = "config.json", "dit.safetensors", "vae.safetensors"
EMA_FILE = "dit_ema.safetensors"
SHARD_BYTES = 15 * 2**20  # the largest shard: files of at most 16 MiB travel back from the GPU machines
INDEX_SUFFIX = ".index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


@dataclass
class ModelFiles:
    """The contents of a model directory (state dicts on the requested device)."""

    config: ModelConfig
    metadata: dict[str, Any]
    dit: dict[str, Tensor] | None  # None: an autoencoder-only directory (load_model(need_dit=False))
    dit_ema: dict[str, Tensor] | None
    vae: dict[str, Tensor]


def _state_of(state: nn.Module | dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    sd = state.state_dict() if isinstance(state, nn.Module) else state
    out = {}
    for name, t in sd.items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.cpu().contiguous().clone()  # safetensors refuses shared storage
    return out


def save_state(path: str | Path, state: nn.Module | dict[str, Tensor], metadata: dict[str, Any] | None = None,
               dtype: torch.dtype | None = None, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a module's state dict (floating tensors cast to ``dtype`` if given) with JSON-able metadata.

    Over ``shard_bytes`` the tensors go to numbered shards beside ``path`` (see the module docstring); every
    shard names its set, so a reader never mixes shards of two writes. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = _state_of(state, dtype)
    groups: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += nbytes
    stale = [path, *shard_files(path), index_path(path)]
    header = {"metadata": json.dumps(metadata or {}, sort_keys=True)}
    if len(groups) == 1:
        written = [_write_atomic(path, groups[0], header)]
    else:
        set_id = uuid.uuid4().hex
        written = [_write_atomic(_shard_name(path, i + 1, len(groups)), group,
                                 header | {"shard_set": set_id})
                   for i, group in enumerate(groups)]
        written.append(write_shard_index(path, written))
    for old in stale:
        if old not in written and old.exists():
            old.unlink()
    return path


def _write_atomic(path: Path, tensors: dict[str, Tensor], header: dict[str, str]) -> Path:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    tmp.replace(path)  # never leave a half-written file under the real name
    return path


def index_path(path: str | Path) -> Path:
    """``dit_ema.safetensors`` → ``dit_ema.safetensors.index.json``, the index of its shards."""
    return Path(path).with_name(Path(path).name + INDEX_SUFFIX)


def write_shard_index(path: str | Path, shards: list[Path] | None = None) -> Path:
    """Write the shard index of ``path`` (its shards: ``shards``, else those on disk); returns its path.

    ``total_size`` is the tensors' bytes, ``weight_map`` maps each tensor to its shard's file name."""
    path = Path(path)
    weight_map: dict[str, str] = {}
    total = 0
    for shard in shards if shards is not None else shard_files(path):
        for name, nbytes in _tensor_bytes(shard).items():
            weight_map[name] = shard.name
            total += nbytes
    doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    index = index_path(path)
    tmp = index.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(index)
    return index


def _tensor_bytes(path: Path) -> dict[str, int]:
    return {name: end - start for name, (_, (start, end)) in _header(path).items()}


def _header(path: Path) -> dict[str, tuple[list[int], tuple[int, int]]]:
    """Tensor name → (shape, data offsets), from a safetensors file's header alone (8-byte length, JSON)."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        return {name: ([int(d) for d in info["shape"]], (int(info["data_offsets"][0]),
                                                          int(info["data_offsets"][1])))
                for name, info in header.items() if name != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err


def read_header_shapes(path: str | Path) -> dict[str, list[int]] | None:
    """Tensor name → shape of a state written by ``save_state`` (whole or sharded), read from the headers
    alone; None when it was not written."""
    path = Path(path)
    files = [path] if path.is_file() else shard_files(path)
    if not files:
        return None
    return {name: shape for f in files for name, (shape, _) in _header(f).items()}


def _shard_name(path: Path, index: int, count: int) -> Path:
    return path.with_name(f"{path.stem}-{index:05d}-of-{count:05d}{path.suffix}")


def _shard_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(re.escape(path.stem) + r"-(\d{5})-of-(\d{5})" + re.escape(path.suffix))


def shard_files(path: str | Path) -> list[Path]:
    """The shards written for ``path`` (empty when it was written whole), in order."""
    path = Path(path)
    pattern = _shard_pattern(path)
    return sorted(f for f in path.parent.glob(f"{path.stem}-*{path.suffix}") if pattern.fullmatch(f.name))


def state_exists(path: str | Path) -> bool:
    """Whether ``path`` was written, whole or as shards."""
    return Path(path).is_file() or bool(shard_files(path))


def read_state(path: str | Path, device: torch.device | str = "cpu"
               ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a safetensors file, or the shards written in its place → (tensors, metadata)."""
    path = Path(path)
    if path.is_file():
        tensors, header = _read_file(path, device)
        return tensors, _metadata(path, header)
    index = _read_index(path)
    shards = sorted({path.with_name(name) for name in index.values()}) if index else shard_files(path)
    if not shards:
        raise CheckpointError(f"{path}: file not found")
    pattern = _shard_pattern(path)
    numbered = [(int(m.group(1)), int(m.group(2))) for m in (pattern.fullmatch(f.name) for f in shards) if m]
    counts = {count for _, count in numbered}
    if len(counts) != 1 or sorted(i for i, _ in numbered) != list(range(1, counts.pop() + 1)):
        names = ", ".join(f.name for f in shards)
        raise CheckpointError(f"{path}: incomplete or mixed shards ({names})")
    tensors: dict[str, Tensor] = {}
    headers = []
    for shard in shards:
        part, header = _read_file(shard, device)
        tensors |= part
        headers.append(header)
    if len({h.get("shard_set") for h in headers}) != 1:
        raise CheckpointError(f"{path}: its shards come from different writes (an interrupted save?)")
    if index is not None and set(index) != set(tensors):
        raise CheckpointError(f"{index_path(path)}: does not match its shards: missing "
                              f"{_few(sorted(set(index) - set(tensors)))}, unlisted "
                              f"{_few(sorted(set(tensors) - set(index)))}")
    return tensors, _metadata(shards[0], headers[0])


def _read_index(path: Path) -> dict[str, str] | None:
    """The weight map of ``path``'s shard index, None when there is none (shards found by their names)."""
    file = index_path(path)
    if not file.is_file():
        return None
    try:
        weight_map = json.loads(file.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v
                                                       for v in weight_map.values()):
            raise ValueError("weight_map must map tensor names to file names")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{file}: not a readable shard index ({err})") from err
    missing = sorted({name for name in weight_map.values() if not path.with_name(name).is_file()})
    if missing:
        raise CheckpointError(f"{file}: names shards that are missing: {_few(missing)}")
    return weight_map


def _read_file(path: Path, device: torch.device | str) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            return tensors, f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for truncated or garbage files
        problem = f"{type(err).__name__}: {err}"
        raise CheckpointError(f"{path}: not a readable safetensors file ({problem})") from err


def _metadata(path: Path, header: dict[str, str]) -> dict[str, Any]:
    try:
        return dict(json.loads(header.get("metadata", "{}")))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file (bad metadata: {err})") from err


def load_state(path: str | Path, module: nn.Module, strict: bool = True) -> dict[str, Any]:
    """Load a file written by ``save_state`` into ``module`` (cast to its dtypes); returns the metadata."""
    tensors, metadata = read_state(path, device="cpu")
    load_into(module, tensors, Path(path), strict)
    return metadata


def load_into(module: nn.Module, tensors: dict[str, Tensor], source: Path, strict: bool = True) -> None:
    """Copy ``tensors`` into ``module`` after checking names and shapes; errors name ``source``."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(f"{source}: does not match the model: missing {_few(missing)}, "
                              f"unexpected {_few(unexpected)}")
    wrong = [f"{n} {tuple(tensors[n].shape)} vs {tuple(own[n].shape)}"
             for n in sorted(set(own) & set(tensors)) if tensors[n].shape != own[n].shape]
    if wrong:
        raise CheckpointError(f"{source}: tensor shapes do not match the config: {_few(wrong)}")
    module.load_state_dict({n: t for n, t in tensors.items() if n in own}, strict=False)


def _few(items: list[str], n: int = 4) -> str:
    if not items:
        return "none"
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def save_model(path: str | Path, config: ModelConfig, dit: nn.Module | None, vae: nn.Module, *,
               dit_ema: nn.Module | dict[str, Tensor] | None = None, metadata: dict[str, Any] | None = None,
               ema_dtype: torch.dtype | None = torch.bfloat16) -> Path:
    """Write a model directory; ``metadata`` (step, training info, …) is stored in config.json.

    ``dit`` None writes an autoencoder-only directory (what ``worldloop train vae`` exports).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"preset": config.name, "created": _now(),
            "step": 0} | (metadata or {})
    if dit is not None:
        save_state(path / DIT_FILE, dit)
    if dit_ema is not None:
        save_state(path / EMA_FILE, dit_ema, dtype=ema_dtype)
    save_state(path / VAE_FILE, vae)
    _write_config(path, config, meta)
    write_model_card(path)
    return path


def _write_config(path: Path, config: ModelConfig, metadata: dict[str, Any]) -> None:
    doc = {"format": FORMAT, "version": VERSION, "config": config.to_dict(), "metadata": metadata}
    (path / CONFIG_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def read_config(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The config and metadata of a model directory."""
    file = Path(path) / CONFIG_FILE
    if not Path(path).is_dir():
        raise CheckpointError(f"{path}: not a model directory")
    if not file.is_file():
        raise CheckpointError(f"{file}: file not found")
    try:
        doc = json.loads(file.read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, expected {FORMAT!r}")
        if doc.get("version") != VERSION:
            raise ValueError(f"version {doc.get('version')!r} is not supported (expected {VERSION})")
        return ModelConfig.from_dict(doc["config"]), dict(doc.get("metadata", {}))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{file}: invalid model config ({err})") from err


def latent_shape_text(config: ModelConfig) -> str:
    """``C×h×w`` latent shape of a config, with the frame size and the autoencoder's downsampling."""
    h, w = config.latent_size
    return (f"{config.latent_channels}×{h}×{w} latents ({config.height}×{config.width} frames, "
            f"f{config.vae.downsample})")


def check_autoencoder(config: ModelConfig, source: ModelConfig, path: str | Path) -> None:
    """A clear error, naming both shapes, when the autoencoder of ``path`` does not fit ``config``."""
    if (source.vae, source.height, source.width) != (config.vae, config.height, config.width):
        raise CheckpointError(f"{path}: its autoencoder makes {latent_shape_text(source)} but the model "
                              f"config {config.name!r} expects {latent_shape_text(config)}")


def with_autoencoder_of(config: ModelConfig, path: str | Path) -> ModelConfig:
    """``config`` with the autoencoder section of the model directory ``path`` (whose frames must match)."""
    source, _ = read_config(path)
    if (source.height, source.width) != (config.height, config.width):  # frames are the preset's
        check_autoencoder(config, source, path)
    try:
        return config.replace(vae=source.vae)
    except ValueError as err:  # e.g. a latent size the DiT's patch size does not divide
        raise CheckpointError(f"{path}: its autoencoder makes {latent_shape_text(source)}, which the model "
                              f"config {config.name!r} cannot take: {err}") from None


def load_model(path: str | Path, device: torch.device | str = "cpu", *, need_dit: bool = True) -> ModelFiles:
    """Read a model directory (shapes are checked when the weights are loaded into modules).

    A directory from ``worldloop train vae`` holds only the autoencoder: its ``dit`` is None when
    ``need_dit`` is False, and a clear error otherwise.
    """
    path = Path(path)
    config, metadata = read_config(path)
    ema = read_state(path / EMA_FILE, device)[0] if state_exists(path / EMA_FILE) else None
    dit: dict[str, Tensor] | None
    if ema is not None and not state_exists(path / DIT_FILE):
        dit = ema  # an exported (shipping) directory: the EMA weights are the model
    elif metadata.get("stage") == "vae" and not state_exists(path / DIT_FILE):
        if need_dit:
            raise CheckpointError(f"{path}: holds only an autoencoder (no DiT weights); train a world "
                                  f"model on it with `worldloop train teacher --vae {path}`")
        dit = None
    else:
        dit, _ = read_state(path / DIT_FILE, device)
    vae, _ = read_state(path / VAE_FILE, device)
    return ModelFiles(config, metadata, dit, ema, vae)


def export_model(source: str | Path, out: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                 note: str | None = None, steps: int | None = None, report: dict[str, Any] | None = None
                 ) -> Path:
    """The shipping form of a model directory: config, EMA weights (else the raw ones) in ``dtype``, VAE,
    its bank of looks if it has one, and its model card (with this model's figures from the ``worldloop
    eval`` ``report``, if given).

    ``steps`` sets the denoising steps it plays with (its first frame keeps at least as many).

    The copy is written beside ``out`` and renamed over it only once complete, and it is loaded back and
    checked against the config before that, so a failed export leaves the previous ``out`` as it was.
    """
    source, out = Path(source), Path(out)
    files = load_model(source)
    weights = files.dit_ema if files.dit_ema is not None else files.dit
    tmp, old = out.with_name(out.name + ".export-tmp"), out.with_name(out.name + ".export-old")
    for leftover in (tmp, old):  # from an export that was interrupted
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_state(tmp / EMA_FILE, weights, dtype=dtype)
    save_state(tmp / VAE_FILE, files.vae)
    meta = files.metadata | {"exported_from": str(source), "exported": _now(),
                             "weights": "ema" if files.dit_ema is not None else "raw"}
    if note:
        meta["note"] = note
    config = files.config
    if steps is not None:
        sampling = dataclasses.replace(config.sampling, steps=steps,
                                       first_frame_steps=max(steps, config.sampling.first_frame_steps))
        config = config.replace(sampling=sampling)
    _write_config(tmp, config, meta)
    if (source / LOOKS_FILE).is_file():  # the bank of looks travels with the weights (``worldloop looks``)
        shutil.copyfile(source / LOOKS_FILE, tmp / LOOKS_FILE)
    write_model_card(tmp, report)
    _check_shapes(load_model(tmp), tmp)
    if out.exists():
        out.replace(old)
    tmp.replace(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def write_model_card(path: str | Path, report: dict[str, Any] | None = None) -> Path:
    """Write the model card ``README.md`` of the model directory ``path`` (``models/model_card.py``), with
    this model's figures from a ``worldloop eval`` ``report`` when given; returns its path."""
    path = Path(path)
    config, metadata = read_config(path)
    weights = {Path(name).stem: sum(math.prod(shape) for shape in shapes.values())
               for name in (DIT_FILE, EMA_FILE, VAE_FILE) if (shapes := read_header_shapes(path / name))}
    files = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file() and f.name != CARD_FILE}
    evals = eval_rows(report, path, metadata) if report else []
    (path / CARD_FILE).write_text(model_card(config, metadata, weights, files, evals))
    return path / CARD_FILE


def _check_shapes(files: ModelFiles, root: Path) -> None:
    """Load the weights into modules built from the config (raises CheckpointError on any mismatch)."""
    load_into(DiT(files.config), files.dit, root / EMA_FILE)
    load_into(LatentAutoencoder(files.config), files.vae, root / VAE_FILE)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()
