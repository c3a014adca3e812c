"""The decode-and-infer step: a batch of records in, one outcome per record out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone

import torch

from clipguard.consumer.batching import Pending
from clipguard.consumer.errors import InvalidEventError
from clipguard.consumer.metrics import WorkerMetrics
from clipguard.consumer.outcomes import Outcome, event_time, failure, input_ref
from clipguard.consumer.records import Upload, parse_record
from clipguard.consumer.schemas import ModelRef, PolicyRef, Verdict
from clipguard.consumer.sources import ImageSources
from clipguard.detector.decode import DecodeLimits, decode_image
from clipguard.detector.engine import InferenceEngine, Prediction
from clipguard.detector.errors import ClipguardError
from clipguard.detector.policy import Policy
from clipguard.detector.preprocess import preprocess

log = logging.getLogger(__name__)

WallClock = Callable[[], datetime]


class UnexpectedError(ClipguardError):
    """A bug met on one record: that record is dead-lettered, the worker goes on."""

    stage = "decode"
    reason = "unexpected"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Judge:
    """Turns records into verdicts and dead letters; one outcome per input, always."""

    def __init__(
        self,
        engine: InferenceEngine,
        policy: Policy,
        limits: DecodeLimits,
        sources: ImageSources,
        metrics: WorkerMetrics,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: WallClock = utc_now,
    ) -> None:
        self.engine = engine
        self.policy = policy
        self.limits = limits
        self.sources = sources
        self.metrics = metrics
        self.clock = clock
        self.wall_clock = wall_clock
        manifest = engine.manifest
        self.model_ref = ModelRef(
            name=manifest.model_name, version=manifest.version, sha256=manifest.sha256
        )
        self.policy_ref = PolicyRef(review_at=policy.review_at, block_at=policy.block_at)

    def _fail(
        self, item: Pending, error: ClipguardError, upload: Upload | None, event_id: str | None
    ) -> Outcome:
        self.metrics.errors.labels(stage=error.stage).inc()
        total_ms = (self.clock() - item.received_at) * 1000
        return failure(
            item.record,
            error,
            event_id,
            self.model_ref,
            self.policy_ref,
            self.wall_clock(),
            metadata=upload.metadata if upload else None,
            timings_ms={"total": round(total_ms, 3)},
        )

    def _prepare(self, item: Pending) -> tuple[Upload, torch.Tensor, float]:
        upload = parse_record(item.record)
        image_bytes = self.sources.fetch(upload)
        started = self.clock()
        image = decode_image(image_bytes, self.limits)
        pixels = preprocess(image, self.engine.manifest.preprocess)
        return upload, pixels, self.clock() - started

    def __call__(self, batch: Sequence[Pending]) -> list[Outcome]:
        started = self.clock()
        outcomes: dict[int, Outcome] = {}
        ready: list[tuple[int, Upload, torch.Tensor, float]] = []
        for index, item in enumerate(batch):
            upload: Upload | None = None
            try:
                upload, pixels, decode_s = self._prepare(item)
            except InvalidEventError as exc:
                outcomes[index] = self._fail(item, exc, None, exc.event_id)
                continue
            except ClipguardError as exc:
                upload = upload or _safe_parse(item)
                outcomes[index] = self._fail(item, exc, upload, upload and upload.event_id)
                continue
            except Exception as exc:
                rec = item.record
                log.exception("unexpected error on %s/%d@%d", rec.topic, rec.partition, rec.offset)
                upload = _safe_parse(item)
                error = UnexpectedError(f"{type(exc).__name__}: {exc}")
                outcomes[index] = self._fail(item, error, upload, upload and upload.event_id)
                continue
            self.metrics.decode_seconds.observe(decode_s)
            ready.append((index, upload, pixels, decode_s))
        if ready:
            inference_started = self.clock()
            predictions = self.engine.predict_tensors(torch.stack([r[2] for r in ready]))
            inference_s = self.clock() - inference_started
            self.metrics.inference_seconds.observe(inference_s)
            for (index, upload, _, decode_s), prediction in zip(ready, predictions, strict=True):
                item = batch[index]
                timings = {
                    "queue": (started - item.received_at) * 1000,
                    "decode": decode_s * 1000,
                    "inference": inference_s * 1000,
                    "total": (self.clock() - item.received_at) * 1000,
                }
                outcomes[index] = Outcome(
                    item.record,
                    self._verdict(item, upload, prediction, timings),
                    None,
                    event_time(item.record, upload.uploaded_at),
                )
        if len(outcomes) != len(batch):  # one output per input, checked (LitServe habit)
            raise RuntimeError(f"{len(batch)} records gave {len(outcomes)} outcomes")
        return [outcomes[i] for i in range(len(batch))]

    def _verdict(
        self, item: Pending, upload: Upload, prediction: Prediction, timings: dict[str, float]
    ) -> Verdict:
        return Verdict(
            event_id=upload.event_id,
            decision=self.policy.decide(prediction.ai_score).value,
            label=prediction.label,
            ai_score=round(prediction.ai_score, 6),
            source=prediction.source,
            source_scores=prediction.source_scores,
            model=self.model_ref,
            policy=self.policy_ref,
            input=input_ref(item.record),
            timings_ms={name: round(value, 3) for name, value in timings.items()},
            decided_at=self.wall_clock(),
            metadata=upload.metadata,
        )


def _safe_parse(item: Pending) -> Upload | None:
    try:
        return parse_record(item.record)
    except ClipguardError:
        return None
