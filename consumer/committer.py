"""The one place input offsets move (arroyo's ``CommitOffsets``, always last in the chain).

Two strategies behind one interface, both called on the consumer thread only:

- :class:`OffsetCommitter` (at-least-once): commits each partition's acknowledged prefix
  with an OffsetCommit request;
- :class:`TransactionCommitter` (``exactly_once``): outputs are sent inside an open producer
  transaction; a commit flushes them, adds the acknowledged prefix with
  ``send_offsets_to_transaction`` and commits the transaction, then opens the next one.

A failed commit is not fatal here: the offsets stay uncommitted and are tried again on the
next round (at-least-once), so a broker hiccup costs duplicates at worst, never a gap.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable
from typing import Any, Protocol

from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from clipguard.consumer.metrics import WorkerMetrics
from clipguard.consumer.offsets import OffsetTracker, TopicPartitionKey
from clipguard.detector.errors import ClipguardError

log = logging.getLogger(__name__)


class TransactionFailedError(ClipguardError):
    """A transaction could not be committed: its outputs are aborted, the worker stops so the
    group redelivers the uncommitted events (exactly-once has no partial retry)."""

    stage = "commit"
    reason = "transaction_failed"


def _kafka_offsets(positions: dict[TopicPartitionKey, int]) -> dict[TopicPartition, Any]:
    return {
        TopicPartition(topic, partition): OffsetAndMetadata(offset, "", -1)
        for (topic, partition), offset in positions.items()
    }


class Committer(Protocol):
    def commit(self) -> bool:
        """Commit what is acknowledged; True when the broker took it (or nothing was due)."""

    def commit_revoked(self, partitions: Iterable[TopicPartitionKey]) -> None:
        """From the rebalance callback (client IO thread): never blocks."""

    def settle(self) -> None:
        """On the consumer thread after a poll: finish what a rebalance left to do."""


class OffsetCommitter:
    def __init__(self, consumer: Any, tracker: OffsetTracker, metrics: WorkerMetrics) -> None:
        self.consumer = consumer
        self.tracker = tracker
        self.metrics = metrics

    def commit(self) -> bool:
        positions = self.tracker.committable()
        if not positions:
            return True
        try:
            self.consumer.commit(_kafka_offsets(positions))
        except KafkaError as exc:  # rebalance in progress, coordinator moved, broker away
            self.metrics.commits.labels(result="failure").inc()
            log.warning("offset commit failed (will retry): %s", exc)
            return False
        self.metrics.commits.labels(result="success").inc()
        self.tracker.committed(positions)
        return True

    def commit_revoked(self, partitions: Iterable[TopicPartitionKey]) -> None:
        """Fire-and-forget commit of the revoked partitions' acknowledged prefix.

        The rebalance callback runs on kafka-python's IO thread, where a blocking commit is
        impossible; the request is queued on that connection ahead of the JoinGroup, so the
        broker sees it while we still own the partitions. Everything after the prefix is
        handed back and redelivered to the next owner (duplicates, never gaps).
        """
        positions = self.tracker.committable(only=partitions)
        if not positions:
            return

        def done(_offsets: Any, response: Any) -> None:
            result = "failure" if isinstance(response, Exception) else "success"
            self.metrics.commits.labels(result=result).inc()

        try:
            self.consumer.commit_async(_kafka_offsets(positions), callback=done)
        except KafkaError as exc:
            log.warning("commit of revoked partitions failed: %s", exc)

    def settle(self) -> None:
        return


class TransactionCommitter:
    """Outputs and offsets in one transaction; ``lock`` is shared with the publisher so no
    output is sent while a transaction is being committed."""

    def __init__(
        self,
        consumer: Any,
        producer: Any,
        tracker: OffsetTracker,
        metrics: WorkerMetrics,
        lock: threading.Lock,
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.tracker = tracker
        self.metrics = metrics
        self.lock = lock
        self.open = False
        self.dirty = False  # outputs were sent in the open transaction
        self.abort_pending = False

    def begin(self) -> None:
        with self.lock:
            self._begin()

    def _begin(self) -> None:
        if not self.open:
            self.producer.begin_transaction()
            self.open = True
            self.dirty = False

    def sent(self) -> None:
        """The publisher sent outputs inside the open transaction (called under ``lock``)."""
        self.dirty = True

    def commit(self) -> bool:
        with self.lock:
            if not self.dirty:
                return True
            try:
                self.producer.flush()
                positions = self.tracker.committable()
                if positions:
                    self.producer.send_offsets_to_transaction(
                        _kafka_offsets(positions), self.consumer.group_metadata()
                    )
                self.producer.commit_transaction()
            except Exception as exc:
                self.metrics.commits.labels(result="failure").inc()
                with contextlib.suppress(Exception):
                    self.producer.abort_transaction()
                self.open = False
                raise TransactionFailedError(
                    f"transaction failed: {type(exc).__name__}: {exc}"
                ) from exc
            self.open = False
            self.metrics.commits.labels(result="success").inc()
            if positions:
                self.tracker.committed(positions)
            self._begin()
            return True

    def commit_revoked(self, partitions: Iterable[TopicPartitionKey]) -> None:
        """Nothing can be committed from the IO thread: the open transaction is aborted on the
        consumer thread right after the rebalance (:meth:`settle`), and the events it held are
        redelivered to their next owner. (``exactly_once`` requires the range assignor, which
        revokes every partition, so nothing of a kept partition is in that transaction.)"""
        self.abort_pending = True

    def settle(self) -> None:
        if not self.abort_pending:
            return
        with self.lock:
            self.abort_pending = False
            if self.open and self.dirty:
                try:
                    self.producer.abort_transaction()
                except Exception as exc:
                    raise TransactionFailedError(f"abort after a rebalance failed: {exc}") from exc
                self.open = False
                self._begin()
