"""Rebalances, without ever waiting on the thread the callback blocks.

kafka-python 3 calls the listener on its IO thread while the consumer thread sits in
``poll()`` waiting for the same rebalance; the IO thread also sends the heartbeats. So the
listener only does what finishes at once: it queues a commit of each revoked partition's
acknowledged prefix (the request goes out ahead of the JoinGroup, while we still own the
partitions), forgets the rest (handed back to the next owner: duplicates, never gaps), and
bumps the partitions' epochs so the later stages drop their stale work.

One trap: kafka-python keeps a partition's fetch position when the new assignment gives it
back to the same member (even under the eager protocol, which revokes everything first). The
work handed back would then never be fetched again, and the next commit would pass it. So a
partition that comes straight back is sought to where its handed-back work began.
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
        seek: Callable[[TopicPartitionKey, int], None],
        skip_acknowledged: bool = True,
    ) -> None:
        self.tracker = tracker
        self.committer = committer
        self.metrics = metrics
        self.on_change = on_change  # (added, removed) -> None
        self.seek = seek
        #: At-least-once resumes after the acknowledged prefix (it is being committed);
        #: transactions resume at the last commit (the open transaction is aborted).
        self.skip_acknowledged = skip_acknowledged
        self._handed_back: dict[TopicPartitionKey, int] = {}

    def on_partitions_revoked(self, revoked: Any) -> None:
        gone = _keys(revoked)
        if not gone:
            return
        self.metrics.rebalances.labels(event="revoked").inc()
        for tp in gone:
            resume = self.tracker.resume_position(tp, self.skip_acknowledged)
            if resume is not None:
                self._handed_back[tp] = resume
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
        for tp in added & set(self._handed_back):
            log.info("rebalance: %s came straight back; resuming at %d", tp, self._handed_back[tp])
            self.seek(tp, self._handed_back[tp])
        self._handed_back.clear()  # a partition that went elsewhere restarts from its commit
        self.on_change(added, set())

    def on_partitions_lost(self, lost: Any) -> None:
        """Lost, not revoked: someone else may own them already, so drop, never commit."""
        gone = _keys(lost)
        if gone:
            self.metrics.rebalances.labels(event="lost").inc()
        for tp in gone:
            self._handed_back.pop(tp, None)
        self.tracker.forget(gone)
        self.on_change(set(), gone)


def _keys(partitions: Any) -> set[TopicPartitionKey]:
    return {(tp.topic, tp.partition) for tp in partitions or ()}
