"""The inference stage: the one thread that owns the model.

It closes a batch at ``max_batch_size`` ready events or ``max_batch_wait_ms`` after its first
event was consumed (Triton's dynamic batcher), drops work whose partition was taken away
meanwhile, runs the batch, and hands the outcomes to the publisher. Between batches it lets
the publisher send again what is due.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable

from clipguard.consumer.batching import Batcher
from clipguard.consumer.health import HealthState
from clipguard.consumer.judge import Decoded, Judge
from clipguard.consumer.metrics import WorkerMetrics
from clipguard.consumer.outcomes import Outcome
from clipguard.consumer.publish import Publisher

log = logging.getLogger(__name__)

LOOP = "inference"
IDLE_WAIT_S = 0.2


class InferenceStage:
    def __init__(
        self,
        judge: Judge,
        publisher: Publisher,
        metrics: WorkerMetrics,
        health: HealthState,
        max_batch_size: int,
        max_batch_wait_s: float,
        is_current: Callable[[Decoded], bool],
        on_outcomes: Callable[[list[Outcome]], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.judge = judge
        self.publisher = publisher
        self.metrics = metrics
        self.health = health
        self.max_batch_size = max_batch_size
        self.max_batch_wait_s = max_batch_wait_s
        self.is_current = is_current
        self.on_outcomes = on_outcomes
        self.clock = clock
        self.ready: queue.Queue[Decoded] = queue.Queue()
        self.stale_dropped = 0

    def put(self, decoded: Decoded) -> None:
        """The prepare stage's ``deliver`` (any thread)."""
        self.ready.put(decoded)

    def run(self, running: Callable[[], bool]) -> None:
        """Serve batches while ``running()``; exceptions propagate to the caller's thread."""
        while running():
            self.health.beat(LOOP)
            self.publisher.service()
            batch = self._next_batch()
            if batch:
                self._run(batch)

    def _next_batch(self) -> list[Decoded]:
        """Wait for a first ready event, then gather until full or its deadline passed.

        Whatever is already ready joins before the deadline is looked at: under a backlog
        the first event's wait has long passed, and closing on it alone would run batches
        of one.
        """
        batcher = Batcher(self.max_batch_size, self.max_batch_wait_s)
        items: list[Decoded] = []
        while len(items) < self.max_batch_size:
            try:
                item = self.ready.get_nowait()
            except queue.Empty:
                if items and batcher.ready(self.clock()):
                    break
                timeout = IDLE_WAIT_S if not items else batcher.time_left(self.clock())
                try:
                    item = self.ready.get(timeout=min(IDLE_WAIT_S, max(0.0005, timeout)))
                except queue.Empty:
                    if not items:
                        return items
                    continue
            if not self.is_current(item):
                self.stale_dropped += 1
                continue
            items.append(item)
            batcher.add(item.item)
        return items

    def _run(self, batch: list[Decoded]) -> None:
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_wait_seconds.observe(max(0.0, self.clock() - batch[0].item.received_at))
        outcomes = self.judge.finish(batch)
        self.publisher.publish(outcomes)
        self.on_outcomes(outcomes)
