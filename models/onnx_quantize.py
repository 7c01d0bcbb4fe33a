"""int8 graphs for ``--backend onnxruntime-int8``: the float32 graphs of ``onnx_export`` quantised.

On a CPU without native bf16 (AVX2 only) the model plays in float32, and the matrix products and convolutions
are most of a frame. ``quantize_graphs(src, dst, calibration)`` writes int8 copies of ``src``'s graphs:

- **the DiT frame steps**: every MatMul with a weight quantised dynamically (ONNX Runtime's
  ``quantize_dynamic``): int8 weights per output channel, activations quantised per call. The weights use
  7 bits (``reduce_range``): x86 CPUs without VNNI multiply u8 × s8 with 16-bit pair sums that can saturate
  at 8 bits. Measured on the shipped model (8 held-out worlds, 32 frames from engine context, 1 step): the
  frames stay within 49–55 dB of float32 (PSNR against the float32 frames at frames 1 / 32); 8-bit
  per-channel weights drift to 21 dB by frame 32 and 8-bit per-tensor ones to 36 dB.
- **the decoder**: convolutions quantised statically (QDQ, int8 weights per channel, u8 activations whose
  ranges are calibrated on ``calibration``: scaled latents of real frames, which the caller supplies;
  the models package renders none). Without calibration latents the decoder stays float32.

``dst/onnx.json`` is the source manifest plus an ``int8`` entry naming what was quantised; ``matches``
checks it, so a folder is reused only for the same weights and the same decoder choice.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from worldloop.models.onnx_export import DECODER, STEP, STEP_CONTEXT, publish, read_manifest

log = logging.getLogger(__name__)
DIT_INT8 = "dynamic int8 MatMul weights, per channel, 7-bit (reduce_range)"
DECODER_INT8 = "static QDQ int8 convolutions, per channel, u8 activations (MinMax calibration)"
DECODER_FLOAT = "float32 (no calibration latents)"


def matches(folder: str | Path, digest: str, decoder_int8: bool) -> bool:
    """Whether ``folder`` holds int8 graphs of the weights ``digest`` with the decoder as asked."""
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("weights_sha256") != digest:
        return False
    int8 = manifest.get("int8")
    want = DECODER_INT8 if decoder_int8 else DECODER_FLOAT
    return (isinstance(int8, dict) and int8.get("dit") == DIT_INT8 and int8.get("decoder") == want
            and all((Path(folder) / f).is_file() for f in (STEP_CONTEXT, STEP, DECODER)))


def quantize_graphs(src: str | Path, dst: str | Path, calibration: Tensor | None = None) -> dict[str, Any]:
    """int8 copies of the float32 graphs in ``src`` written to ``dst`` (replaced when complete) → the
    manifest. ``calibration``: scaled latents (N, C, h, w) of real frames for the decoder's activation
    ranges (None: the decoder is copied as float32)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    src, dst = Path(src), Path(dst)
    if calibration is not None and len(calibration) == 0:
        calibration = None
    manifest = read_manifest(src)
    if manifest is None or "int8" in manifest:
        raise ValueError(f"{src} holds no float32 worldloop graphs to quantise")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    quiet = logging.getLogger()  # the quantiser logs a pre-processing suggestion through the root logger
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        for name in (STEP_CONTEXT, STEP):
            quantize_dynamic(src / name, tmp / name, op_types_to_quantize=["MatMul"], per_channel=True,
                             reduce_range=True, weight_type=QuantType.QInt8)
        if calibration is None:
            shutil.copy(src / DECODER, tmp / DECODER)
        else:
            latents = [z[None].float().contiguous().numpy() for z in calibration]

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self.feed = iter(latents)

                def get_next(self) -> dict[str, np.ndarray] | None:
                    z = next(self.feed, None)
                    return None if z is None else {"latent": z}

            quantize_static(src / DECODER, tmp / DECODER, Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        manifest = dict(manifest)
        calibrated = 0 if calibration is None else len(calibration)
        manifest["int8"] = {"dit": DIT_INT8, "decoder": DECODER_INT8 if calibrated else DECODER_FLOAT,
                            "calibration_latents": calibrated}
        publish(tmp, dst, manifest)
    finally:
        quiet.setLevel(level)
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
