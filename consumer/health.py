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
    """Liveness is a recent loop heartbeat; readiness is model warmed and partitions owned."""

    def __init__(self, stale_after_s: float, clock: Clock = time.monotonic) -> None:
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._last_beat = clock()
        self.model_ready = False
        self.partitions_assigned = False

    def beat(self) -> None:
        self._last_beat = self._clock()

    def live(self) -> bool:
        return self._clock() - self._last_beat <= self.stale_after_s

    def ready(self) -> bool:
        return self.model_ready and self.partitions_assigned and self.live()


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
