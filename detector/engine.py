"""Batched inference: the model resident on one device, images in, calibrated scores out."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from clipguard.detector.aggregate import Pixels, aggregate_logits, flatten_views
from clipguard.detector.checkpoint import Manifest, load_checkpoint
from clipguard.detector.heads import Detector
from clipguard.detector.precision import (
    MAX_SCORE_DELTA,
    PrecisionChoice,
    agreement,
    choose_cpu_dtype,
)
from clipguard.detector.preprocess import (
    MAX_VIEWS,
    Aggregate,
    PreprocessConfig,
    preprocess_views,
)

log = logging.getLogger(__name__)

AI_LABEL = "ai_generated"
REAL_LABEL = "real"


class EngineConfig(BaseModel):
    """Where and how the model runs. ``auto`` picks CUDA when present, fp16 on it; on the CPU
    bfloat16 where it is measured faster and agrees with fp32, else fp32."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    channels_last: bool = True
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    warmup_batches: int = Field(default=2, ge=0)
    threads: int | None = Field(default=None, ge=1)
    #: ``torch.compile`` the model (pays off on CUDA for long-running workers).
    compile: bool = False
    #: Serve-time override of the checkpoint's views per image and their aggregation.
    views: int | None = Field(default=None, ge=1, le=MAX_VIEWS)
    aggregate: Aggregate | None = None


@dataclass(frozen=True)
class Prediction:
    """One image's calibrated outcome, before any moderation policy is applied."""

    ai_score: float
    label: str
    source: str | None
    source_scores: dict[str, float]


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but CUDA is not available")
    return device


def resolve_dtype(
    requested: str, device: torch.device, model: torch.nn.Module, manifest: Manifest
) -> PrecisionChoice:
    """fp16 autocast on CUDA; on the CPU bf16 only where it is measured to pay and agree
    (:mod:`clipguard.detector.precision`); an explicit request is honoured, but a reduced
    precision on the CPU that disagrees with fp32 falls back to fp32 with a warning."""
    size = manifest.preprocess.image_size
    temperature = manifest.calibration.temperature
    if requested == "auto":
        if device.type == "cuda":
            return PrecisionChoice(torch.float16, "cuda_fp16")
        return choose_cpu_dtype(model, size, temperature)
    dtype = getattr(torch, requested)
    if device.type == "cpu" and dtype != torch.float32:
        delta = agreement(model, dtype, size, temperature)
        if delta > MAX_SCORE_DELTA:
            log.warning(
                "%s disagrees with fp32 by %.4f (> %g) on the probe images: using float32",
                requested,
                delta,
                MAX_SCORE_DELTA,
            )
            return PrecisionChoice(torch.float32, "bf16_disagrees", f"max delta {delta:.4f}")
    return PrecisionChoice(dtype, "requested")


class ServingEngine(Protocol):
    """What the worker needs of an engine: :class:`InferenceEngine` in this process, or
    :class:`~clipguard.detector.process_engine.ProcessEngine` serving one from a child."""

    @property
    def manifest(self) -> Manifest: ...
    @property
    def preprocess(self) -> PreprocessConfig: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def dtype_reason(self) -> str: ...
    def warm_up(self) -> None: ...
    def predict_tensors(self, pixels: Pixels) -> list[Prediction]: ...
    def close(self) -> None: ...


class InferenceEngine:
    """Owns the model on its device; call from one thread only."""

    def __init__(self, detector: Detector, manifest: Manifest, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.manifest = manifest
        self.device = resolve_device(self.config.device)
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)
        self.model = detector.eval().to(self.device)
        choice = resolve_dtype(self.config.dtype, self.device, self.model, manifest)
        self.dtype, self.dtype_reason = choice.dtype, choice.reason
        log.info(
            "model runs in %s on %s (%s%s)",
            str(self.dtype).removeprefix("torch."),
            self.device,
            choice.reason,
            f": {choice.detail}" if choice.detail else "",
        )
        if self.device.type == "cpu" and self.dtype != torch.float32:
            # Weights and inputs, never CPU autocast; on a copy, so the caller's model (a
            # training loop's, say) stays fp32.
            self.model = copy.deepcopy(self.model).to(self.dtype)
        if self.config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        overrides = {"views": self.config.views, "aggregate": self.config.aggregate}
        self.input = PreprocessConfig.model_validate(
            {
                **manifest.preprocess.model_dump(),
                **{k: v for k, v in overrides.items() if v is not None},
            }
        )
        self.temperature = manifest.calibration.temperature
        self.bias = manifest.calibration.bias
        self.threshold = manifest.calibration.threshold
        self.classes = list(manifest.classes)
        self.warmed_up = False
        self.oom_retries = 0
        if self.config.compile:
            self.model = torch.compile(self.model)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, config: EngineConfig | None = None
    ) -> InferenceEngine:
        """A checkpoint on torch, or an exported ``.onnx`` file on ONNX Runtime."""
        if Path(path).suffix.lower() == ".onnx":
            from clipguard.detector.onnx_engine import OnnxEngine  # optional extra

            return OnnxEngine(path, config)
        detector, manifest = load_checkpoint(path)
        return cls(detector, manifest, config)

    @property
    def preprocess(self) -> PreprocessConfig:
        """The input contract in force: the checkpoint's, with this engine's view overrides."""
        return self.input

    def _autocast(self) -> AbstractContextManager[None]:
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return nullcontext()

    def warm_up(self) -> None:
        """Run full-size batches once so the first real batch pays no allocation cost."""
        size = self.manifest.preprocess.image_size
        dummy = torch.zeros(self.config.max_batch_size, 3, size, size)
        for _ in range(self.config.warmup_batches):
            self.scores(dummy)
        self.warmed_up = True

    def calibrated(self, logit: torch.Tensor) -> torch.Tensor:
        """Raw binary logit -> calibrated P(AI): ``sigmoid(logit / T + bias)``."""
        return torch.sigmoid(logit / self.temperature + self.bias)

    def view_logits(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M,3,S,S) -> raw binary logits (M,) and source logits (M, C), on the CPU.

        Runs in chunks of ``max_batch_size`` views; a CUDA out-of-memory error halves the
        chunk and retries, down to single views, before it is raised.
        """
        binary_parts: list[torch.Tensor] = []
        source_parts: list[torch.Tensor] = []
        step = self.config.max_batch_size
        start = 0
        with torch.inference_mode(), self._autocast():
            while start < views.shape[0]:
                chunk = views[start : start + step]
                try:
                    logit, source = self._forward(chunk)
                except torch.cuda.OutOfMemoryError:
                    if step == 1:
                        raise
                    step = max(1, step // 2)
                    self.oom_retries += 1
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                binary_parts.append(logit)
                source_parts.append(source)
                start += chunk.shape[0]
        if not binary_parts:
            return torch.empty(0), torch.empty(0, len(self.classes))
        return torch.cat(binary_parts), torch.cat(source_parts)

    def logits(self, pixels: Pixels) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw per-image logits: every view through the model in one pass, then aggregated."""
        views, counts = flatten_views(pixels, self.input.image_size)
        binary, source = self.view_logits(views)
        return aggregate_logits(binary, source, counts, self.input.aggregate)

    def scores(self, pixels: Pixels) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (see :data:`Pixels`) -> calibrated P(AI) (N,) and source probabilities (N, C)."""
        binary, source = self.logits(pixels)
        return self.calibrated(binary), torch.softmax(source, -1)

    def _forward(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One model call: binary and source logits, back on the CPU."""
        if self.device.type == "cuda":
            chunk = chunk.pin_memory().to(self.device, non_blocking=True)
        else:
            chunk = chunk.to(self.device)
        if self.device.type == "cpu" and self.dtype != torch.float32:
            chunk = chunk.to(self.dtype)
        if self.config.channels_last:
            chunk = chunk.contiguous(memory_format=torch.channels_last)
        out = self.model(chunk)
        return out.binary_logit.float().cpu(), out.source_logits.float().cpu()

    def predict_tensors(self, pixels: Pixels) -> list[Prediction]:
        """One prediction per image, whatever its number of views (one output per input)."""
        ai_scores, source_probs = self.scores(pixels)
        predictions = [
            self._prediction(float(a), p) for a, p in zip(ai_scores, source_probs, strict=True)
        ]
        expected = pixels.shape[0] if isinstance(pixels, torch.Tensor) else len(pixels)
        if len(predictions) != expected:  # one output per input, always
            raise RuntimeError(f"{expected} inputs gave {len(predictions)} predictions")
        return predictions

    def close(self) -> None:
        """Nothing to release in this process (a :class:`ProcessEngine` stops its child)."""

    def predict_images(self, images: Sequence[Image.Image]) -> list[Prediction]:
        return self.predict_tensors([preprocess_views(image, self.input) for image in images])

    def _prediction(self, ai_score: float, source_probs: torch.Tensor) -> Prediction:
        probs = source_probs.tolist()
        is_ai = ai_score >= self.threshold
        source = None
        if is_ai:
            generator = max(range(1, len(probs)), key=probs.__getitem__)
            source = self.classes[generator]
        return Prediction(
            ai_score=ai_score,
            label=AI_LABEL if is_ai else REAL_LABEL,
            source=source,
            source_scores={name: round(p, 6) for name, p in zip(self.classes, probs, strict=True)},
        )
