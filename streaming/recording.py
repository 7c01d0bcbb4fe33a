"""Session recordings: H.264 in fragmented MP4, written frame by frame as a session plays.

Fragmented MP4 (``frag_keyframe+empty_moov+default_base_moof``) writes a self-contained fragment at every
keyframe, one per second of video, so a crashed server loses at most the last fragment and every finished
fragment plays. The x264 ``zerolatency`` tune turns off look-ahead and B-frames, so each frame's packet is
written as soon as the frame is encoded. ``Mp4Recorder`` may be fed from any thread; it holds a lock.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

# File names the server creates and agrees to serve: no separators, no leading dot, .mp4 only.
RECORDING_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,95}\.mp4")
# flush_packets: hand every finished fragment to the OS at once instead of filling a 32 KiB buffer first.
MP4_OPTIONS = {"movflags": "frag_keyframe+empty_moov+default_base_moof", "flush_packets": "1"}


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
        if width % 2 or height % 2:
            raise ValueError(f"H.264 (yuv420p) needs an even frame size, got {width}x{height}")
        self.path = Path(path)
        self.width, self.height, self.fps = width, height, int(fps)
        self.frames = 0
        self._lock = threading.Lock()
        self._container = av.open(str(self.path), mode="w", format="mp4", options=MP4_OPTIONS)
        try:
            self._stream = self._container.add_stream("libx264", rate=self.fps)
            self._stream.width, self._stream.height = width, height
            self._stream.pix_fmt = "yuv420p"
            # One keyframe (and so one fragment) per second of video.
            self._stream.options = {"preset": "veryfast", "tune": "zerolatency", "crf": str(crf),
                                    "g": str(self.fps), "keyint_min": str(self.fps)}
        except Exception:
            self._container.close()
            raise
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, rgb: np.ndarray) -> None:
        if rgb.shape != (self.height, self.width, 3) or rgb.dtype != np.uint8:
            raise ValueError(f"expected uint8 ({self.height}, {self.width}, 3), got {rgb.dtype} {rgb.shape}")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        with self._lock:
            if self._closed:
                return
            frame.pts = self.frames
            self._container.mux(self._stream.encode(frame))
            self.frames += 1

    def close(self) -> RecordingInfo:
        """Flush the encoder and finish the file; safe to call twice."""
        with self._lock:
            if not self._closed:
                self._closed = True
                try:
                    self._container.mux(self._stream.encode(None))
                finally:
                    self._container.close()
            return RecordingInfo(self.path.name, self.path, self.frames, self.fps)
