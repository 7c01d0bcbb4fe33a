"""The one-call GPU check (``worldloop gpu-check``, run by ``scripts/gpu_check.sh``): CUDA checks, then a
speedrun on the rest of the time, everything written to one folder.

1. The CUDA checks, each bounded by what is left of ``checks_s`` (a check that cannot start in time is
   recorded as skipped), each recorded as ``{"name", "ok", "seconds", ...figures}`` or with its ``error``:

   - ``flex_cached_equals_full``: the teacher-forcing forward under flex-attention block masks equals the
     same forward under SDPA with a boolean mask, and equals the frame-by-frame cached rollout (a KV cache
     past the window, so eviction is in play);
   - ``bf16_matches_fp32``: the forward under bf16 autocast tracks float32;
   - ``batch_equals_alone``: sessions stepped in one batch give the frames they give alone;
   - ``nccl``: a one-process NCCL group all-reduces;
   - ``wan_frame_time``: the ``wan`` preset's (1.83B parameters, 480×832) DiT milliseconds per frame;
   - ``bench``: ``worldloop bench --device cuda --max-sessions-probe`` on the ``default`` preset: FPS,
     key-to-frame latency and the sessions held at 30 FPS;
   - ``compile_matches_eager``: ``torch.compile`` of the teacher loss gives eager's loss and gradients
     (and how long compiling took).

   The checks take a preset (``default``, ``wan``); the tests run the first four on ``tiny`` on the CPU, which
   shows the checks themselves work, not the CUDA paths.

   Without CUDA every check is recorded as skipped ("no CUDA"), so the same command dry-runs on a CPU.
2. ``speedrun`` with the time left (less a margin for the copy), in a work folder.
3. Into ``out``: ``gpu_check.json`` (rewritten after every step, so a crash or a kill leaves what was done),
   ``report.md``, ``curves.png`` and ``bundle.tar.000``, ``.001``, … — the student (``model/``), the teacher
   (``teacher/model/``), the plan and the logs as one tar in parts of at most ``MAX_FILE_BYTES``
   (``unbundle``; or ``cat bundle.tar.* | tar -x``): at most ``MAX_FILES`` files in all.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from worldloop.models.config import ModelConfig, preset
from worldloop.models.timing import hardware

MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20
COPY_MARGIN_S = 20.0  # kept back from the speedrun for copying the results
# Compiling the training loss may take minutes: last, so it cannot crowd out the others.
CHECKS = ("flex_cached_equals_full", "bf16_matches_fp32", "batch_equals_alone", "nccl", "wan_frame_time",
          "bench", "compile_matches_eager")
# Pass marks: relative L2 error ‖a − b‖ / ‖b‖ (float32 paths differ only in summation order; bf16 rounds).
FP32_TOL, BF16_TOL, GRAD_TOL = 1e-3, 3e-2, 1e-2


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def perturbed_dit(config: ModelConfig, device: torch.device, seed: int = 0) -> Any:
    """A DiT whose zero-initialised layers are made non-zero, so every path (keys, gates) carries signal."""
    from worldloop.models.dit import DiT

    torch.manual_seed(seed)
    dit = DiT(config).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return dit.to(device)


def clip_inputs(config: ModelConfig, frames: int, device: torch.device, batch: int = 2, seed: int = 1
                ) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, frames, config.latent_channels, *config.latent_size)
    data = {"clean": torch.randn(shape, generator=g), "noisy": torch.randn(shape, generator=g),
            "sigma": torch.rand(batch, frames, generator=g),
            "keys": (torch.rand(batch, frames, config.dit.num_keys, generator=g) > 0.5).float(),
            "tokens": torch.randn(batch, 5, config.dit.text_dim, generator=g)}
    return {k: v.to(device) for k, v in data.items()}


def full_forward(dit: Any, data: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = torch.ones(data["tokens"].shape[:2], dtype=torch.bool, device=data["tokens"].device)
    prompt = dit.prompt_kv(data["tokens"], mask)
    return dit(data["noisy"], data["sigma"], data["keys"], prompt, context=data["clean"])


def cached_forward(dit: Any, config: ModelConfig, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Frame by frame against a KV cache (``models.consistency.cached_rollout``)."""
    from worldloop.models.consistency import cached_rollout

    b, device = data["noisy"].shape[0], data["noisy"].device
    prompt = dit.prompt_kv(data["tokens"], torch.ones(b, data["tokens"].shape[1], dtype=torch.bool,
                                                      device=device))
    return cached_rollout(dit, config, data["noisy"], data["sigma"], data["keys"], data["clean"], prompt)


# ----------------------------------------------------------------------------------------------------------
# The checks: each returns its figures and "ok"


@torch.no_grad()
def check_flex(device: torch.device, preset_name: str = "default") -> dict[str, Any]:
    config = preset(preset_name)
    dit = perturbed_dit(config, device)
    data = clip_inputs(config, config.dit.sink + config.dit.window + 3, device)
    dit.attention_kernel = "flex"
    flex = full_forward(dit, data)
    dit.attention_kernel = "sdpa"
    sdpa = full_forward(dit, data)
    cached = cached_forward(dit, config, data)
    flex_vs_sdpa, cached_vs_flex = relative_error(flex, sdpa), relative_error(cached, flex)
    return {"ok": max(flex_vs_sdpa, cached_vs_flex) < FP32_TOL, "flex_vs_sdpa": flex_vs_sdpa,
            "cached_vs_flex": cached_vs_flex, "tolerance": FP32_TOL}


@torch.no_grad()
def check_bf16(device: torch.device, preset_name: str = "default") -> dict[str, Any]:
    config = preset(preset_name)
    dit = perturbed_dit(config, device)
    data = clip_inputs(config, config.dit.sink + config.dit.window + 1, device)
    fp32 = full_forward(dit, data)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        bf16 = full_forward(dit, data)
    error = relative_error(bf16.float(), fp32)
    return {"ok": error < BF16_TOL, "bf16_vs_fp32": error, "tolerance": BF16_TOL}


def check_compile(device: torch.device, preset_name: str = "default") -> dict[str, Any]:
    from worldloop.distill.stages.teacher import TeacherLoss, TeacherObjective, draw

    config = preset(preset_name)
    data = clip_inputs(config, config.dit.sink + config.dit.window + 1, device)
    mask = torch.ones(data["tokens"].shape[:2], dtype=torch.bool, device=device)
    draws = draw(TeacherObjective(), data["clean"].shape, torch.Generator(device).manual_seed(0), device)
    results = []
    for compiled in (False, True):
        loss_fn = TeacherLoss(perturbed_dit(config, device)).train()
        model = torch.compile(loss_fn) if compiled else loss_fn
        started = time.perf_counter()
        loss = model(data["clean"], data["keys"], data["tokens"], mask, draws).mean()  # per-frame losses
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        grads = torch.cat([p.grad.flatten() for p in loss_fn.parameters() if p.grad is not None])
        results.append((loss.detach(), grads, time.perf_counter() - started))
    (loss_e, grad_e, _), (loss_c, grad_c, first_s) = results
    loss_error, grad_error = relative_error(loss_c, loss_e), relative_error(grad_c, grad_e)
    return {"ok": loss_error < FP32_TOL and grad_error < GRAD_TOL, "loss_vs_eager": loss_error,
            "grad_vs_eager": grad_error, "first_compiled_step_s": first_s,
            "tolerance": [FP32_TOL, GRAD_TOL]}


@torch.no_grad()
def check_batch(device: torch.device, preset_name: str = "default") -> dict[str, Any]:
    from worldloop.models.world_model import WorldModel

    wm = WorldModel.from_config(preset(preset_name), device=device, max_sessions=4, precision="fp32")
    g = torch.Generator().manual_seed(1)
    for p in wm.dit.parameters():  # make the zero-initialised layers non-zero so frames depend on everything
        p.add_(torch.randn(p.shape, generator=g).to(p) * 0.05)
    wm._null_prompt = wm.dit.null_prompt_kv(1)
    keys, worlds = [1, 1, 16, 0, 5, 1, 32, 1, 1, 2, 4, 8], [("dungeon", 1), ("ice cave", 2), ("neon city", 3)]
    alone = []
    for prompt, seed in worlds:
        s = wm.new_session(prompt, seed)
        alone.append(torch.stack([wm.generate([s], [k])[0] for k in keys]))
        wm.close_session(s)
    sessions = [wm.new_session(p, seed) for p, seed in worlds]
    batched = torch.stack([wm.generate(sessions, [k] * len(sessions)) for k in keys], 1)
    error = max(relative_error(batched[i], alone[i]) for i in range(len(worlds)))
    return {"ok": error < FP32_TOL, "batch_vs_alone": error, "sessions": len(worlds), "frames": len(keys),
            "tolerance": FP32_TOL}


def check_nccl(device: torch.device) -> dict[str, Any]:
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("nccl", init_method=f"file://{folder}/rendezvous", rank=0, world_size=1)
        try:
            t = torch.arange(4.0, device=device)
            dist.all_reduce(t)
            ok = t.tolist() == [0.0, 1.0, 2.0, 3.0]
        finally:
            dist.destroy_process_group()
    return {"ok": ok, "nccl_version": ".".join(map(str, torch.cuda.nccl.version()))}


@torch.no_grad()
def check_wan(device: torch.device, preset_name: str = "wan", frames: int = 12) -> dict[str, Any]:
    from worldloop.models.world_model import WorldModel

    wm = WorldModel.from_config(preset(preset_name), device=device, max_sessions=1, steps=1, precision="bf16")
    session = wm.new_session("a dark stone dungeon", seed=0)
    frame, dit, decode = [], [], []
    for i in range(frames + 3):  # the first frames take more steps and fill the cache
        started = time.perf_counter()
        wm.next_frame([session], [1])  # returns host pixels: the GPU's work is done when it returns
        if i >= 3:
            frame.append(1000 * (time.perf_counter() - started))
            dit.append(wm.last_timings.dit_ms)  # host clock: launch-bound on CUDA (app/bench.py)
            decode.append(wm.last_timings.decode_ms)
    params = sum(p.numel() for p in wm.dit.parameters())
    median = statistics.median
    return {"ok": True, "frame_ms_median": median(frame), "dit_ms_median": median(dit),
            "decode_ms_median": median(decode), "params": params,
            "frame_size": list(wm.frame_shape), "tokens_per_frame": wm.config.tokens_per_frame,
            "steps": 1, "precision": "bf16", "frames_timed": frames}


def check_bench(device: torch.device) -> dict[str, Any]:
    from worldloop.app.bench import BenchOptions, run_bench
    from worldloop.app.loading import choose_model

    options = BenchOptions(device=str(device), frames=60, warmup=5, serve_seconds=2.0, trials=12,
                           max_sessions_probe=512, probe_seconds=1.0)
    report = run_bench(choose_model(None, "default", fallback=True), options, progress=lambda m: None)
    c, s = report["concurrency"], report["serving"]
    return {"ok": True, "steady_fps": report["steady"]["fps"], "served_fps": s["fps"],
            "key_to_frame_ms_p50": s["key_to_frame_ms"]["p50"], "sessions_held_at_30fps": c["sessions_held"],
            "limit_reached": c["limit_reached"], "probes": c["probes"], "memory": report["memory"]}


CHECK_FUNCTIONS: dict[str, Callable[[torch.device], dict[str, Any]]] = {
    "flex_cached_equals_full": check_flex, "bf16_matches_fp32": check_bf16,
    "compile_matches_eager": check_compile, "batch_equals_alone": check_batch, "nccl": check_nccl,
    "wan_frame_time": check_wan, "bench": check_bench,
}


def parse_checks(text: str | None) -> tuple[str, ...]:
    """``--checks``: None → every check; ``none`` → none; else names from ``CHECKS``, comma-separated."""
    if text is None:
        return CHECKS
    names = tuple(filter(None, (x.strip() for x in text.split(","))))
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in CHECKS]
    if unknown or not names:
        raise ValueError(f"--checks {text!r}: unknown {', '.join(unknown) or '(empty)'}; choose from "
                         f"{', '.join(CHECKS)} or 'none'")
    return tuple(n for n in CHECKS if n in names)  # in CHECKS' order: compiling stays last


def run_checks(device: torch.device, seconds: float, record: Callable[[dict[str, Any]], None],
               say: Callable[[str], None] = print, names: tuple[str, ...] = CHECKS) -> None:
    """The checks ``names`` in turn while ``seconds`` last; ``record`` receives each result when known."""
    deadline = time.monotonic() + seconds
    for name in names:
        if device.type != "cuda":
            record({"name": name, "ok": None, "skipped": "no CUDA"})
            continue
        if time.monotonic() >= deadline:
            record({"name": name, "ok": None, "skipped": "out of time (the checks' share is spent)"})
            continue
        say(f"gpu-check: {name}")
        started = time.monotonic()
        try:
            result = {"name": name, **CHECK_FUNCTIONS[name](device)}
        except Exception as err:  # a failing check is a result: record it and go on
            result = {"name": name, "ok": False, "error": f"{type(err).__name__}: {err}".splitlines()[0],
                      "traceback": traceback.format_exc().splitlines()[-12:]}
        result["seconds"] = round(time.monotonic() - started, 2)
        record(result)
        say(f"gpu-check: {name}: {'ok' if result['ok'] else 'FAILED'} ({result['seconds']:.1f} s)")
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# The whole call


class Results:
    """``gpu_check.json``, rewritten after every step."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path, self.data = path, data
        self.write()

    def write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)

    def add_check(self, result: dict[str, Any]) -> None:
        self.data["checks"].append(result)
        self.write()


BUNDLE = "bundle.tar"  # split into bundle.tar.000, .001, … of at most MAX_FILE_BYTES each
# What the bundle takes from the speedrun folder: the playable student, the teacher (its EMA weights, for
# continuing or distilling elsewhere; the raw float32 weights would not fit), the plan and every stage's log.
BUNDLED = ("model/**/*", "teacher/model/config.json", "teacher/model/README.md",
           "teacher/model/vae.safetensors", "teacher/model/dit_ema*",
           "speedrun.json", "*/log.jsonl", "*/train.json")


def write_bundle(root: Path, patterns: tuple[str, ...], out: Path) -> list[Path]:
    """The files under ``root`` matching ``patterns`` as one tar (paths relative to ``root``) split into
    ``out/bundle.tar.000``, ``.001``, … of at most ``MAX_FILE_BYTES`` each (earlier parts removed first);
    returns the parts. ``unbundle`` puts them back."""
    import tarfile

    members = sorted({f for pattern in patterns for f in root.glob(pattern) if f.is_file()})
    for stale in out.glob(BUNDLE + ".*"):
        stale.unlink()
    parts: list[Path] = []
    if not members:
        return parts
    whole = out / (BUNDLE + ".tmp")
    with tarfile.open(whole, "w") as tar:
        for f in members:
            tar.add(f, arcname=str(f.relative_to(root)))
    with whole.open("rb") as src:
        while chunk := src.read(MAX_FILE_BYTES):
            parts.append(out / f"{BUNDLE}.{len(parts):03d}")
            parts[-1].write_bytes(chunk)
    whole.unlink()
    return parts


def collect(work: Path, out: Path) -> list[dict[str, Any]]:
    """Copy the report and curves from the speedrun folder and bundle the models (``BUNDLED``: the student
    and the teacher together exceed what 8 files of 16 MiB carry as they are). Returns every file in ``out``
    with its size."""
    for name in ("report.md", "curves.png"):
        if (work / name).is_file():
            shutil.copy2(work / name, out / name)
    write_bundle(work, BUNDLED, out)
    return [{"file": str(f.relative_to(out)), "bytes": f.stat().st_size}
            for f in sorted(p for p in out.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))]


def unbundle(out: Path, dest: Path) -> Path:
    """Join ``out``'s bundle parts and unpack them into ``dest`` (``dest/model`` is the student,
    ``dest/teacher/model`` the teacher); returns ``dest``. Missing or broken parts raise ``ValueError``."""
    import io
    import tarfile

    parts = sorted(out.glob(BUNDLE + ".[0-9][0-9][0-9]"))
    if not parts or [p.name for p in parts] != [f"{BUNDLE}.{i:03d}" for i in range(len(parts))]:
        raise ValueError(f"{out}: no complete {BUNDLE}.000, .001, … parts (found {[p.name for p in parts]})")
    data = b"".join(p.read_bytes() for p in parts)
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(dest, filter="data")
    except tarfile.TarError as err:
        raise ValueError(f"{out}: the bundle does not unpack ({err}); a part is missing or short") from None
    return dest


def gpu_check(out: Path, minutes: float, checks_minutes: float, device: torch.device, preset_name: str,
              work: Path, speedrun_iterations: dict[str, int] | None = None, pool_clips: int = -1,
              checks: tuple[str, ...] = CHECKS, evaluate: bool = True,
              say: Callable[[str], None] = print) -> dict[str, Any]:
    """The checks, then a speedrun on the time left; returns (and writes) ``out/gpu_check.json``."""
    from worldloop.app import speedrun

    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    results = Results(out / "gpu_check.json", {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "minutes": minutes,
        "hardware": hardware(str(device)), "cuda": device.type == "cuda", "checks": [], "speedrun": None})
    run_checks(device, 60 * checks_minutes, results.add_check, say, checks)
    budget = 60 * minutes - (time.monotonic() - started) - COPY_MARGIN_S
    compiled = any(c["name"] == "compile_matches_eager" and c["ok"] for c in results.data["checks"])
    entry: dict[str, Any] = {"budget_s": round(budget, 1), "preset": preset_name, "work": str(work),
                             "ok": None, "progress": []}
    results.data["speedrun"] = entry
    results.write()

    def progress(message: str) -> None:  # each stage's start is on record, should the call be cut short
        say(message)
        if message.startswith(("speedrun", "probe")):
            entry["progress"].append(f"{time.monotonic() - started:.0f} s: {message.splitlines()[0]}")
            if message.startswith("speedrun: eval"):  # the models are final: out now, should the eval overrun
                results.data["files"] = collect(work, out)
            results.write()

    try:
        shutil.rmtree(work, ignore_errors=True)
        options = speedrun.SpeedrunOptions(
            budget_s=budget, out=str(work), preset=preset_name, device=str(device),
            vae=speedrun.default_vae(preset_name), iterations=speedrun_iterations or {},
            bf16=device.type == "cuda", compile=False, pool_clips=pool_clips, evaluate=evaluate)
        entry["compile_checked"] = compiled
        result = speedrun.start(options, resume=False, say=progress)
        entry.update(ok=result.stopped_in is None, state=result.state)
    except Exception as err:  # recorded, and the checks' results still come back
        entry.update(ok=False, error=f"{type(err).__name__}: {err}".splitlines()[0],
                     traceback=traceback.format_exc().splitlines()[-12:])
    results.write()
    files = results.data["files"] = collect(work, out)  # gpu_check.json among them
    too_big = [f["file"] for f in files if f["bytes"] > MAX_FILE_BYTES]
    results.data["files_ok"] = len(files) <= MAX_FILES and not too_big
    results.data["seconds"] = round(time.monotonic() - started, 1)
    results.write()
    return results.data


# ----------------------------------------------------------------------------------------------------------
# What a bare CUDA image lacks: a compact MiniLM (scripts/gpu_pack.py)


def world_prompts(worlds: int = 5000) -> list[str]:
    """Every kind of prompt a speedrun, its eval and the bench use: the built-in world's, the themes'."""
    from worldloop.app.bench import PROMPT
    from worldloop.distill.world.themes import THEMES, describe, sample_params

    prompts = [describe(sample_params(seed)) for seed in range(worlds)]
    prompts += [describe(sample_params(seed, theme)) for theme in THEMES for seed in range(50)]
    return prompts + list(THEMES) + [PROMPT]


def compact_minilm(source: Path, out: Path, prompts: list[str]) -> dict[str, Any]:
    """A copy of the MiniLM directory ``source`` that fits beside the repository in one GPU call: float16
    weights, and only the word-embedding rows of the tokens ``prompts`` use (``models/text.py`` reads every
    other token as [UNK]). Returns its size and the tokens kept."""
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    from worldloop.models.text import KEPT_ROWS, UNK_ID

    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    kept = sorted({UNK_ID, 0, 101, 102, 103} | {i for e in tokenizer.encode_batch(prompts) for i in e.ids})
    weights = {k: v.to(torch.float16) for k, v in load_file(source / "model.safetensors").items()
               if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    rows = torch.tensor(kept)
    weights["embeddings.word_embeddings.weight"] = weights["embeddings.word_embeddings.weight"][rows].clone()
    weights[KEPT_ROWS] = rows
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, out / "model.safetensors")
    for name in ("config.json", "tokenizer.json", "sentence_bert_config.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    size = sum(f.stat().st_size for f in out.iterdir())
    return {"tokens_kept": len(kept), "bytes": size}
