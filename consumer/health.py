"""The metrics port: Prometheus' own WSGI app for ``/metrics`` plus ``/livez`` and ``/readyz``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

Clock = Callable[[], float]


class HealthState:
    """What ``/livez`` and ``/readyz`` answer, from facts the worker's loops report.

    Liveness: every registered loop beat within ``stale_after_s`` (a loop that is stuck in a
    call stops beating; an idle loop still beats), outputs are not stuck unacknowledged while
    the broker answers, and the worker has not spent ``assignment_timeout_s`` without
    partitions while its group was not stable. A restart helps in each of those cases.

    Readiness: live, the model warmed, partitions assigned, and the broker answered within
    ``broker_stale_after_s``. During a broker outage the worker is not ready but stays live
    (restarting it would not bring the broker back) until ``broker_retry_timeout_s``, when it
    exits on its own.
    """

    def __init__(
        self,
        stale_after_s: float,
        clock: Clock = time.monotonic,
        assignment_timeout_s: float = float("inf"),
        broker_stale_after_s: float = float("inf"),
        loops: tuple[str, ...] = ("main",),
    ) -> None:
        self.stale_after_s = stale_after_s
        self.assignment_timeout_s = assignment_timeout_s
        self.broker_stale_after_s = broker_stale_after_s
        self._clock = clock
        self._lock = threading.Lock()
        started = clock()
        self._beats: dict[str, float] = dict.fromkeys(loops, started)
        self._broker_ok_at = started
        self._broker_down_since: float | None = None
        self._unassigned_since: float | None = started
        self._group_stable = False
        self._oldest_unacked: Callable[[], float | None] = lambda: None
        self.model_ready = False
        self.partitions_assigned = False

    # -- reports from the loops ------------------------------------------------------------

    def beat(self, loop: str = "main") -> None:
        with self._lock:
            self._beats[loop] = self._clock()

    def retire(self, loop: str) -> None:
        """A loop that ended on purpose no longer counts."""
        with self._lock:
            self._beats.pop(loop, None)

    def broker_answered(self) -> None:
        with self._lock:
            self._broker_ok_at = self._clock()
            self._broker_down_since = None

    def broker_failed(self) -> None:
        with self._lock:
            if self._broker_down_since is None:
                self._broker_down_since = self._clock()

    def assignment(self, assigned: bool, group_stable: bool) -> None:
        with self._lock:
            self.partitions_assigned = assigned
            self._group_stable = group_stable
            if assigned or group_stable:
                self._unassigned_since = None
            elif self._unassigned_since is None:
                self._unassigned_since = self._clock()

    def watch_outputs(self, oldest_unacked: Callable[[], float | None]) -> None:
        """``oldest_unacked()``: when the oldest output still waiting for its ack was sent."""
        self._oldest_unacked = oldest_unacked

    # -- answers ------------------------------------------------------------------------------

    def broker_unreachable_for(self) -> float:
        """Seconds since the broker last answered, counted from the first failure seen."""
        with self._lock:
            if self._broker_down_since is None:
                return 0.0
            return self._clock() - self._broker_ok_at

    def problems(self) -> list[str]:
        """Why the worker is not live (empty when it is)."""
        now = self._clock()
        found = []
        with self._lock:
            for loop, at in self._beats.items():
                if now - at > self.stale_after_s:
                    found.append(f"{loop} loop stalled for {now - at:.0f}s")
            broker_ok = now - self._broker_ok_at <= self.broker_stale_after_s
            unassigned = self._unassigned_since
        oldest = self._oldest_unacked()
        if oldest is not None and broker_ok and now - oldest > self.stale_after_s:
            found.append(f"outputs unacknowledged for {now - oldest:.0f}s")
        if unassigned is not None and now - unassigned > self.assignment_timeout_s:
            found.append(f"no partitions and no stable group for {now - unassigned:.0f}s")
        return found

    def live(self) -> bool:
        return not self.problems()

    def broker_reachable(self) -> bool:
        with self._lock:
            return self._clock() - self._broker_ok_at <= self.broker_stale_after_s

    def ready(self) -> bool:
        return (
            self.model_ready
            and self.partitions_assigned
            and self.broker_reachable()
            and self.live()
        )


class _ThreadingWSGIServer(WSGIServer):
    daemon_threads = True

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(target=self._handle, args=(request, client_address), daemon=True)
        thread.start()

    def _handle(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - a broken scrape must not touch the worker
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


def _app(registry: CollectorRegistry, health: HealthState) -> Callable[..., Iterable[bytes]]:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in ("/livez", "/readyz"):
            ok = health.live() if path == "/livez" else health.ready()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [b"ok\n" if ok else b"not ready\n"]
        if path == "/metrics":
            return metrics_app(environ, start_response)
        # A misspelt probe path must fail, not pass with the metrics page.
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics, /livez or /readyz\n"]

    return app


class MetricsServer:
    """Serves the endpoints on a daemon thread; ``port=0`` picks a free one."""

    def __init__(self, registry: CollectorRegistry, health: HealthState, host: str, port: int):
        self._server = make_server(
            host, port, _app(registry, health), _ThreadingWSGIServer, handler_class=_QuietHandler
        )
        self.port = self._server.server_port
        self.host = host
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="clipguard-metrics", daemon=True
        )

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
