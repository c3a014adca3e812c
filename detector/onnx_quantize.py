"""Int8 quantisation of an exported fp32 graph, for CPUs without native bf16.

``static`` (the default) fixes every activation scale from calibration images, so an image's
score does not depend on what else is in its batch. ``dynamic`` computes activation scales
from each batch at run time: no calibration, but an image's score moves with its batch
neighbours (measured in docs/onnx.md), so it is kept only for comparison.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from clipguard.detector.onnx_runtime import INPUT, require_extra
from clipguard.detector.onnx_sensitive import fp32_nodes

QuantizeMode = Literal["static", "dynamic"]
#: Only the matrix products are quantised: LayerNorm, softmax and GELU stay in fp32, where
#: int8 costs accuracy in a ViT for little speed.
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
#: Weights quantised to 7 bits (ORT's ``reduce_range``). x86 CPUs without VNNI multiply
#: uint8 activations by int8 weights with an instruction (``vpmaddubsw``) that saturates
#: pairs of products at 16 bits; 7-bit weights keep every pair in range. Measured on an
#: AVX2-only EPYC with an untrained ViT-B-32: p99 |delta ai_score| against torch 0.0454 with
#: 8-bit weights (the export refused it) and 0.0064 with 7-bit ones, at 0.94x the speed. The
#: file does not know which CPU will serve it, so it is always written the safe way.
REDUCE_RANGE = True


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ORT's quantiser logs every tensor it touches at INFO on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


class _Calibration:
    """The ``CalibrationDataReader`` protocol over a list of (B,3,S,S) float32 batches."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self._batches: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT: batch}


def _batches(pixels: np.ndarray, size: int = 8) -> list[np.ndarray]:
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    return [pixels[i : i + size] for i in range(0, len(pixels), size)]


def quantize_int8(
    fp32: Path, out: Path, mode: QuantizeMode = "static", calibration: np.ndarray | None = None
) -> dict[str, Any]:
    """Write the int8 model to ``out``; returns what was done (for the export record).

    ``calibration`` (K,3,S,S) preprocessed images are required for ``static``: images like
    the training data, so the fixed ranges cover what the model will see.
    """
    onnx = require_extra("onnx")
    require_extra("onnxruntime")
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="clipguard-quant-") as tmp, _quiet_root_logger():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        excluded = fp32_nodes(onnx.load(str(prepared)).graph, QUANTIZED_OPS)
        done = {
            "quantize": "int8",
            "ops": list(QUANTIZED_OPS),
            "fp32_nodes": len(excluded),
            "weight_bits": 7 if REDUCE_RANGE else 8,
        }
        if mode == "dynamic":
            quantize_dynamic(
                str(prepared),
                str(out),
                op_types_to_quantize=list(QUANTIZED_OPS),
                nodes_to_exclude=excluded,
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=REDUCE_RANGE,
            )
            return {**done, "mode": "dynamic"}
        if calibration is None or len(calibration) == 0:
            raise ValueError("static int8 quantisation needs calibration images")
        quantize_static(
            str(prepared),
            str(out),
            _Calibration(_batches(calibration)),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_exclude=excluded,
            per_channel=True,
            reduce_range=REDUCE_RANGE,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    return {
        **done,
        "mode": "static",
        "calibration_images": len(calibration),
        "calibrate_method": "minmax",
    }
