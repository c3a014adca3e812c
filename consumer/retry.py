"""Retry transient source errors with bounded, jittered exponential backoff.

Time is injected (``sleep``, ``jitter``) so tests check the schedule without sleeping.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from clipguard.consumer.errors import SourceError

T = TypeVar("T")


def backoff_delay(retry_number: int, base_delay: float, max_delay: float, jitter: float) -> float:
    """Delay before retry ``retry_number`` (1-based): ``base * 2**(n-1)`` capped at
    ``max_delay``, then scaled into its upper half by ``jitter`` in [0, 1] so that
    workers failing together do not retry together, yet never retry immediately."""
    ceiling = min(max_delay, base_delay * 2 ** (retry_number - 1))
    return ceiling * (0.5 + 0.5 * min(max(jitter, 0.0), 1.0))


def retry(
    fn: Callable[[], T],
    attempts: int = 3,
    base_delay: float = 0.2,
    max_delay: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
    jitter: Callable[[], float] = random.random,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``fn()``, called up to ``attempts`` times while it raises transient SourceErrors.

    Permanent errors propagate at once. When the attempts run out, or the next attempt would
    start past ``deadline``, the last error is raised again, still transient, so the worker
    dead-letters it with its real reason.
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except SourceError as exc:
            if exc.permanent:
                raise
            delay = backoff_delay(attempt, base_delay, max_delay, jitter())
            out_of_time = deadline is not None and clock() + delay >= deadline
            if attempt == attempts or out_of_time:
                if attempt == 1:
                    raise
                raise SourceError(
                    f"{exc} (gave up after {attempt} attempts)", exc.reason, permanent=False
                ) from exc
            sleep(delay)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class RetryPolicy:
    """:func:`retry`'s parameters as one value that settings can build."""

    attempts: int = 3
    base_delay: float = 0.2
    max_delay: float = 2.0
    sleep: Callable[[float], None] = time.sleep
    jitter: Callable[[], float] = random.random

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("retry policy needs attempts >= 1 and non-negative delays")

    def __call__(self, fn: Callable[[], T], deadline: float | None = None) -> T:
        return retry(
            fn, self.attempts, self.base_delay, self.max_delay, self.sleep, self.jitter, deadline
        )
