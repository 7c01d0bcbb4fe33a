"""A user's picture as a first frame: PNG, JPEG or WebP bytes → uint8 RGB at the model's frame size.

    frame = read_picture(Path("start.png").read_bytes(), height=128, width=128)   # (128, 128, 3) uint8

The picture is centre-cropped to the frame's aspect ratio and resized to the frame size (area averaging when
shrinking, bilinear when enlarging), so any picture of a sensible size works. Anything else is a
``ValueError`` saying what is wrong in one line: not one of the three formats, over ``MAX_PICTURE_BYTES``,
over ``MAX_PICTURE_SIDE`` pixels a side (read from the header, so a small file that would decode to a huge
picture is refused before decoding), or damaged. The CLI
(``--first-frame``) and the streaming protocol (``first_frame``) both read pictures through here.
"""

from __future__ import annotations

import cv2
import numpy as np

MAX_PICTURE_BYTES = 64 * 1024  # an encoded picture; a frame-sized PNG or JPEG is far smaller
MAX_PICTURE_SIDE = 4096  # pixels; bigger pictures are refused before they are decoded
MIN_PICTURE_SIDE = 8
_MAGIC = {"png": (b"\x89PNG\r\n\x1a\n",), "jpeg": (b"\xff\xd8\xff",)}


def picture_format(data: bytes) -> str:
    """"png", "jpeg" or "webp" from the first bytes; ValueError for anything else."""
    for name, starts in _MAGIC.items():
        if data.startswith(starts):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise ValueError("the first frame must be a PNG, JPEG or WebP picture")


def picture_size(data: bytes, kind: str) -> tuple[int, int] | None:
    """(width, height) from the picture's header, without decoding it; None when the header is unreadable."""
    if kind == "png" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if kind == "jpeg":
        i = 2
        while i + 9 < len(data) and data[i] == 0xFF:
            marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame segment
                return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
            i += 2 + length
    if kind == "webp" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8 ":
            w, h = int.from_bytes(data[26:28], "little"), int.from_bytes(data[28:30], "little")
            return w & 0x3FFF, h & 0x3FFF
        if chunk == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8X":
            return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def read_picture(data: bytes, height: int, width: int) -> np.ndarray:
    """Decode a PNG/JPEG/WebP picture and fit it to the frame size (``fit_frame``) → uint8 (H, W, 3)."""
    if len(data) > MAX_PICTURE_BYTES:
        raise ValueError(f"the first frame is {len(data)} bytes; at most {MAX_PICTURE_BYTES} bytes (use a "
                         f"smaller picture or JPEG, e.g. {width}x{height})")
    kind = picture_format(data)
    size = picture_size(data, kind)
    if size is None:
        raise ValueError(f"the first frame's {kind.upper()} header is damaged (no picture size)")
    if max(size) > MAX_PICTURE_SIDE:
        raise ValueError(f"the first frame is {size[0]}x{size[1]} pixels; at most {MAX_PICTURE_SIDE} a side")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"the first frame could not be decoded as {kind.upper()} (a damaged file?)")
    h, w = bgr.shape[:2]
    if max(h, w) > MAX_PICTURE_SIDE or min(h, w) < MIN_PICTURE_SIDE:
        raise ValueError(f"the first frame is {w}x{h} pixels; it must be {MIN_PICTURE_SIDE} to "
                         f"{MAX_PICTURE_SIDE} pixels a side")
    return fit_frame(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), height, width)


def fit_frame(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (h, w, 3) → (height, width, 3): the largest centred crop of the frame's aspect ratio, resized."""
    h, w = rgb.shape[:2]
    crop_h, crop_w = min(h, round(w * height / width)), min(w, round(h * width / height))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    crop = rgb[top:top + crop_h, left:left + crop_w]
    if (crop_h, crop_w) == (height, width):
        return np.ascontiguousarray(crop)
    shrink = crop_h >= height and crop_w >= width
    return cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
