"""Which offsets may be committed: only up to the highest contiguous acknowledged one.

A partition's commit position never moves backwards and never passes an offset whose
verdict or dead letter has not been acknowledged by the broker (DESIGN.md "nothing is lost").
"""

from __future__ import annotations

from collections.abc import Iterable

TopicPartitionKey = tuple[str, int]


class OffsetTracker:
    def __init__(self) -> None:
        self._outstanding: dict[TopicPartitionKey, set[int]] = {}
        self._done: dict[TopicPartitionKey, set[int]] = {}
        self._next: dict[TopicPartitionKey, int] = {}
        self._committed: dict[TopicPartitionKey, int] = {}

    def consumed(self, tp: TopicPartitionKey, offset: int) -> None:
        self._outstanding.setdefault(tp, set()).add(offset)
        self._next.setdefault(tp, offset)

    def acknowledged(self, tp: TopicPartitionKey, offset: int) -> None:
        if offset not in self._outstanding.get(tp, set()):
            return
        self._done.setdefault(tp, set()).add(offset)

    def outstanding(self, tp: TopicPartitionKey) -> int:
        """Consumed offsets of ``tp`` not yet committed."""
        return len(self._outstanding.get(tp, ()))

    def inflight(self) -> int:
        return sum(len(offsets) for offsets in self._outstanding.values())

    def committable(self) -> dict[TopicPartitionKey, int]:
        """Next offset to commit per partition, for partitions that advanced."""
        result: dict[TopicPartitionKey, int] = {}
        for tp, outstanding in self._outstanding.items():
            done = self._done.get(tp, set())
            if not done:
                continue
            cursor = min(outstanding)
            while cursor in done:
                outstanding.discard(cursor)
                done.discard(cursor)
                cursor += 1
            if cursor > self._committed.get(tp, -1) and cursor > self._next[tp]:
                result[tp] = cursor
        return result

    def committed(self, positions: dict[TopicPartitionKey, int]) -> None:
        for tp, offset in positions.items():
            self._committed[tp] = max(offset, self._committed.get(tp, -1))
            self._next[tp] = max(offset, self._next.get(tp, offset))

    def forget(self, tps: Iterable[TopicPartitionKey]) -> None:
        """Partitions that left us: their uncommitted work belongs to the next owner."""
        for tp in tps:
            for table in (self._outstanding, self._done, self._next, self._committed):
                table.pop(tp, None)
