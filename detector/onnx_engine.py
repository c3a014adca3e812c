"""Serve an exported ``.onnx`` file through the engine interface, on ONNX Runtime (CPU).

Only the model call differs from :class:`InferenceEngine`: views, aggregation, calibration
and the one-output-per-input check are the torch engine's own code, run on the graph's raw
logits, so both backends judge the same pixels the same way. The manifest comes from the
file's metadata; the precision is the file's (fp32 or int8), not a setting. ORT releases
the GIL while it runs, so decode threads and the Kafka clients are not held up.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from clipguard.detector.engine import EngineConfig, InferenceEngine
from clipguard.detector.onnx_runtime import open_session, run, session_metadata
from clipguard.detector.preprocess import PreprocessConfig

log = logging.getLogger(__name__)

ONNX_SUFFIX = ".onnx"
#: ``dtype_reason`` values of this backend (next to detector/precision.py REASONS).
REASONS = ("onnx_fp32", "onnx_int8_static", "onnx_int8_dynamic")


def is_onnx(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ONNX_SUFFIX


class OnnxEngine(InferenceEngine):
    """An ONNX Runtime session in place of the torch model; call from one thread only."""

    def __init__(self, path: str | Path, config: EngineConfig | None = None) -> None:
        # Not InferenceEngine.__init__: there is no torch module to place or cast.
        self.config = config or EngineConfig()
        if self.config.device not in ("auto", "cpu"):
            raise ValueError(
                f"device {self.config.device!r} requested, but the ONNX backend runs on the CPU"
            )
        self.path = Path(path)
        self.session: Any = open_session(self.path, self.config.threads)
        self.manifest, self.export = session_metadata(self.session, self.path)
        self.device = torch.device("cpu")
        if self.export.get("quantize") == "int8":
            self.dtype = torch.qint8
            self.dtype_reason = f"onnx_int8_{self.export.get('mode', 'static')}"
        else:
            self.dtype, self.dtype_reason = torch.float32, "onnx_fp32"
        if self.config.dtype not in ("auto", "float32"):
            log.warning("dtype %s ignored: %s fixes its own precision", self.config.dtype, path)
        log.info("model runs on ONNX Runtime from %s (%s)", self.path.name, self.dtype_reason)
        overrides = {"views": self.config.views, "aggregate": self.config.aggregate}
        self.input = PreprocessConfig.model_validate(
            {
                **self.manifest.preprocess.model_dump(),
                **{k: v for k, v in overrides.items() if v is not None},
            }
        )
        calibration = self.manifest.calibration
        self.temperature, self.bias = calibration.temperature, calibration.bias
        self.threshold = calibration.threshold
        self.classes = list(self.manifest.classes)
        self.warmed_up = False
        self.oom_retries = 0

    def _forward(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One session run: binary and source logits as CPU tensors."""
        out = run(self.session, chunk.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(out["binary_logit"]), torch.from_numpy(out["source_logits"])
