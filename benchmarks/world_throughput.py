"""Built-in world throughput: batched frames per second of ``World.next_frame`` with the scripted explorer.

For each device (the CPU, and CUDA when present), frame size and batch of worlds: the time to build the
worlds (mazes, textures, light maps) and the steady frames/s of explorer + step (motion and rendering), best
of a few timed runs. Prints a table and one JSON line.

    python benchmarks/world_throughput.py                          # 64² and 128², 256 and 2048 worlds
    python benchmarks/world_throughput.py --sizes 64 --batches 256 --steps 4 --threads 1

Other processes on a 2-core machine skew timings: pin threads (--threads), look at the load average in the
header, and run it more than once.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from worldloop.distill.world import Explorer, World
from worldloop.models.timing import cpu_name


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device: torch.device, size: int, batch: int, steps: int, repeats: int) -> dict[str, float]:
    _sync(device)
    start = time.perf_counter()
    world = World(range(batch), size, size, device)
    explorer = Explorer(world.seeds)
    _sync(device)
    build = time.perf_counter() - start
    world.next_frame(explorer.act(world))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            world.next_frame(explorer.act(world))
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return {"device": device.type, "size": size, "worlds": batch, "build_s": round(build, 3),
            "step_ms": round(best / steps * 1e3, 2), "frames_per_s": round(batch * steps / best)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs; the best counts")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-cuda", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.no_cuda:
        devices.append(torch.device("cuda"))
    hardware = {"cpu": cpu_name(), "cpu_threads": args.threads, "torch": torch.__version__,
                "load_average": [round(x, 2) for x in os.getloadavg()]}
    if len(devices) > 1:
        hardware["gpu"] = torch.cuda.get_device_name(0)
    print("  ".join(f"{k}: {v}" for k, v in hardware.items()))
    print(f"{'device':>6} {'size':>5} {'worlds':>7} {'build s':>8} {'step ms':>9} {'frames/s':>10}")
    rows = []
    for device in devices:
        for size in args.sizes:
            for batch in args.batches:
                row = measure(device, size, batch, args.steps, args.repeats)
                rows.append(row)
                print(f"{row['device']:>6} {size:>5} {batch:>7} {row['build_s']:>8.2f} "
                      f"{row['step_ms']:>9.1f} {row['frames_per_s']:>10,}")
    print(json.dumps({"benchmark": "world_throughput", "hardware": hardware, "results": rows}))


if __name__ == "__main__":
    main()
