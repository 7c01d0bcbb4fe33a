"""Timing and hardware facts every measurement shares (``worldloop bench`` and ``benchmarks/``):
percentiles, device sync, process CPU time, load average, the CPU's name, a hardware summary, peak memory.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

MIB = 2**20


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 1]."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "p90": round(percentile(values, 0.9), 3)}


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> float:
    """Process CPU time (user + system), all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's word for it elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: str) -> dict[str, Any]:
    """CPU model, cores, torch threads and version, GPU name (None without one)."""
    cpu = cpu_name()
    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    return {"cpu": cpu, "cores": os.cpu_count(), "cores_available": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "device": device, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def memory(device: torch.device) -> dict[str, float | None]:
    """Peak RSS of this process so far, and the CUDA allocator's peak on a GPU (MiB)."""
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    cuda = round(torch.cuda.max_memory_allocated(device) / MIB, 1) if device.type == "cuda" else None
    return {"peak_rss_mib": round(peak_kib / 1024, 1), "cuda_max_allocated_mib": cuda}
