"""A deadline for native calls that Python cannot interrupt.

The C2PA library parses hostile input in native code: if it ever hangs, the calling
thread cannot be stopped. The call runs instead on one of a few daemon threads and the
caller waits at most the deadline, waiting for a free thread included. A call that
overruns keeps its thread until it ends; while every thread is taken, new calls wait
for one no longer than their deadline, so nothing queues without bound. Daemon threads
never hold up interpreter exit.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Generic, TypeVar

T = TypeVar("T")


class WatchdogTimeout(TimeoutError):
    """The call did not finish in time, or no thread came free in time to start it."""


class _Task(Generic[T]):
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn: Callable[[], T] | None = fn
        self.future: Future[T] = Future()


class Watchdog:
    """Runs callables on ``workers`` daemon threads with a per-call deadline."""

    def __init__(self, workers: int = 2, name: str = "clipguard-provenance") -> None:
        self._tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._slots = threading.BoundedSemaphore(workers)  # one per thread: a task never waits
        self._lock = threading.Lock()
        self._overdue = 0
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def overdue(self) -> int:
        """Calls that outlived their deadline and still hold a thread (a hang shows here)."""
        return self._overdue

    def run(self, fn: Callable[[], T], timeout_s: float) -> T:
        """``fn()`` or :class:`WatchdogTimeout` after ``timeout_s``; ``fn``'s errors propagate."""
        deadline = time.monotonic() + timeout_s
        if not self._slots.acquire(timeout=timeout_s):
            raise WatchdogTimeout(f"no free thread within {timeout_s:.3f} s")
        task: _Task[T] = _Task(fn)
        self._tasks.put(task)
        try:
            return task.future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            if task.future.cancel():
                task.fn = None  # never started: drop the closure (and the bytes it holds)
            else:
                with self._lock:
                    self._overdue += 1
                task.future.add_done_callback(self._overdue_done)
            raise WatchdogTimeout(f"no result within {timeout_s:.3f} s") from None

    def _overdue_done(self, _future: Future) -> None:
        with self._lock:
            self._overdue -= 1

    def _serve(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            try:
                fn, task.fn = task.fn, None
                if fn is not None and task.future.set_running_or_notify_cancel():
                    try:
                        task.future.set_result(fn())
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller, not lost
                        task.future.set_exception(exc)
            finally:
                self._slots.release()

    def close(self) -> None:
        """Stop the threads once idle; a thread stuck in a call ends with the process."""
        for _ in self._threads:
            self._tasks.put(None)
