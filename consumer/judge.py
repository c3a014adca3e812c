"""The decode-and-infer step: a batch of records in, one outcome per record out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import torch
from PIL import Image

from clipguard.consumer.batching import Pending
from clipguard.consumer.device_decode import decode_deferred
from clipguard.consumer.errors import InvalidEventError
from clipguard.consumer.metrics import WorkerMetrics
from clipguard.consumer.outcomes import Outcome, event_time, failure, input_ref
from clipguard.consumer.records import Upload, parse_record
from clipguard.consumer.schemas import EvidenceRef, ModelRef, PolicyRef, Verdict
from clipguard.consumer.sources import ImageSources
from clipguard.detector.decode import DecodeLimits, decode_image
from clipguard.detector.engine import Prediction, ServingEngine
from clipguard.detector.errors import ClipguardError
from clipguard.detector.gpu_decode import BatchJpegDecoder, JpegJob
from clipguard.detector.policy import Decision, Policy
from clipguard.detector.preprocess import decode_min_side, preprocess_views
from clipguard.provenance import Evidence, ProvenanceReader, combine

log = logging.getLogger(__name__)

WallClock = Callable[[], datetime]


class UnexpectedError(ClipguardError):
    """A bug met on one record: that record is dead-lettered, the worker goes on."""

    stage = "decode"
    reason = "unexpected"
    internal = True


class ModelError(ClipguardError):
    """The model failed on a batch of decoded images: a fault of ours, not of the uploads."""

    stage = "inference"
    reason = "model_failed"
    internal = True


@dataclass(frozen=True)
class Decoded:
    """A record after the decode stage: model-ready pixels, or its failure outcome."""

    item: Pending
    upload: Upload | None
    pixels: torch.Tensor | None
    decode_s: float
    failure: Outcome | None
    #: Provenance read from the original bytes in the decode stage (docs/provenance.md).
    evidence: tuple[Evidence, ...] = ()
    #: A JPEG whose pixels the model's thread decodes with its batch (``jpeg_decode_device``).
    jpeg: JpegJob | None = None


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Judge:
    """Turns records into verdicts and dead letters; one outcome per input, always."""

    def __init__(
        self,
        engine: ServingEngine,
        policy: Policy,
        limits: DecodeLimits,
        sources: ImageSources,
        metrics: WorkerMetrics,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: WallClock = utc_now,
        provenance: ProvenanceReader | None = None,
        jpeg_decoder: BatchJpegDecoder | None = None,
    ) -> None:
        self.engine = engine
        self.jpeg_decoder = jpeg_decoder
        self.provenance = provenance
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

    def prepare(self, item: Pending, deadline: float | None = None) -> Decoded:
        """Parse, fetch and decode on the calling thread (the naive path, tests). Never raises."""
        upload: Upload | None = None
        try:
            upload = self.parse(item)
            return self.decode(item, upload, self.sources.fetch(upload, deadline))
        except Exception as exc:  # noqa: BLE001 - every failure becomes this record's outcome
            return self.failed(item, exc, upload)

    def parse(self, item: Pending) -> Upload:
        """The record as an upload event; raises :class:`InvalidEventError`."""
        return parse_record(item.record)

    def decode(self, item: Pending, upload: Upload, image_bytes: bytes) -> Decoded:
        """Decode and preprocess (any thread but the model's), or check the header of a JPEG
        the model's thread decodes on its device. Never raises."""
        image: Image.Image | None = None
        pixels: torch.Tensor | None = None
        try:
            started = self.clock()
            # A JPEG for the device: header checked here, pixels decoded by ``finish``.
            job = self.jpeg_decoder.plan(image_bytes) if self.jpeg_decoder else None
            if job is None:
                cfg = self.engine.preprocess
                image = decode_image(image_bytes, self.limits, decode_min_side(cfg))
                pixels = preprocess_views(image, cfg)  # (V,3,S,S), V per contract
            decode_s = self.clock() - started
        except Exception as exc:  # noqa: BLE001 - every failure becomes this record's outcome
            return self.failed(item, exc, upload)
        if job is None:  # a deferred JPEG is observed with its device decode
            self.metrics.decode_seconds.observe(decode_s)
        evidence: tuple[Evidence, ...] = ()
        if self.provenance is not None:  # never raises, bounded in time by its own budget
            report = self.provenance.inspect(image_bytes, image)
            evidence = tuple(report.evidence)
            for found in evidence:
                self.metrics.evidence.labels(kind=found.kind, claim=found.claim).inc()
            if report.c2pa_state is not None:
                self.metrics.c2pa_reads.labels(state=report.c2pa_state).inc()
            self.metrics.provenance_seconds.observe(sum(report.seconds.values()))
        return Decoded(item, upload, pixels, decode_s, None, evidence, job)

    def failed(self, item: Pending, exc: BaseException, upload: Upload | None) -> Decoded:
        """Any exception met while preparing ``item``, as its failure outcome."""
        if isinstance(exc, InvalidEventError):
            return Decoded(item, None, None, 0.0, self._fail(item, exc, None, exc.event_id))
        if not isinstance(exc, ClipguardError):
            rec = item.record
            log.error(
                "unexpected error on %s/%d@%d: %s: %s",
                rec.topic,
                rec.partition,
                rec.offset,
                type(exc).__name__,
                str(exc)[:300],
                exc_info=log.isEnabledFor(logging.DEBUG),
                extra={
                    "topic": rec.topic,
                    "partition": rec.partition,
                    "offset": rec.offset,
                    "event_id": _id(upload),
                },
            )
            exc = UnexpectedError(f"{type(exc).__name__}: {exc}"[:1000])
        return Decoded(item, upload, None, 0.0, self._fail(item, exc, upload, _id(upload)))

    def finish(self, decoded: Sequence[Decoded]) -> list[Outcome]:
        """Inference stage (the model's thread): one batch, one outcome per input, in order."""
        decoded = decode_deferred(self, decoded)
        started = self.clock()
        ready = [d for d in decoded if d.failure is None]
        predictions: list[Prediction] = []
        inference_s = 0.0
        if ready:
            try:
                # One tensor of views per event; the engine aggregates them to one prediction.
                pixels = [d.pixels for d in ready]
                predictions = self.engine.predict_tensors(pixels)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - the batch is dead-lettered, counted as ours
                log.error(
                    "model failed on a batch of %d: %s: %s", len(ready), type(exc).__name__, exc
                )
                error = ModelError(f"{type(exc).__name__}: {exc}"[:1000])
                decoded = [
                    d if d.failure else self.failed(d.item, error, d.upload) for d in decoded
                ]
                ready = []
            inference_s = self.clock() - started
            if ready:
                self.metrics.inference_seconds.observe(inference_s)
        by_position = iter(predictions)
        outcomes: list[Outcome] = []
        for d in decoded:
            if d.failure is not None:
                outcomes.append(replace(d.failure, epoch=d.item.epoch))
                continue
            assert d.upload is not None
            timings = {
                "queue": (started - d.item.received_at - d.decode_s) * 1000,
                "decode": d.decode_s * 1000,
                "inference": inference_s * 1000,
                "total": (self.clock() - d.item.received_at) * 1000,
            }
            verdict = self._verdict(d, next(by_position), timings)
            outcomes.append(
                Outcome(
                    d.item.record,
                    verdict,
                    None,
                    event_time(d.item.record, d.upload.uploaded_at),
                    epoch=d.item.epoch,
                )
            )
        if len(outcomes) != len(decoded):  # one output per input, checked (LitServe habit)
            raise RuntimeError(f"{len(decoded)} records gave {len(outcomes)} outcomes")
        return outcomes

    def __call__(self, batch: Sequence[Pending]) -> list[Outcome]:
        """Both stages on the calling thread (the naive path, and tests)."""
        return self.finish([self.prepare(item) for item in batch])

    def _verdict(self, d: Decoded, prediction: Prediction, timings: dict[str, float]) -> Verdict:
        """The classifier's decision, combined with the provenance evidence when there is some."""
        assert d.upload is not None
        decision = self.policy.decide(prediction.ai_score)
        label, source, decided_by = prediction.label, prediction.source, "classifier"
        if d.evidence:
            combined = combine(decision, d.evidence, label=label, source=source)
            decision, label, source = combined.decision, combined.label, combined.source
            decided_by = combined.decided_by
        self.metrics.decided_by.labels(decided_by=decided_by).inc()
        return Verdict(
            event_id=d.upload.event_id,
            decision=Decision(decision).value,
            label=label,
            ai_score=round(prediction.ai_score, 6),
            source=source,
            source_scores=prediction.source_scores,
            model=self.model_ref,
            policy=self.policy_ref,
            input=input_ref(d.item.record),
            timings_ms={name: round(value, 3) for name, value in timings.items()},
            decided_at=self.wall_clock(),
            metadata=d.upload.metadata,
            evidence=[EvidenceRef(**e.model_dump()) for e in d.evidence],
            decided_by=decided_by,
        )


def _id(upload: Upload | None) -> str | None:
    return upload.event_id if upload is not None else None
