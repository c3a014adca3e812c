"""``clipguard predict``: judge image files offline, one JSON line per file."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from clipguard.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    flag_values,
    iter_files,
    print_json,
)
from clipguard.cli.settings_flags import add_settings_flags
from clipguard.consumer.config import CheckpointPath, ClipguardSettings, comma_separated
from clipguard.detector.decode import DEFAULT_FORMATS, DecodeLimits, decode_image
from clipguard.detector.engine import EngineConfig, InferenceEngine
from clipguard.detector.errors import ImageError, ImageTooLargeError
from clipguard.detector.policy import Policy
from clipguard.detector.preprocess import MAX_VIEWS, decode_min_side, preprocess_views
from clipguard.provenance import Evidence, ProvenanceReader, ProvenanceSettings, combine


class PredictSettings(ClipguardSettings):
    checkpoint: CheckpointPath
    device: str = "auto"
    batch_size: int = Field(default=32, ge=1, le=1024)
    max_image_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    image_formats: Annotated[tuple[str, ...], NoDecode] = DEFAULT_FORMATS
    review_at: float | None = Field(default=None, ge=0.0, le=1.0)
    block_at: float | None = Field(default=None, ge=0.0, le=1.0)
    provenance_enabled: bool = True
    c2pa_trust_anchors: Path | None = None
    hash_list: Path | None = None
    hash_list_threshold: int = Field(default=31, ge=0, le=256)
    #: Views per image and their aggregation; default: the checkpoint's input contract.
    views: int | None = Field(default=None, ge=1, le=MAX_VIEWS)
    view_aggregation: Literal["mean", "max"] | None = None

    @field_validator("image_formats", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return comma_separated(value)  # DecodeLimits upper-cases the names

    def provenance(self) -> ProvenanceReader | None:
        if not self.provenance_enabled:
            return None
        return ProvenanceReader(
            ProvenanceSettings(
                c2pa_trust_anchors=self.c2pa_trust_anchors,
                hash_list=self.hash_list,
                hash_list_threshold=self.hash_list_threshold,
            )
        )


Prepared = tuple[Path, torch.Tensor | None, dict[str, Any] | None, tuple[Evidence, ...]]


PREDICT_HELP = {
    "checkpoint": "checkpoint directory, .safetensors or .onnx file",
    "device": "auto (CUDA when present), cpu, cuda, cuda:N",
    "batch_size": "images per model call",
    "views": "views per image (default: the checkpoint's)",
    "provenance_enabled": "read Content Credentials, metadata and hash lists next to the model",
    "c2pa_trust_anchors": "PEM of C2PA trust anchors",
    "hash_list": "PDQ hash list (<hex> <ai_generated|real> [generator] per line)",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="judge image files with a checkpoint (one JSON line per file)",
        description="Print one JSON line per file: a prediction, or a typed error. "
        "Exits 1 if any file could not be judged.",
    )
    add_settings_flags(parser, PredictSettings, PREDICT_HELP)
    parser.add_argument("--config", help="TOML file with settings")
    parser.add_argument("paths", nargs="+", metavar="FILES_OR_DIRS")
    parser.set_defaults(func=run)


def _read(path: Path, limits: DecodeLimits) -> bytes:
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise ImageTooLargeError(f"{size} bytes exceeds the limit of {limits.max_bytes}")
    return path.read_bytes()


def _error_line(path: Path, error: Exception) -> dict[str, Any]:
    stage = getattr(error, "stage", "read")
    reason = getattr(error, "reason", "unreadable")
    return {
        "path": str(path),
        "error": {
            "stage": stage,
            "reason": reason,
            "class": type(error).__name__,
            "message": str(error)[:500],
        },
    }


def _prepared(
    paths: Iterator[Path],
    engine: InferenceEngine,
    limits: DecodeLimits,
    reader: ProvenanceReader | None,
) -> Iterator[Prepared]:
    for path in paths:
        try:
            data = _read(path, limits)
            image = decode_image(data, limits, decode_min_side(engine.preprocess))
            evidence = tuple(reader.read(data, image)) if reader is not None else ()
            yield path, preprocess_views(image, engine.preprocess), None, evidence
        except (ImageError, OSError) as exc:
            yield path, None, _error_line(path, exc), ()


def run(args: argparse.Namespace) -> int:
    settings = PredictSettings.load(args.config, **flag_values(args, exclude={"paths"}))
    engine = InferenceEngine.from_checkpoint(
        settings.checkpoint,
        EngineConfig(
            device=settings.device,
            max_batch_size=settings.batch_size,
            warmup_batches=0,
            views=settings.views,
            aggregate=settings.view_aggregation,
        ),
    )
    stored = engine.manifest.policy
    policy = Policy(
        review_at=settings.review_at if settings.review_at is not None else stored.review_at,
        block_at=settings.block_at if settings.block_at is not None else stored.block_at,
    )
    limits = DecodeLimits(
        max_bytes=settings.max_image_bytes,
        max_pixels=settings.max_image_pixels,
        formats=settings.image_formats,
    )
    reader = settings.provenance()
    failures = 0
    pending: list[Prepared] = []

    def flush() -> None:
        """Print the pending files in input order: errors as they were, images judged."""
        tensors = [pixels for _, pixels, _, _ in pending if pixels is not None]
        predictions = iter(engine.predict_tensors(tensors) if tensors else [])
        for path, pixels, error, evidence in pending:
            if pixels is None:
                print_json(error)
                continue
            prediction = next(predictions)
            outcome = combine(
                policy.decide(prediction.ai_score),
                evidence,
                label=prediction.label,
                source=prediction.source,
            )
            print_json(
                {
                    "path": str(path),
                    "label": outcome.label,
                    "ai_score": round(prediction.ai_score, 6),
                    "decision": outcome.decision.value,
                    "decided_by": outcome.decided_by,
                    "source": outcome.source,
                    "source_scores": prediction.source_scores,
                    "evidence": [e.model_dump() for e in evidence],
                }
            )
        pending.clear()

    for prepared in _prepared(iter_files(args.paths), engine, limits, reader):
        failures += prepared[2] is not None
        pending.append(prepared)
        if len(pending) >= settings.batch_size:
            flush()
    flush()
    return EXIT_FAILURE if failures else EXIT_OK
