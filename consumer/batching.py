"""Dynamic batching: a batch closes at ``max_size`` events or ``max_wait_s`` after its first.

Time is injected (``now`` arguments), so the deadline logic is tested without sleeps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from clipguard.consumer.records import RecordRef


@dataclass(frozen=True)
class Pending:
    """A consumed record waiting for its batch, with when it arrived (monotonic seconds)."""

    record: RecordRef
    received_at: float
    #: The partition's epoch at consumption (:class:`~clipguard.consumer.offsets.OffsetTracker`).
    epoch: int | None = None


class Batcher:
    def __init__(self, max_size: int, max_wait_s: float) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self._items: deque[Pending] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: Pending) -> None:
        self._items.append(item)

    def ready(self, now: float) -> bool:
        if not self._items:
            return False
        return len(self._items) >= self.max_size or self.time_left(now) <= 0.0

    def time_left(self, now: float) -> float:
        """Seconds until the open batch must close (``inf`` when empty)."""
        if not self._items:
            return float("inf")
        return self._items[0].received_at + self.max_wait_s - now

    def take(self) -> list[Pending]:
        count = min(self.max_size, len(self._items))
        return [self._items.popleft() for _ in range(count)]

    def take_where(self, keep: Callable[[Pending], bool]) -> list[Pending]:
        """Remove and return every waiting item matching ``keep`` (e.g. revoked partitions)."""
        taken = [item for item in self._items if keep(item)]
        self._items = deque(item for item in self._items if not keep(item))
        return taken

    def extend(self, items: Iterable[Pending]) -> None:
        self._items.extend(items)
