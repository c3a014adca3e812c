"""What the worker emits per input record: a verdict, a dead letter, or both."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from clipguard.consumer.records import RecordRef
from clipguard.consumer.schemas import ErrorInfo, InputRef, ModelRef, PolicyRef, Verdict
from clipguard.detector.errors import ClipguardError

MAX_HEADER_MESSAGE = 1000


@dataclass(frozen=True)
class DeadLetter:
    """The original bytes, routed to the DLQ with headers that say why and from where."""

    record: RecordRef
    stage: str
    error_class: str
    reason: str
    message: str

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            ("clipguard.error.stage", self.stage.encode()),
            ("clipguard.error.class", self.error_class.encode()),
            ("clipguard.error.reason", self.reason.encode()),
            ("clipguard.error.message", self.message[:MAX_HEADER_MESSAGE].encode()),
            ("clipguard.original.topic", self.record.topic.encode()),
            ("clipguard.original.partition", str(self.record.partition).encode()),
            ("clipguard.original.offset", str(self.record.offset).encode()),
        ]


@dataclass(frozen=True)
class Outcome:
    """One input record's result; at least one of the two is set (nothing is lost)."""

    record: RecordRef
    verdict: Verdict | None
    dead_letter: DeadLetter | None
    #: When the upload happened (epoch seconds): upload time, else the record timestamp.
    event_time: float | None = None
    #: The partition's epoch when the record was consumed (stale after a rebalance).
    epoch: int | None = None
    #: A failure of ours (model, output), not of the input: only these count for the brake.
    internal: bool = False
    #: The dead letter that replaced an output the broker refused.
    rerouted: bool = False

    def __post_init__(self) -> None:
        if self.verdict is None and self.dead_letter is None:
            raise ValueError("an outcome needs a verdict or a dead letter")


def input_ref(record: RecordRef) -> InputRef:
    timestamp = None
    if record.timestamp_ms is not None:
        timestamp = datetime.fromtimestamp(record.timestamp_ms / 1000, timezone.utc)
    return InputRef(
        topic=record.topic, partition=record.partition, offset=record.offset, timestamp=timestamp
    )


def failure(
    record: RecordRef,
    error: ClipguardError,
    event_id: str | None,
    model: ModelRef,
    policy: PolicyRef,
    decided_at: datetime,
    metadata: dict | None = None,
    timings_ms: dict[str, float] | None = None,
) -> Outcome:
    """A record that cannot be judged: DLQ always, a ``review`` verdict when the id is known."""
    message = str(error) or type(error).__name__
    dead_letter = DeadLetter(record, error.stage, type(error).__name__, error.reason, message)
    verdict = None
    if event_id is not None:
        verdict = Verdict(
            event_id=event_id,
            decision="review",
            label=None,
            model=model,
            policy=policy,
            input=input_ref(record),
            timings_ms=timings_ms or {},
            decided_at=decided_at,
            metadata=metadata or {},
            error=ErrorInfo(stage=error.stage, reason=error.reason, message=message[:500]),
            decided_by=None,
        )
    return Outcome(record, verdict, dead_letter, event_time(record, None), internal=error.internal)


def event_time(record: RecordRef, uploaded_at: datetime | None) -> float | None:
    if uploaded_at is not None:
        return uploaded_at.timestamp()
    if record.timestamp_ms is not None:
        return record.timestamp_ms / 1000
    return None
