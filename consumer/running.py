"""A worker serving on a thread of this process: start, wait until ready, stop, raise.

Used by ``clipguard serve``, the demo, the bench and the tests, so there is one way to run
a worker and one way to learn what stopped it.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

from clipguard.consumer.worker import Worker


class WorkerNotReadyError(RuntimeError):
    """The worker did not become ready in time (and did not fail either)."""


class RunningWorker:
    def __init__(self, worker: Worker, stop: threading.Event | None = None) -> None:
        self.worker = worker
        self.stop_event = stop or threading.Event()
        self.error: BaseException | None = None
        self.ready_at: float | None = None  # perf_counter when readiness was first seen
        self._thread = threading.Thread(target=self._serve, name="clipguard-worker", daemon=True)

    def _serve(self) -> None:
        try:
            self.worker.run(self.stop_event)
        except BaseException as exc:  # noqa: BLE001 - raised by stop()/wait_ready() instead
            self.error = exc

    def start(self) -> RunningWorker:
        self._thread.start()
        return self

    def alive(self) -> bool:
        return self._thread.is_alive()

    def wait_ready(self, timeout_s: float = 60.0, poll_s: float = 0.01) -> RunningWorker:
        """Block until warm with partitions assigned; raise what stopped it, or a timeout."""
        deadline = time.monotonic() + timeout_s
        while not self.worker.health.ready():
            if not self.alive():
                self.join(0)
                raise WorkerNotReadyError("the worker stopped before it was ready")
            if time.monotonic() > deadline:
                raise WorkerNotReadyError(f"the worker was not ready after {timeout_s:g}s")
            time.sleep(poll_s)
        self.ready_at = time.perf_counter()
        return self

    def join(self, timeout_s: float | None = None) -> None:
        """Wait for the thread; raise what stopped the worker, if anything did."""
        self._thread.join(timeout_s)
        if self.error is not None:
            raise self.error

    def stop(self, timeout_s: float = 120.0) -> None:
        """Drain, commit and stop; raise what stopped it, or if it would not stop."""
        self.stop_event.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise WorkerNotReadyError(f"the worker did not stop within {timeout_s:g}s")
        if self.error is not None:
            raise self.error

    def __enter__(self) -> RunningWorker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.stop()
        else:  # the body failed: stop, but do not hide its error behind the worker's
            self.stop_event.set()
            self._thread.join(120)
