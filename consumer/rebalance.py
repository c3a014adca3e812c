"""Rebalances, without ever waiting on the thread the callback blocks.

kafka-python 3 calls the listener on its IO thread while the consumer thread sits in
``poll()`` waiting for the same rebalance; the IO thread also sends the heartbeats. So the
listener only does what finishes at once: it queues a commit of each revoked partition's
acknowledged prefix (the request goes out ahead of the JoinGroup, while we still own the
partitions), forgets the rest (handed back to the next owner: duplicates, never gaps), and
bumps the partitions' epochs so the later stages drop their stale work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kafka.consumer.subscription_state import ConsumerRebalanceListener

from clipguard.consumer.committer import Committer
from clipguard.consumer.metrics import WorkerMetrics
from clipguard.consumer.offsets import OffsetTracker, TopicPartitionKey

log = logging.getLogger(__name__)


class Rebalancer(ConsumerRebalanceListener):
    def __init__(
        self,
        tracker: OffsetTracker,
        committer: Committer,
        metrics: WorkerMetrics,
        on_change: Callable[[set[TopicPartitionKey], set[TopicPartitionKey]], None],
    ) -> None:
        self.tracker = tracker
        self.committer = committer
        self.metrics = metrics
        self.on_change = on_change  # (added, removed) -> None

    def on_partitions_revoked(self, revoked: Any) -> None:
        gone = _keys(revoked)
        if not gone:
            return
        self.metrics.rebalances.labels(event="revoked").inc()
        self.committer.commit_revoked(gone)
        handed_back = sum(self.tracker.outstanding(tp) for tp in gone)
        if handed_back:
            log.info("rebalance: %d uncommitted events handed back", handed_back)
        self.tracker.forget(gone)
        self.on_change(set(), gone)

    def on_partitions_assigned(self, assigned: Any) -> None:
        added = _keys(assigned)
        if added:
            self.metrics.rebalances.labels(event="assigned").inc()
        self.on_change(added, set())

    def on_partitions_lost(self, lost: Any) -> None:
        """Lost, not revoked: someone else may own them already, so drop, never commit."""
        gone = _keys(lost)
        if gone:
            self.metrics.rebalances.labels(event="lost").inc()
        self.tracker.forget(gone)
        self.on_change(set(), gone)


def _keys(partitions: Any) -> set[TopicPartitionKey]:
    return {(tp.topic, tp.partition) for tp in partitions or ()}
