"""In-order release, for exactly-once only.

A transaction commits its outputs together with each partition's contiguous prefix of
offsets. An output of an offset beyond that prefix would be committed without its offset,
and judged (and seen by ``read_committed`` readers) again after a restart. So with
transactions, prepared records are released to the batcher in consumption order per
partition; at-least-once skips this stage and batches whatever is ready first.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from clipguard.consumer.judge import Decoded
from clipguard.consumer.offsets import TopicPartitionKey


class InOrderRelease:
    def __init__(self, release: Callable[[Decoded], None]) -> None:
        self.release = release
        self._lock = threading.Lock()
        self._expected: dict[TopicPartitionKey, deque[int]] = {}
        self._done: dict[TopicPartitionKey, dict[int, Decoded]] = {}
        self._epoch: dict[TopicPartitionKey, int | None] = {}

    def expect(self, tp: TopicPartitionKey, offset: int, epoch: int | None) -> None:
        """Called in consumption order (consumer thread), before the record is prepared."""
        with self._lock:
            self._expected.setdefault(tp, deque()).append(offset)
            self._epoch[tp] = epoch

    def __call__(self, decoded: Decoded) -> None:
        record = decoded.item.record
        tp = (record.topic, record.partition)
        out: list[Decoded] = []
        with self._lock:
            expected = self._expected.get(tp)
            if expected is None or self._epoch.get(tp) != decoded.item.epoch:
                return  # consumed under an earlier assignment: nothing waits for it any more
            done = self._done.setdefault(tp, {})
            done[record.offset] = decoded
            while expected and expected[0] in done:
                out.append(done.pop(expected.popleft()))
        for item in out:
            self.release(item)

    def forget(self, tps: set[TopicPartitionKey]) -> None:
        with self._lock:
            for tp in tps:
                self._expected.pop(tp, None)
                self._done.pop(tp, None)
                self._epoch.pop(tp, None)
