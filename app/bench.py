"""Speed and memory of a world model as a player gets it: the library behind ``worldloop bench``.

The measurement pieces it shares with ``benchmarks/`` live in ``models/timing.py`` and
``streaming/measure.py``. Phases of ``run_bench``, in order, on one loaded model:

1. Time to first frame: model load (weights and prompt encoder), the start's world frames (``--start
   world``, as ``worldloop play``: a fresh built-in world rendered), a new session (encoding those frames
   into its cache), its first frame (decode and JPEG encode; the first-frame steps when it starts from the
   prompt alone), each timed separately.
2. Steady state: after a warm-up that fills the window, N frames of one session, each stepped, decoded and
   JPEG-encoded; end-to-end FPS and per-part milliseconds (DiT with the fused cache pass, decode, encode).
3. Serving: an ``Engine`` and a ``WorldloopServer`` in this process on 127.0.0.1 (a free port) and a real
   websocket client: frames delivered per second, and key-to-frame latency — from sending `keys` to the
   first frame whose header says that key seq was applied.
4. Memory: peak RSS of the process (and the CUDA allocator's peak on a GPU), before the probe below.
5. Sessions held at the target FPS: the engine steps 1, 2, 4, … sessions in one batch until the slowest
   session's delivered FPS falls below the target, then bisects; encoding included, websockets not.

``compare_backends`` runs phases 2 and 3 for every backend × thread count × step count in one process, one
after another, so their ratios are measured under the same load (``worldloop bench --compare``).

Timings are host wall clock. On CUDA the DiT time is mostly launch time and the decode time includes
waiting for the GPU; the end-to-end figures are exact either way.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import torch

from worldloop.app.loading import ModelChoice, load_model
from worldloop.app.starts import WorldStart, context_frames
from worldloop.models.timing import hardware, load_average, memory, percentile, summary, sync
from worldloop.models.world_model import FrameTimings, WorldModel
from worldloop.streaming.client import WorldloopClient
from worldloop.streaming.engine import Engine
from worldloop.streaming.measure import key_latencies, run_frames, sustained_fps
from worldloop.streaming.server import ServerConfig, WorldloopServer
from worldloop.streaming.session import Frame, SessionOptions, Starts, start_kwargs

PROMPT = "a dark stone dungeon with torch-lit walls"
HOLD_TOLERANCE = 0.05  # a session "holds" the target at ≥ 95% of it: window edges cost a frame or two


@dataclass(frozen=True)
class BenchOptions:
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    steps: int | None = None  # denoising steps per frame (None: the model's)
    frames: int = 150  # timed steady-state frames
    warmup: int = 10  # untimed frames after the window has filled
    quality: int = 80  # JPEG quality
    serve_seconds: float = 5.0  # the served-FPS measurement
    trials: int = 40  # key changes for the key-to-frame latency
    target_fps: int | None = None  # None: the model's FPS
    max_sessions_probe: int = 0  # 0: skip the concurrency probe
    probe_seconds: float = 2.0  # each probed batch size
    encode_workers: int = 2  # the engine's JPEG pool (worldloop serve uses 2)
    seed: int = 0
    backend: str = "torch"  # what runs the DiT and the decoder (models/onnx_runtime.py)
    start: str = "world"  # sessions start from a fresh built-in world's frames, or "prompt" (none)


def first_frame(choice: ModelChoice, options: BenchOptions) -> tuple[WorldModel, Any, dict[str, float]]:
    """Load the model, open a session (rendering its world start first, unless it starts from the prompt),
    make its first frame: the model, the session and the times."""
    start = time.perf_counter()
    wm = load_model(choice, device=options.device, steps=options.steps, seed=options.seed, max_sessions=1,
                    backend=options.backend)
    sync(wm.device)
    loaded = time.perf_counter()
    frames = _starts(wm, options).frames(options.start, PROMPT, options.seed, None)  # type: ignore[arg-type]
    rendered = time.perf_counter()
    session = wm.new_session(PROMPT, seed=options.seed, **start_kwargs(frames))
    sync(wm.device)
    opened = time.perf_counter()
    samples = run_frames(wm, [session], 1, quality=options.quality)
    return wm, session, {"model_load_s": round(loaded - start, 3), "start": options.start,
                         "world_start_ms": round((rendered - loaded) * 1e3, 2),
                         "new_session_ms": round((opened - rendered) * 1e3, 2),
                         "first_frame_ms": round(samples.wall_ms[0], 2),
                         "total_s": round(time.perf_counter() - start, 3)}


def _starts(wm: WorldModel, options: BenchOptions) -> Starts:
    """Where the bench's sessions start, as in ``worldloop play``."""
    world = WorldStart(*wm.frame_shape, context_frames(wm.config))
    return Starts(world, default=options.start)  # type: ignore[arg-type]


def steady_state(wm: WorldModel, session: Any, options: BenchOptions) -> dict[str, Any]:
    """End-to-end FPS and per-part ms of one session, after the window has filled."""
    dit = wm.config.dit
    run_frames(wm, [session], max(0, dit.sink + dit.window - session.frame_index) + options.warmup,
               quality=options.quality)
    start = time.perf_counter()
    s = run_frames(wm, [session], options.frames, quality=options.quality)
    elapsed = time.perf_counter() - start
    other = [w - d - c - e for w, d, c, e in zip(s.wall_ms, s.dit_ms, s.decode_ms, s.encode_ms, strict=True)]
    return {
        "frames": options.frames,
        "fps": round(options.frames / elapsed, 2),
        "cpu_ms_per_frame": round(statistics.median(s.cpu_ms), 3),
        "dit_forwards_per_frame": s.forwards,
        "ms": {"frame": summary(s.wall_ms), "dit": summary(s.dit_ms), "decode": summary(s.decode_ms),
               "encode": summary(s.encode_ms), "other": summary(other)},
    }


# ---- the websocket path ----------------------------------------------------------------------------------

async def _served(engine: Engine, options: BenchOptions, fps: int, warmup_s: float) -> dict[str, Any]:
    config = ServerConfig(host="127.0.0.1", port=0, ping_interval_s=None)  # port 0: a free one
    async with WorldloopServer(engine, config) as server:
        async with WorldloopClient(f"ws://127.0.0.1:{server.port}/ws") as client:
            start = time.perf_counter()
            await client.start(PROMPT, seed=options.seed, fps=fps, quality=options.quality)
            await client.next_frame(60)
            start_ms = (time.perf_counter() - start) * 1e3
            await sustained_fps(client, warmup_s)
            served = await sustained_fps(client, options.serve_seconds)
            latencies = await key_latencies(client, options.trials, fps, options.seed)
            stats = await client.stats()
    return {"target_fps": fps, "fps": round(served, 2), "start_to_first_frame_ms": round(start_ms, 1),
            "key_to_frame_ms": {"p50": round(percentile(latencies, 0.5), 2),
                                "p95": round(percentile(latencies, 0.95), 2),
                                "mean": round(statistics.fmean(latencies), 2), "trials": len(latencies)},
            "speculative_kept": stats.speculative_kept, "speculative_discarded": stats.speculative_discarded,
            "deadlines_missed": stats.deadlines_missed}


def serving(wm: WorldModel, options: BenchOptions, fps: int, trained: bool) -> dict[str, Any]:
    """One session through a real server and websocket client, in this process."""
    engine = Engine(wm, max_sessions=1, fps=fps, encode_workers=options.encode_workers, trained=trained,
                    starts=_starts(wm, options))
    engine.start()
    try:
        return asyncio.run(_served(engine, options, fps, _warmup_seconds(wm, fps)))
    finally:
        engine.close()


def _warmup_seconds(wm: WorldModel, fps: int) -> float:
    """Long enough for the first frame and a full window at the target FPS."""
    return max(1.0, (wm.config.dit.sink + wm.config.dit.window) / fps + 0.5)


# ---- concurrent sessions -----------------------------------------------------------------------------------

def _probe(engine: Engine, wm: WorldModel, sessions: int, options: BenchOptions, fps: int) -> dict[str, Any]:
    """FPS each of ``sessions`` sessions gets from the engine (frames encoded, not sent)."""
    counts = [0] * sessions
    calls: list[FrameTimings] = []

    def counter(i: int) -> Callable[[Frame], None]:
        def on_frame(frame: Frame) -> None:
            counts[i] += 1  # one lane per session: never two threads on one counter
        return on_frame

    handles = [engine.open_session(SessionOptions(PROMPT, options.seed + i, fps=fps, quality=options.quality),
                                   on_frame=counter(i)) for i in range(sessions)]
    try:
        for handle in handles:
            handle.started.result(timeout=300)
        time.sleep(_warmup_seconds(wm, fps))
        wm.on_timings = calls.append
        before, start = list(counts), time.monotonic()
        time.sleep(options.probe_seconds)
        after, elapsed = list(counts), time.monotonic() - start
    finally:
        wm.on_timings = None
        for future in [h.close() for h in handles]:
            future.result(timeout=60)
    each = [(b - a) / elapsed for a, b in zip(before, after, strict=True)]
    return {"sessions": sessions, "fps_min": round(min(each), 2),
            "fps_median": round(statistics.median(each), 2),
            "held": min(each) >= fps * (1 - HOLD_TOLERANCE),
            "frame_ms_median": round(statistics.median(t.total_ms for t in calls), 2) if calls else None,
            "batch_median": statistics.median(t.batch for t in calls) if calls else None}


def largest_passing(limit: int, passes: Callable[[int], bool]) -> int:
    """The largest n in 1..limit with ``passes(n)``, 0 if none; ``passes`` must be monotone (true, then
    false). Doubling from 1, then bisection between the last pass and the first failure."""
    held, failed, size = 0, None, 1
    while failed is None and held < limit:
        if passes(size):
            held, size = size, min(2 * size, limit)
        else:
            failed = size
    while failed is not None and failed - held > 1:
        middle = (held + failed) // 2
        held, failed = (middle, failed) if passes(middle) else (held, middle)
    return held


def sessions_at_target(wm: WorldModel, options: BenchOptions, fps: int, trained: bool) -> dict[str, Any]:
    """The most sessions the engine serves at ``fps`` each, up to ``options.max_sessions_probe``."""
    limit = options.max_sessions_probe
    precision = "bf16" if wm.dtype == torch.bfloat16 else "fp32"
    # The same modules with a cache pool large enough for the probe.
    pool = WorldModel(wm.config, wm.dit, wm.vae, wm.prompt_encoder, device=wm.device, max_sessions=limit,
                      steps=wm.steps, precision=precision, backend=wm.backend,
                      onnx_dir=wm.executor.folder if wm.executor is not None else None)
    engine = Engine(pool, max_sessions=limit, fps=fps, encode_workers=options.encode_workers, trained=trained)
    engine.start()
    probes: list[dict[str, Any]] = []

    def holds(sessions: int) -> bool:
        probes.append(_probe(engine, pool, sessions, options, fps))
        return bool(probes[-1]["held"])

    try:
        held = largest_passing(limit, holds)
    finally:
        engine.close()
    return {"probed": True, "target_fps": fps, "max_sessions_probe": limit, "sessions_held": held,
            "limit_reached": held == limit, "probes": probes, "memory": memory(wm.device)}


# ---- the whole run ---------------------------------------------------------------------------------------

def model_info(choice: ModelChoice, wm: WorldModel) -> dict[str, Any]:
    dit_params = sum(p.numel() for p in wm.dit.parameters())
    vae_params = sum(p.numel() for p in wm.vae.parameters())
    return {"name": wm.config.name, "preset": choice.preset or wm.metadata.get("preset"),
            "path": str(choice.path) if choice.path is not None else None, "trained": choice.trained,
            "warning": choice.warning(),
            "params": dit_params + vae_params, "dit_params": dit_params, "vae_params": vae_params,
            "frame_size": list(wm.frame_shape), "tokens_per_frame": wm.config.tokens_per_frame,
            "steps": wm.steps, "first_frame_steps": wm.config.sampling.first_frame_steps,
            "dtype": str(wm.dtype).removeprefix("torch."), "fps": wm.config.fps, "backend": wm.backend}


def run_bench(choice: ModelChoice, options: BenchOptions,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every phase of the module docstring → one JSON-ready report."""
    say = progress or (lambda message: None)
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    device = torch.device(options.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    report: dict[str, Any] = {"tool": "worldloop bench", "version": 1,
                              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "hardware": hardware(options.device),
                              "load_average": {"before": load_average()}, "options": asdict(options)}
    say("loading the model and making its first frame")
    wm, session, report["first_frame"] = first_frame(choice, options)
    report["model"] = model_info(choice, wm)
    fps = options.target_fps or wm.config.fps
    report["options"]["target_fps"] = fps
    say(f"steady state: {options.frames} frames")
    report["steady"] = steady_state(wm, session, options)
    wm.close_session(session)
    say(f"serving: {options.serve_seconds:g} s of frames and {options.trials} key changes over a websocket")
    report["serving"] = serving(wm, options, fps, choice.trained)
    report["memory"] = memory(device)
    if options.max_sessions_probe > 0:
        say(f"concurrent sessions at {fps} FPS (up to {options.max_sessions_probe})")
        report["concurrency"] = sessions_at_target(wm, options, fps, choice.trained)
    else:
        report["concurrency"] = {"probed": False, "target_fps": fps, "max_sessions_probe": 0}
    report["load_average"]["after"] = load_average()
    return report


def compare_backends(choice: ModelChoice, options: BenchOptions, backends: Sequence[str],
                     steps: Sequence[int], threads: Sequence[int],
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Steady state and serving for every thread count × backend × step count, one after another in this
    process (one model load per thread count and backend): a side-by-side table measured under one load."""
    say = progress or (lambda message: None)
    report: dict[str, Any] = {"tool": "worldloop bench --compare", "version": 1,
                              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "hardware": hardware(options.device),
                              "load_average": {"before": load_average()}, "options": asdict(options),
                              "runs": []}
    for count in threads:
        torch.set_num_threads(count)
        for backend in backends:
            say(f"{backend}, {count} thread(s): loading")
            start = time.perf_counter()
            wm = load_model(choice, device=options.device, seed=options.seed, max_sessions=1,
                            backend=backend)
            load_s = time.perf_counter() - start
            report.setdefault("model", model_info(choice, wm))
            fps = options.target_fps or wm.config.fps
            for n in steps:
                say(f"{backend}, {count} thread(s), {n} step(s): {options.frames} frames, then serving")
                wm.steps = n
                session = wm.new_session(PROMPT, seed=options.seed)
                steady = steady_state(wm, session, options)
                wm.close_session(session)
                served = serving(wm, options, fps, choice.trained)
                report["runs"].append({"backend": backend, "threads": count, "steps": n,
                                       "model_load_s": round(load_s, 2), "steady": steady, "serving": served})
    report["load_average"]["after"] = load_average()
    return report
