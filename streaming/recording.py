"""Session recordings: H.264 in fragmented MP4 (``models.media.VideoWriter``), written frame by frame as a
session plays, so a crashed server loses at most the last fragment (one second) and every finished fragment
plays. ``Mp4Recorder`` may be fed from any thread; it holds a lock.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worldloop.models.media import VideoWriter

# File names the server creates and agrees to serve: no separators, no leading dot, .mp4 only.
RECORDING_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,95}\.mp4")


def is_recording_name(name: str) -> bool:
    return bool(RECORDING_NAME.fullmatch(name))


def new_recording_name(session_id: int) -> str:
    """A fresh, unguessable file name: ``worldloop-<UTC time>-s<session>-<random>.mp4``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"worldloop-{stamp}-s{session_id}-{secrets.token_hex(4)}.mp4"


def recording_path(record_dir: Path, name: str) -> Path:
    """The path of recording ``name`` inside ``record_dir``; ValueError for any name we would not create."""
    if not is_recording_name(name):
        raise ValueError(f"not a recording name: {name[:100]!r}")
    return record_dir / name


@dataclass(frozen=True)
class RecordingInfo:
    name: str
    path: Path
    frames: int
    fps: int


class Mp4Recorder:
    """Appends uint8 RGB frames (H, W, 3) to a fragmented H.264 MP4 at a constant frame rate."""

    def __init__(self, path: Path, width: int, height: int, fps: int, *, crf: int = 23) -> None:
        self.path = Path(path)
        self.width, self.height, self.fps = width, height, int(fps)
        self._lock = threading.Lock()
        self._video = VideoWriter(self.path, width, height, self.fps, crf=crf, fragmented=True)

    @property
    def frames(self) -> int:
        return self._video.frames

    @property
    def closed(self) -> bool:
        return self._video.closed

    def write(self, rgb: np.ndarray) -> None:
        with self._lock:
            if not self._video.closed:
                self._video.write(rgb)

    def close(self) -> RecordingInfo:
        """Flush the encoder and finish the file; safe to call twice."""
        with self._lock:
            self._video.close()
            return RecordingInfo(self.path.name, self.path, self.frames, self.fps)
