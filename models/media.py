"""The one H.264 MP4 writer (PyAV) behind every video worldloop makes: session recordings and offline rollouts
(``streaming/recording.py``), episodes (``distill/data/episodes.py``), training samples and evaluation videos.

    with VideoWriter(path, width, height, fps) as video:
        video.write(rgb)                      # uint8 (H, W, 3), H and W even (yuv420p)

Two layouts. Plain (``fragmented=False``): the index moves to the front when the file is finished
(``+faststart``), for files played after they are written. Fragmented (``frag_keyframe+empty_moov+
default_base_moof``): a self-contained fragment at every keyframe, one per second of video, so a crash
loses at most the last fragment; the x264 ``zerolatency`` tune turns off look-ahead and B-frames, so each
frame's packet is written as soon as the frame is encoded.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FASTSTART = {"movflags": "+faststart"}
# flush_packets: hand every finished fragment to the OS at once instead of filling a 32 KiB buffer first.
FRAGMENTED = {"movflags": "frag_keyframe+empty_moov+default_base_moof", "flush_packets": "1"}


def import_av() -> Any:
    """PyAV, imported when a video is made: training and evaluation run without it (``videos_available``)."""
    import av

    return av


def videos_available() -> bool:
    """Whether PyAV is installed (a bare CUDA image may lack it; then no MP4 can be written)."""
    try:
        return importlib.util.find_spec("av") is not None
    except (ImportError, ValueError):  # a finder that refuses it
        return False


class VideoWriter:
    """Appends uint8 RGB frames (H, W, 3) to an H.264 MP4 at a constant frame rate; ``close`` finishes it."""

    def __init__(self, path: str | Path, width: int, height: int, fps: int, *, crf: int = 20,
                 fragmented: bool = False) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"H.264 (yuv420p) needs an even frame size, got {width}x{height}")
        self.path = Path(path)
        self.width, self.height, self.fps = width, height, int(fps)
        self.frames = 0
        av = import_av()
        self._container: Any = av.open(str(self.path), mode="w", format="mp4",
                                       options=FRAGMENTED if fragmented else FASTSTART)
        try:
            self._stream = self._container.add_stream("libx264", rate=self.fps)
            self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
            options = {"preset": "veryfast", "crf": str(crf)}
            if fragmented:  # one keyframe (and so one fragment) per second of video
                options |= {"tune": "zerolatency", "g": str(self.fps), "keyint_min": str(self.fps)}
            self._stream.options = options
        except Exception:
            self._container.close()
            raise

    @property
    def closed(self) -> bool:
        return self._container is None

    def write(self, rgb: np.ndarray) -> None:
        if rgb.shape != (self.height, self.width, 3) or rgb.dtype != np.uint8:
            raise ValueError(f"expected uint8 ({self.height}, {self.width}, 3), got {rgb.dtype} {rgb.shape}")
        frame = import_av().VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = self.frames
        self._container.mux(self._stream.encode(frame))
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and finish the file; safe to call twice."""
        if self._container is not None:
            container, self._container = self._container, None
            try:
                container.mux(self._stream.encode(None))
            finally:
                container.close()

    def abort(self) -> None:
        """Close without flushing (the caller removes the file)."""
        if self._container is not None:
            container, self._container = self._container, None
            try:
                container.close()
            except import_av().error.FFmpegError:
                pass

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_video(path: Path, frames: np.ndarray | Sequence[np.ndarray], fps: int, crf: int = 20) -> None:
    """Write uint8 frames (T, H, W, 3) as one MP4; odd sizes are padded to even ones (yuv420p)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(frames) == 0:
        raise ValueError(f"no frames to write to {path}")
    h, w = frames[0].shape[:2]
    with VideoWriter(path, w + w % 2, h + h % 2, fps, crf=crf) as video:
        for f in frames:
            video.write(np.pad(f, ((0, h % 2), (0, w % 2), (0, 0))) if (h % 2 or w % 2) else f)
