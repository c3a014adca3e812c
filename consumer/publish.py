"""Publishing outcomes; an input offset is acknowledged once all of its outputs are.

Errors are routed by what they are about (arroyo's rule: a poison message is routed, the
consumer goes on):

- about one record (too large, invalid): that record's event is dead-lettered instead,
  with stage ``publish`` (its dead letter is sized to fit, so it cannot fail the same way);
- about the broker (timeouts, no leader, connection lost): the outcome is sent again after
  a backoff while the broker is away; the worker's broker limit decides when to give up;
- inside a transaction: the transaction cannot be partly kept, so the worker stops and the
  group redelivers what was not committed.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from kafka.errors import (
    CorruptRecordError,
    InvalidRecordError,
    InvalidTimestampError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)

from clipguard.consumer.committer import TransactionCommitter, TransactionFailedError
from clipguard.consumer.fit import OutputFitter, OutputTooLargeError
from clipguard.consumer.health import HealthState
from clipguard.consumer.metrics import WorkerMetrics
from clipguard.consumer.offsets import OffsetTracker
from clipguard.consumer.outcomes import DeadLetter, Outcome
from clipguard.detector.errors import ClipguardError

log = logging.getLogger(__name__)

#: Errors that are about one record, not about the broker.
RECORD_ERRORS = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    InvalidRecordError,
    CorruptRecordError,
    InvalidTimestampError,
    OutputTooLargeError,
)
RESEND_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)


class PublishError(ClipguardError):
    """An output could not be published; kept for callers of the old name."""

    stage = "publish"
    reason = "not_acknowledged"
    permanent = False


class OutputRejectedError(ClipguardError):
    """The broker refused an output for reasons of that record (size, validity)."""

    stage = "publish"
    reason = "output_rejected"
    internal = True


class Publisher:
    """Sends outcomes (inference thread) and acknowledges their offsets (producer thread)."""

    def __init__(
        self,
        producer: Any,
        fitter: OutputFitter,
        tracker: OffsetTracker,
        metrics: WorkerMetrics,
        health: HealthState,
        fail: Callable[[BaseException], None],
        transaction: TransactionCommitter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.producer = producer
        self.fitter = fitter
        self.tracker = tracker
        self.metrics = metrics
        self.health = health
        self.fail = fail
        self.transaction = transaction
        self.clock = clock
        self._lock = threading.Lock()
        self._resend: list[tuple[float, int, Outcome, int]] = []  # (due, seq, outcome, attempt)
        self._seq = itertools.count()
        self._unacked: dict[int, float] = {}  # send id -> sent at
        self.on_published: Callable[[Outcome], None] = lambda outcome: None
        self.on_rerouted: Callable[[Outcome], None] = lambda outcome: None

    # -- inference thread -----------------------------------------------------------------

    def publish(self, outcomes: Sequence[Outcome]) -> None:
        if self.transaction is not None:
            with self.transaction.lock:
                for outcome in outcomes:
                    if self._current(outcome):
                        self._send(outcome, 0)
                self.transaction.sent()
            return
        for outcome in outcomes:
            self._send(outcome, 0)

    def service(self) -> None:
        """Send again what is due: called by the inference loop between batches."""
        now = self.clock()
        while True:
            with self._lock:
                if not self._resend or self._resend[0][0] > now:
                    return
                _, _, outcome, attempt = heapq.heappop(self._resend)
            if self._current(outcome):
                self._send(outcome, attempt)

    def oldest_unacked(self) -> float | None:
        with self._lock:
            return min(self._unacked.values(), default=None)

    def pending(self) -> int:
        with self._lock:
            return len(self._unacked) + len(self._resend)

    # -- sending --------------------------------------------------------------------------

    def _current(self, outcome: Outcome) -> bool:
        record = outcome.record
        return outcome.epoch is None or self.tracker.is_current(
            (record.topic, record.partition), outcome.epoch
        )

    def _send(self, outcome: Outcome, attempt: int) -> None:
        try:
            records = self.fitter.records(outcome)
        except OutputTooLargeError as exc:
            self._failed(outcome, attempt, exc)
            return
        send_id = next(self._seq)
        remaining = [len(records)]
        settled = [False]
        with self._lock:
            self._unacked[send_id] = self.clock()

        def on_success(_: Any) -> None:
            self.health.broker_answered()
            with self._lock:
                remaining[0] -= 1
                if remaining[0] or settled[0]:
                    return
                settled[0] = True
                self._unacked.pop(send_id, None)
            record = outcome.record
            self.tracker.acknowledged(
                (record.topic, record.partition), record.offset, outcome.epoch
            )
            self.on_published(outcome)

        def on_error(exc: BaseException) -> None:
            with self._lock:
                if settled[0]:
                    return
                settled[0] = True
                self._unacked.pop(send_id, None)
            self._failed(outcome, attempt, exc)

        for record in records:
            try:
                future = self.producer.send(
                    record.topic, key=record.key, value=record.value, headers=record.headers
                )
            except Exception as exc:  # noqa: BLE001 - routed below, like an async failure
                on_error(exc)
                return
            future.add_callback(on_success)
            future.add_errback(on_error)

    def _failed(self, outcome: Outcome, attempt: int, exc: BaseException) -> None:
        """Producer IO thread: decide, never send from here (a full buffer would block it)."""
        self.metrics.errors.labels(stage="publish").inc()
        if self.transaction is not None:
            self.fail(TransactionFailedError(f"output failed inside a transaction: {exc!r}"))
        elif isinstance(exc, RECORD_ERRORS):
            if outcome.rerouted:
                self.fail(PublishError(f"the dead letter of a refused output failed too: {exc!r}"))
            else:
                rerouted = self._rerouted(outcome, exc)
                self.on_rerouted(rerouted)
                self._queue(rerouted, 0, 0.0)
        elif isinstance(exc, (KafkaError, OSError)):
            self.health.broker_failed()
            delay = RESEND_BACKOFF_S[min(attempt, len(RESEND_BACKOFF_S) - 1)]
            log.warning("output not acknowledged (%s); sending again in %.1fs", exc, delay)
            self._queue(outcome, attempt + 1, delay)
        else:
            self.fail(PublishError(f"output failed: {type(exc).__name__}: {exc}"))

    def _queue(self, outcome: Outcome, attempt: int, delay: float) -> None:
        with self._lock:
            heapq.heappush(self._resend, (self.clock() + delay, next(self._seq), outcome, attempt))

    def _rerouted(self, outcome: Outcome, exc: BaseException) -> Outcome:
        """The record's own output was refused: its input is dead-lettered instead."""
        record = outcome.record
        log.warning(
            "output for %s/%d@%d refused (%s): dead-lettering the input",
            record.topic,
            record.partition,
            record.offset,
            type(exc).__name__,
            extra={
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "event_id": outcome.verdict.event_id if outcome.verdict else None,
            },
        )
        error = OutputRejectedError(f"{type(exc).__name__}: {exc}"[:500])
        dead_letter = DeadLetter(record, error.stage, type(exc).__name__, error.reason, str(error))
        return replace(outcome, verdict=None, dead_letter=dead_letter, internal=True, rerouted=True)
