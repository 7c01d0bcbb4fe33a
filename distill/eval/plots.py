"""Plots of an evaluation report (``eval/evaluate.py``): metrics over horizon and time (matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(run: dict[str, Any]) -> str:
    plural = "s" if run["steps"] != 1 else ""
    return f"{Path(run['model']).name or run['model']} ({run['steps']} step{plural})"


def plot_horizons(report: dict[str, Any], path: Path) -> None:
    """PSNR and SSIM against the horizon for every run, with the copy-last-frame baseline dashed."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, run in enumerate(report["runs"]):
        horizons = sorted(int(h) for h in run["horizons"])
        for ax, key in zip(axes, ("psnr", "ssim"), strict=True):
            ax.plot(horizons, [run["horizons"][str(h)][key] for h in horizons], "o-", label=_label(run))
            if i == 0:
                base = [run["horizons"][str(h)][f"copy_last_{key}"] for h in horizons]
                ax.plot(horizons, base, "k--", label="copy last frame")
    for ax, name in zip(axes, ("PSNR (dB)", "SSIM"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("horizon (frames)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_drift(report: dict[str, Any], path: Path) -> None:
    """Classifier confidence, sharpness, saturation and mean colour over the long rollout, model vs engine."""
    plt = _pyplot()
    keys = ("confidence", "sharpness", "saturation", "colour_mean")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5))
    for i, run in enumerate(report["runs"]):
        points = run["drift"]["points"]
        t = [p["seconds"] for p in points]
        for ax, key in zip(axes, keys, strict=True):
            if key not in points[0]["model"]:
                ax.set_title(f"{key} (no classifier)")
                continue
            for who in ("model", "engine") if i == 0 else ("model",):
                values = np.array([p[who][key] for p in points], dtype=float)
                y = values.mean(axis=tuple(range(1, values.ndim)))  # mean over sessions (and channels)
                if who == "model":
                    ax.plot(t, y, "-", label=_label(run))
                else:
                    ax.plot(t, y, "k:", label="engine")
            ax.set_title(key.replace("_", " "))
            ax.set_xlabel("time (s)")
            ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)  # sharpness: plotted with or without a classifier
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
