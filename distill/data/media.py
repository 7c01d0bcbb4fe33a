"""Training samples and evaluation pictures as PNG grids (videos: ``models.media.write_video``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from worldloop.models.vae import to_uint8


def image_grid(rows: Sequence[torch.Tensor | np.ndarray]) -> np.ndarray:
    """Rows of images → one uint8 (H·rows, W·n, 3) picture.

    Each row is float (n, 3, H, W) in [-1, 1] or uint8 (n, H, W, 3); rows must hold the same number of
    images of the same size.
    """
    strips = []
    for row in rows:
        if isinstance(row, torch.Tensor) and row.is_floating_point():
            row = to_uint8(row.detach().float().cpu())
        arr = np.asarray(row.cpu() if isinstance(row, torch.Tensor) else row)
        strips.append(np.concatenate(list(arr), axis=1))  # (H, n·W, 3)
    return np.concatenate(strips, axis=0)


def save_png(path: Path, image: np.ndarray) -> None:
    """Write a uint8 (H, W, 3) image as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1])):  # OpenCV writes BGR
        raise OSError(f"cannot write {path}")


def save_png_grid(path: Path, rows: Sequence[torch.Tensor | np.ndarray]) -> None:
    save_png(path, image_grid(rows))
