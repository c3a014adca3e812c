"""``clipguard export --format onnx`` as a library call: export, quantise, check, then write.

Nothing is written to ``out`` unless the parity and batch-independence checks pass, so a
file at ``out`` always carries the figures it was accepted with (metadata ``clipguard.export``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from clipguard.detector.checkpoint import Manifest
from clipguard.detector.heads import Detector
from clipguard.detector.onnx_export import OPSET, export_fp32, set_metadata
from clipguard.detector.onnx_parity import (
    BATCH_MAX_DELTA,
    FP32_MAX_DELTA,
    INT8_MIN_SAME_DECISIONS,
    INT8_P99_DELTA,
    ParityError,
    agreement,
    batch_independence,
    check,
    onnx_scores,
    torch_scores,
)
from clipguard.detector.onnx_quantize import QuantizeMode, quantize_int8
from clipguard.detector.onnx_runtime import open_session, require_extra

Quantize = Literal["none", "int8"]


def tolerances(quantize: Quantize) -> dict[str, float]:
    if quantize == "none":
        return {"max_abs_delta": FP32_MAX_DELTA, "batch_max_abs_delta": BATCH_MAX_DELTA}
    return {
        "min_same_decisions": INT8_MIN_SAME_DECISIONS,
        "p99_abs_delta_ai_score": INT8_P99_DELTA,
        "batch_max_abs_delta": BATCH_MAX_DELTA,
    }


def export_onnx(
    detector: Detector,
    manifest: Manifest,
    out: Path,
    held_out: np.ndarray,
    quantize: Quantize = "none",
    calibration: np.ndarray | None = None,
    mode: QuantizeMode = "static",
) -> dict[str, Any]:
    """Export, quantise if asked, measure against torch on ``held_out`` (K,3,S,S) pixels.

    Returns the export record; raises :class:`ParityError` (with ``.record``) and writes
    nothing when a tolerance is missed.
    """
    require_extra("onnx")
    require_extra("onnxruntime")
    detector = detector.float().eval()
    with tempfile.TemporaryDirectory(prefix="clipguard-export-") as tmp:
        model = export_fp32(detector, manifest, Path(tmp) / "fp32.onnx")
        record: dict[str, Any] = {"quantize": "none"}
        if quantize == "int8":
            record = quantize_int8(model, Path(tmp) / "int8.onnx", mode, calibration)
            model = Path(tmp) / "int8.onnx"
        session = open_session(model)
        reference = torch_scores(detector, manifest, held_out)
        record.update(
            format="onnx",
            opset=OPSET,
            torch=torch.__version__,
            source_sha256=manifest.sha256,
            held_out_images=len(held_out),
            parity=agreement(reference, onnx_scores(session, held_out), manifest),
            batch_independence=batch_independence(session, held_out),
            tolerances=tolerances(quantize),
        )
        del session
        problems = check(quantize, record["parity"], record["batch_independence"])
        if problems:
            raise ParityError("export refused: " + "; ".join(problems), record)
        set_metadata(model, manifest, record)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(model), str(out))
    return record
