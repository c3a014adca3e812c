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
#: An output that failed this often while the broker answers gets a new producer...
REBUILD_AFTER_ATTEMPTS = 2
#: ...at most this often.
REBUILD_INTERVAL_S = 10.0


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
        producer_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.producer = producer
        self.producer_factory = producer_factory
        self._rebuilt_at = clock()
        self._next_warning = 0.0
        self._failures_since_warning = 0
        self.fitter = fitter
        self.tracker = tracker
        self.metrics = metrics
        self.health = health
        self.fail = fail
        self.transaction = transaction
        self.clock = clock
        self._lock = threading.Lock()
        # (due, seq, outcome, attempt, first sent at)
        self._resend: list[tuple[float, int, Outcome, int, float]] = []
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
                _, _, outcome, attempt, first_sent = heapq.heappop(self._resend)
            if attempt >= REBUILD_AFTER_ATTEMPTS:
                self._maybe_rebuild(now)
            if self._current(outcome):
                self._send(outcome, attempt, first_sent)

    def _maybe_rebuild(self, now: float) -> None:
        """A producer that keeps failing after the broker came back may be dead for good
        (kafka-python's idempotent producer goes fatal when a restarted broker has lost its
        producer state): replace it. Its unsent records fail and are queued again."""
        if self.producer_factory is None or now - self._rebuilt_at < REBUILD_INTERVAL_S:
            return
        self._rebuilt_at = now
        if not self.health.broker_reachable():
            return  # the broker is away: a new producer would fail the same way
        try:
            fresh = self.producer_factory()
        except Exception as exc:  # noqa: BLE001 - keep the old one, try again later
            log.warning("could not build a new producer yet: %s", exc)
            return
        old, self.producer = self.producer, fresh
        log.warning("outputs kept failing while the broker answers: replaced the producer")
        self.metrics.errors.labels(stage="producer_rebuilt").inc()
        try:
            old.close(timeout=0)
        except Exception as exc:  # noqa: BLE001 - a dead producer may not close cleanly
            log.debug("closing the old producer: %s", exc)

    def oldest_unacked(self) -> float | None:
        """When the oldest output still waiting (sent, or queued to be sent again) was first
        sent: a publisher stuck retrying shows here and fails liveness."""
        with self._lock:
            sent = min(self._unacked.values(), default=None)
            queued = min((entry[4] for entry in self._resend), default=None)
        return min((t for t in (sent, queued) if t is not None), default=None)

    def pending(self) -> int:
        with self._lock:
            return len(self._unacked) + len(self._resend)

    # -- sending --------------------------------------------------------------------------

    def _current(self, outcome: Outcome) -> bool:
        record = outcome.record
        return outcome.epoch is None or self.tracker.is_current(
            (record.topic, record.partition), outcome.epoch
        )

    def _send(self, outcome: Outcome, attempt: int, first_sent: float | None = None) -> None:
        first_sent = self.clock() if first_sent is None else first_sent
        try:
            records = self.fitter.records(outcome)
        except OutputTooLargeError as exc:
            self._failed(outcome, attempt, exc, first_sent)
            return
        send_id = next(self._seq)
        remaining = [len(records)]
        settled = [False]
        with self._lock:
            self._unacked[send_id] = first_sent

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
            self._failed(outcome, attempt, exc, first_sent)

        producer = self.producer
        for record in records:
            try:
                future = producer.send(
                    record.topic, key=record.key, value=record.value, headers=record.headers
                )
            except Exception as exc:  # noqa: BLE001 - routed below, like an async failure
                on_error(exc)
                return
            future.add_callback(on_success)
            future.add_errback(on_error)

    def _failed(
        self, outcome: Outcome, attempt: int, exc: BaseException, first_sent: float
    ) -> None:
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
                self._queue(rerouted, 0, 0.0, first_sent)
        elif isinstance(exc, (KafkaError, OSError)):
            delay = RESEND_BACKOFF_S[min(attempt, len(RESEND_BACKOFF_S) - 1)]
            self._warn_resend(exc, delay)
            self._queue(outcome, attempt + 1, delay, first_sent)
        else:
            self.fail(PublishError(f"output failed: {type(exc).__name__}: {exc}"))

    def _queue(self, outcome: Outcome, attempt: int, delay: float, first_sent: float) -> None:
        with self._lock:
            entry = (self.clock() + delay, next(self._seq), outcome, attempt, first_sent)
            heapq.heappush(self._resend, entry)

    def _warn_resend(self, exc: BaseException, delay: float) -> None:
        """One line per 10 s, with how many outputs failed meanwhile (not one per output)."""
        now = self.clock()
        with self._lock:
            self._failures_since_warning += 1
            if now < self._next_warning:
                return
            count, self._failures_since_warning = self._failures_since_warning, 0
            self._next_warning = now + 10.0
        log.warning(
            "%d output(s) not acknowledged (last: %s: %s); sending again after %.1fs",
            count,
            type(exc).__name__,
            str(exc)[:200],
            delay,
        )

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
