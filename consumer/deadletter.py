"""The dead-letter brake: stop the worker instead of draining a topic into the DLQ.

After a bad deploy (wrong checkpoint, broken decoder) every event fails; without a limit the
worker would happily dead-letter the whole backlog and commit past it (arroyo's ``DlqLimit``).
"""

from __future__ import annotations

from collections import deque

from pydantic import BaseModel, ConfigDict, Field

from clipguard.consumer.errors import DeadLetterRateExceeded


class DeadLetterLimit(BaseModel):
    """``max_consecutive`` dead letters in a row, or more than ``max_ratio`` of the last
    ``window`` outcomes, stop the worker. Zero disables a check."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_consecutive: int = Field(default=200, ge=0)
    max_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    window: int = Field(default=1000, ge=1)


class DeadLetterBrake:
    def __init__(self, limit: DeadLetterLimit) -> None:
        self.limit = limit
        self.consecutive = 0
        self._recent: deque[bool] = deque(maxlen=limit.window)

    def record(self, dead_lettered: bool) -> None:
        """Count one outcome; raise :class:`DeadLetterRateExceeded` when a limit is passed."""
        self.consecutive = self.consecutive + 1 if dead_lettered else 0
        self._recent.append(dead_lettered)
        limit = self.limit
        if limit.max_consecutive and self.consecutive >= limit.max_consecutive:
            raise DeadLetterRateExceeded(
                f"{self.consecutive} dead letters in a row (limit {limit.max_consecutive}): "
                "stopping so a bad deploy does not drain the topic into the DLQ"
            )
        if limit.max_ratio and len(self._recent) == limit.window:
            ratio = sum(self._recent) / limit.window
            if ratio > limit.max_ratio:
                raise DeadLetterRateExceeded(
                    f"{ratio:.0%} of the last {limit.window} events were dead-lettered "
                    f"(limit {limit.max_ratio:.0%})"
                )
