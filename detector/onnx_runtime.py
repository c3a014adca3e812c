"""ONNX Runtime, an optional extra: one session per exported model, its manifest from metadata.

Nothing here imports onnxruntime at module load, so the torch engine never needs it; the
first use says which extra to install when it is missing.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from pydantic import ValidationError

from clipguard.detector.checkpoint import METADATA_KEY, Manifest
from clipguard.detector.errors import CheckpointError, ClipguardError

INPUT = "pixels"
#: Graph outputs, in order: calibrated P(AI), source probabilities, and the raw logits.
OUTPUTS = ("ai_score", "source_probs", "binary_logit", "source_logits")
#: Metadata key of the export record: quantisation, opset, parity measured at export.
EXPORT_KEY = "clipguard.export"
EXTRA_HINT = "pip install 'clipguard[onnx]'"


class MissingExtraError(ClipguardError):
    """An optional dependency a chosen feature needs is not installed."""

    stage = "model"
    reason = "missing_extra"


def require_extra(module: str = "onnxruntime") -> ModuleType:
    """``import module`` (onnxruntime or onnx), or an error naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"exporting or serving an ONNX model needs {module}, which is not installed: "
            f"{EXTRA_HINT} (the 'onnx' extra)"
        ) from exc


def require_onnxruntime() -> ModuleType:
    return require_extra("onnxruntime")


def open_session(path: str | Path, threads: int | None = None) -> Any:
    """A CPU ``InferenceSession`` with all graph optimisations; ``threads`` intra-op."""
    ort = require_onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ONNX model not found: {path}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own unexported exception types
        raise CheckpointError(f"cannot load ONNX model {path}: {exc}") from exc


def session_metadata(session: Any, path: str | Path) -> tuple[Manifest, dict[str, Any]]:
    """The manifest and export record embedded at export."""
    meta = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in meta:
        raise CheckpointError(
            f"{path} has no {METADATA_KEY!r} metadata: not exported by `clipguard export`"
        )
    try:
        manifest = Manifest.model_validate_json(meta[METADATA_KEY])
        export = json.loads(meta.get(EXPORT_KEY, "{}"))
    except (ValidationError, ValueError) as exc:
        raise CheckpointError(f"invalid manifest in {path}: {exc}") from exc
    return manifest, export


def run(session: Any, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """One call: (N,3,S,S) float32 -> every output by name."""
    values = session.run(list(OUTPUTS), {INPUT: np.ascontiguousarray(pixels, dtype=np.float32)})
    return dict(zip(OUTPUTS, values, strict=True))
