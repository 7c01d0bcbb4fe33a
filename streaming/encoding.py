"""Frame images to bytes and back (JPEG/WebP through OpenCV), and ordered work on a shared thread pool.

OpenCV releases the GIL while it encodes, so a small ``ThreadPoolExecutor`` encodes frames of several
sessions in parallel with the generation thread. Each session's frames must still reach its client (and its
recording) in order; ``SerialLane`` gives that: the tasks of one lane run one at a time, in submission
order, on the shared pool.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor

import cv2
import numpy as np

log = logging.getLogger(__name__)

FORMATS = ("jpeg", "webp")


def encode_image(rgb: np.ndarray, image_format: str = "jpeg", quality: int = 80) -> bytes:
    """uint8 RGB (H, W, 3) → JPEG or WebP bytes."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 RGB (H, W, 3), got {rgb.dtype} {rgb.shape}")
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if image_format == "jpeg":
        ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    elif image_format == "webp":
        ok, data = cv2.imencode(".webp", bgr, [cv2.IMWRITE_WEBP_QUALITY, int(quality)])
    else:
        raise ValueError(f"unknown image format {image_format!r}; choose one of {', '.join(FORMATS)}")
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {rgb.shape} frame as {image_format}")
    return data.tobytes()


def decode_image(data: bytes) -> np.ndarray:
    """JPEG or WebP bytes → uint8 RGB (H, W, 3)."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"could not decode a {len(data)}-byte image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class SerialLane:
    """Runs submitted callables one at a time, in order, on a shared executor.

    A task that raises is logged and does not stop the lane. ``submit`` returns False once the executor
    has shut down.
    """

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._lock = threading.Lock()
        self._tasks: deque[Callable[[], None]] = deque()
        self._running = False

    def submit(self, task: Callable[[], None]) -> bool:
        with self._lock:
            self._tasks.append(task)
            if self._running:
                return True
            self._running = True
        try:
            self._executor.submit(self._drain)
        except RuntimeError:  # executor shut down
            with self._lock:
                self._tasks.clear()
                self._running = False
            return False
        return True

    def pending(self) -> int:
        with self._lock:
            return len(self._tasks)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._tasks:
                    self._running = False
                    return
                task = self._tasks.popleft()
            try:
                task()
            except Exception:
                log.exception("frame output task failed")
