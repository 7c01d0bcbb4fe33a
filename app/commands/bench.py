"""``worldloop bench``: how fast a model plays on this machine — first frame, FPS, latency, memory, sessions.

    worldloop bench                                   # what `worldloop play` runs, as play runs it
    worldloop bench --threads 1 --steps 2 --json runs/bench.json
    worldloop bench --model runs/student/model --device cuda --max-sessions-probe 256
    worldloop bench --preset tiny --quick
    worldloop bench --compare     # PyTorch vs ONNX Runtime (float32, int8) at 1/2 steps, 1/2 threads
    worldloop bench --backend onnxruntime --threads 1
    worldloop bench --backend onnxruntime-int8 --threads 1    # int8 graphs (CPUs without native bf16)

Prints a table and (with --json) writes a JSON report naming the hardware, the date, the load average, the
model (trained or random weights) and the options. What each figure means: app/bench.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worldloop.app.errors import UserError
from worldloop.app.loading import (
    BACKENDS,
    CPU_THREADS_RULE,
    add_model_options,
    check_backend,
    choose_model,
    torch_threads,
)

# Full run, --quick run.
FRAMES, WARMUP, TRIALS, SERVE_SECONDS, PROBE_SECONDS = (150, 30), (10, 3), (40, 12), (5.0, 2.0), (2.0, 1.0)
GPU_PROBE = (512, 64)  # largest batch of sessions probed on a GPU (none on a CPU unless asked)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="measure speed, latency and memory of a model on this machine",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    p.add_argument("--threads", type=int, help=f"torch CPU threads (default: as `worldloop play`: "
                                               f"{CPU_THREADS_RULE}; torch's on a GPU)")
    p.add_argument("--quick", action="store_true", help="a short run: fewer frames, trials and seconds")
    p.add_argument("--frames", type=int, help=f"timed steady-state frames (default: {FRAMES[0]}, quick "
                                              f"{FRAMES[1]})")
    p.add_argument("--warmup", type=int, help=f"untimed frames after the window fills (default: {WARMUP[0]})")
    p.add_argument("--trials", type=int, help=f"key changes for the latency (default: {TRIALS[0]})")
    p.add_argument("--serve-seconds", type=float,
                   help=f"served-FPS measurement (default: {SERVE_SECONDS[0]})")
    p.add_argument("--target-fps", type=int, help="FPS each session is served at (default: the model's)")
    p.add_argument("--max-sessions-probe", type=int,
                   help="probe concurrent sessions at the target FPS up to this many "
                        f"(default: {GPU_PROBE[0]} on a GPU, 0 = off on a CPU)")
    p.add_argument("--probe-seconds", type=float, help=f"per probed size (default: {PROBE_SECONDS[0]})")
    p.add_argument("--encode-workers", type=int, default=2,
                   help="JPEG encoder threads of the engine (default: %(default)s, as in `worldloop serve`)")
    p.add_argument("--quality", type=int, default=80, help="JPEG quality (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the sessions")
    p.add_argument("--compare", action="store_true",
                   help="PyTorch and ONNX Runtime side by side: steady state and serving at 1 and 2 steps "
                        "and 1 and 2 threads (or the --steps/--threads given), one run, one table")
    p.add_argument("--start", choices=("world", "prompt"), default="world",
                   help="what sessions start from, as in `worldloop play` (default: %(default)s)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the JSON report here")
    p.set_defaults(func=run)


def _pick(value: Any, defaults: tuple[Any, Any], quick: bool) -> Any:
    return defaults[1 if quick else 0] if value is None else value


def _check(args: argparse.Namespace) -> None:
    limits = [("--threads", args.threads, 1, None), ("--steps", args.steps, 1, 8),
              ("--frames", args.frames, 1, None), ("--warmup", args.warmup, 0, None),
              ("--trials", args.trials, 1, None), ("--target-fps", args.target_fps, 1, 120),
              ("--max-sessions-probe", args.max_sessions_probe, 0, None),
              ("--encode-workers", args.encode_workers, 1, None), ("--quality", args.quality, 1, 100),
              ("--serve-seconds", args.serve_seconds, 0.1, None),
              ("--probe-seconds", args.probe_seconds, 0.1, None)]
    for name, value, low, high in limits:
        if value is None:
            continue
        if value < low or (high is not None and value > high):
            bound = f"in {low}..{high}" if high is not None else f"≥ {low}"
            raise UserError(f"{name} must be {bound}, got {value}")


def run(args: argparse.Namespace) -> int:
    _check(args)
    from worldloop.app.bench import BenchOptions, run_bench

    choice = choose_model(args.model, args.preset, fallback=True)
    if choice.warning():
        print(choice.warning(), file=sys.stderr, flush=True)
    if args.compare:
        return run_compare(args, choice)
    q = args.quick
    options = BenchOptions(
        device=args.device, threads=torch_threads(args.device, args.threads), steps=args.steps,
        frames=_pick(args.frames, FRAMES, q),
        warmup=_pick(args.warmup, WARMUP, q), quality=args.quality,
        serve_seconds=_pick(args.serve_seconds, SERVE_SECONDS, q), trials=_pick(args.trials, TRIALS, q),
        target_fps=args.target_fps,
        max_sessions_probe=_pick(args.max_sessions_probe, GPU_PROBE if args.device != "cpu" else (0, 0), q),
        probe_seconds=_pick(args.probe_seconds, PROBE_SECONDS, q), encode_workers=args.encode_workers,
        seed=args.seed, backend=args.backend, start=args.start)
    return _finish(run_bench(choice, options, progress=_say), args, print_report)


def _say(message: str) -> None:
    print(f"worldloop bench: {message}", file=sys.stderr, flush=True)


def _finish(report: dict[str, Any], args: argparse.Namespace, show: Callable[[dict[str, Any]], None]) -> int:
    """Print the report and write it as JSON when asked."""
    report["options"]["quick"] = args.quick
    show(report)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report: {args.json}")
    return 0


def _ms(part: dict[str, float]) -> str:
    return f"{part['median']:.2f} / {part['p90']:.2f}"


def _rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    hw, m, ff, st, sv = r["hardware"], r["model"], r["first_frame"], r["steady"], r["serving"]
    mem = r["memory"]
    weights = "trained" if m["trained"] else "[bold red]RANDOM (untrained) weights[/]"
    rows = [
        ("hardware", f"{hw['cpu']}, {hw['cores']} cores ({hw['cores_available']} usable), "
                     f"{hw['torch_threads']} torch threads" + (f", {hw['gpu']}" if hw["gpu"] else "")),
        ("torch / date", f"{hw['torch']} / {r['date']}"),
        ("load average before / after", " / ".join(" ".join(f"{x:.2f}" for x in r["load_average"][w])
                                                   for w in ("before", "after"))),
        ("model", f"{m['name']} ({m['path'] or 'preset ' + str(m['preset'])}), "
                  f"{m['params'] / 1e6:.2f}M params, {m['frame_size'][0]}×{m['frame_size'][1]}, "
                  f"{m['dtype']}, {weights}"),
        ("device / backend / steps", f"{hw['device']} / {m.get('backend', 'torch')} / {m['steps']} "
                                     f"(first frame {m['first_frame_steps']})"),
        ("model load", f"{ff['model_load_s']:.2f} s"),
        (f"start ({ff['start']}) / new session / first frame",
         f"{ff['world_start_ms']:.1f} ms / {ff['new_session_ms']:.1f} ms / {ff['first_frame_ms']:.1f} ms"),
        (f"steady FPS ({st['frames']} frames, end to end)", f"{st['fps']:.1f}"),
    ]
    rows += [(f"  {name} ms (median / p90)", _ms(st["ms"][name]))
             for name in ("frame", "dit", "decode", "encode", "other")]
    lat = sv["key_to_frame_ms"]
    rows += [
        (f"served FPS (target {sv['target_fps']})", f"{sv['fps']:.1f}"),
        ("key→frame ms (p50 / p95)", f"{lat['p50']:.1f} / {lat['p95']:.1f}  ({lat['trials']} key changes)"),
        ("start→first frame (websocket)", f"{sv['start_to_first_frame_ms']:.1f} ms"),
        ("peak RSS", f"{mem['peak_rss_mib']:.0f} MiB"
         + (f", CUDA max allocated {mem['cuda_max_allocated_mib']:.0f} MiB"
            if mem["cuda_max_allocated_mib"] is not None else "")),
    ]
    c = r["concurrency"]
    if c["probed"]:
        sizes = ", ".join(f"{p['sessions']}:{p['fps_min']:.0f}" for p in c["probes"])
        more = "+" if c["limit_reached"] else ""
        rows.append((f"sessions held at {c['target_fps']} FPS",
                     f"{c['sessions_held']}{more}  (sessions: slowest FPS — {sizes})"))
    else:
        rows.append(("sessions held at target FPS", "not probed (--max-sessions-probe N)"))
    return rows


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="worldloop bench", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for name, value in _rows(report):
        table.add_row(name, value)
    Console().print(table)


def run_compare(args: argparse.Namespace, choice: Any) -> int:
    """``--compare``: every backend × threads × steps, one table (app/bench.py ``compare_backends``)."""
    from worldloop.app.bench import BenchOptions, compare_backends

    if args.device != "cpu":
        raise UserError("--compare measures the CPU backends: use --device cpu")
    backends: tuple[str, ...] = BACKENDS
    if choice.config.camera.reproject:  # onnxruntime does not run them yet: torch alone, said so
        _say("onnxruntime does not run reprojecting models (camera.reproject) yet: comparing torch only")
        backends = ("torch",)
    for backend in backends:
        check_backend(backend, args.device)
    q = args.quick
    options = BenchOptions(frames=_pick(args.frames, FRAMES, q), warmup=_pick(args.warmup, WARMUP, q),
                           quality=args.quality, serve_seconds=_pick(args.serve_seconds, SERVE_SECONDS, q),
                           trials=_pick(args.trials, TRIALS, q), target_fps=args.target_fps,
                           encode_workers=args.encode_workers, seed=args.seed)
    steps = (args.steps,) if args.steps else (1, 2)
    threads = (args.threads,) if args.threads else (1, 2)
    report = compare_backends(choice, options, backends, steps, threads, progress=_say)
    return _finish(report, args, print_comparison)


def print_comparison(report: dict[str, Any]) -> None:
    """One row per threads × steps × backend; the last column: FPS relative to PyTorch at the same setting."""
    from rich.console import Console
    from rich.table import Table

    m, hw = report["model"], report["hardware"]
    loads = " → ".join(f"{report['load_average'][w][0]:.2f}" for w in ("before", "after"))
    title = (f"worldloop bench --compare: {m['name']} ({m['path'] or 'preset ' + str(m['preset'])}, "
             f"{'trained' if m['trained'] else 'RANDOM weights'}), {hw['cpu']}, load {loads}")
    table = Table(title=title)
    for name in ("threads", "steps", "backend", "FPS", "frame ms p50/p90", "CPU ms/frame", "DiT ms",
                 "decode ms", "served FPS", "key→frame p50/p95", "FPS vs torch"):
        table.add_column(name, justify="left" if name == "backend" else "right")
    base = {(r["threads"], r["steps"]): r["steady"]["fps"] for r in report["runs"] if r["backend"] == "torch"}
    for r in report["runs"]:
        st, sv = r["steady"], r["serving"]
        lat, ms = sv["key_to_frame_ms"], st["ms"]
        torch_fps = base.get((r["threads"], r["steps"]))
        table.add_row(str(r["threads"]), str(r["steps"]), r["backend"], f"{st['fps']:.1f}",
                      f"{ms['frame']['median']:.1f} / {ms['frame']['p90']:.1f}",
                      f"{st['cpu_ms_per_frame']:.1f}",
                      f"{ms['dit']['median']:.1f}", f"{ms['decode']['median']:.1f}", f"{sv['fps']:.1f}",
                      f"{lat['p50']:.0f} / {lat['p95']:.0f}",
                      f"{st['fps'] / torch_fps:.2f}×" if torch_fps else "")
    Console(width=200).print(table)
