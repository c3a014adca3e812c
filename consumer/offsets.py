"""Which offsets may be committed: only past a partition's contiguous acknowledged prefix.

A partition's commit position never moves backwards and never passes an offset whose
verdict or dead letter has not been acknowledged by the broker (DESIGN.md "nothing is lost").
Acknowledgements may arrive in any order (ready-first batching, producer callbacks); the
prefix is walked in consumption order, so offsets the consumer never saw (transaction
markers, compacted records) are not waited for.

Thread-safe: the consumer thread consumes and commits, producer callbacks acknowledge.
Each partition gets a new *epoch* whenever it is (re)taken after being forgotten, so work
consumed under an earlier assignment can be recognised as stale.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

TopicPartitionKey = tuple[str, int]


class BackwardsCommitError(RuntimeError):
    """A commit position below the last one: a bug, never sent to the broker."""


@dataclass
class _Partition:
    epoch: int
    consumed: list[int] = field(default_factory=list)  # in consumption order, uncommitted
    pending: set[int] = field(default_factory=set)  # the same offsets, for lookups
    acked: set[int] = field(default_factory=set)
    committed: int = -1


class OffsetTracker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partitions: dict[TopicPartitionKey, _Partition] = {}
        self._epochs = itertools.count(1)

    def consumed(self, tp: TopicPartitionKey, offset: int) -> int:
        """Record a consumed offset; returns the partition's current epoch."""
        with self._lock:
            state = self._partitions.get(tp)
            if state is None:
                state = self._partitions[tp] = _Partition(next(self._epochs))
            if not state.consumed or offset > state.consumed[-1]:
                state.consumed.append(offset)
                state.pending.add(offset)
            return state.epoch

    def acknowledged(self, tp: TopicPartitionKey, offset: int, epoch: int | None = None) -> None:
        """The broker holds this offset's outputs. Unknown offsets and stale epochs are ignored."""
        with self._lock:
            state = self._partitions.get(tp)
            if state is None or (epoch is not None and epoch != state.epoch):
                return
            if offset in state.pending:
                state.acked.add(offset)

    def is_current(self, tp: TopicPartitionKey, epoch: int) -> bool:
        with self._lock:
            state = self._partitions.get(tp)
            return state is not None and state.epoch == epoch

    def outstanding(self, tp: TopicPartitionKey) -> int:
        """Consumed offsets of ``tp`` not yet committed."""
        with self._lock:
            state = self._partitions.get(tp)
            return len(state.consumed) if state else 0

    def inflight(self) -> int:
        with self._lock:
            return sum(len(state.consumed) for state in self._partitions.values())

    def unacknowledged(self) -> int:
        with self._lock:
            return sum(
                len(state.consumed) - len(state.acked) for state in self._partitions.values()
            )

    def committable(
        self, only: Iterable[TopicPartitionKey] | None = None
    ) -> dict[TopicPartitionKey, int]:
        """Next offset to commit per partition, for partitions whose prefix advanced."""
        wanted = set(only) if only is not None else None
        result: dict[TopicPartitionKey, int] = {}
        with self._lock:
            for tp, state in self._partitions.items():
                if wanted is not None and tp not in wanted:
                    continue
                position = None
                for offset in state.consumed:
                    if offset not in state.acked:
                        break
                    position = offset + 1
                if position is not None and position > state.committed:
                    result[tp] = position
        return result

    def resume_position(self, tp: TopicPartitionKey, skip_acknowledged: bool) -> int | None:
        """Where consumption of ``tp`` must resume for nothing to be skipped: the first
        consumed offset not yet committed, or (``skip_acknowledged``, at-least-once) the first
        one after the contiguous acknowledged prefix. None when nothing is outstanding."""
        with self._lock:
            state = self._partitions.get(tp)
            if state is None or not state.consumed:
                return None
            if not skip_acknowledged:
                return state.consumed[0]
            for offset in state.consumed:
                if offset not in state.acked:
                    return offset
            return None

    def committed(self, positions: dict[TopicPartitionKey, int]) -> None:
        """The broker took these positions: drop what they cover. Refuses to go backwards."""
        with self._lock:
            for tp, position in positions.items():
                state = self._partitions.get(tp)
                if state is None:  # forgotten meanwhile (a rebalance): nothing to drop
                    continue
                if position < state.committed:
                    raise BackwardsCommitError(
                        f"{tp}: commit {position} is behind the committed {state.committed}"
                    )
                state.committed = position
                state.consumed = [o for o in state.consumed if o >= position]
                state.pending = set(state.consumed)
                state.acked = {o for o in state.acked if o >= position}

    def forget(self, tps: Iterable[TopicPartitionKey]) -> None:
        """Partitions that left us: their uncommitted work belongs to the next owner."""
        with self._lock:
            for tp in tps:
                self._partitions.pop(tp, None)

    def partitions(self) -> set[TopicPartitionKey]:
        with self._lock:
            return set(self._partitions)
