"""A real Prometheus scraping real workers: every dashboard query answers, every alert evaluates.

Prometheus (Debian's ``prometheus`` package; .ci/run installs it) runs on loopback, scraping
every second, evaluating every second, with a copy of deploy/prometheus/alerts.yml that this
test generates. The copy differs from the real rules only in time scales a two-minute test can
reach, and each difference is printed:

- every ``for:`` is shortened to :data:`FOR`;
- ``ClipguardConsumerLagHigh``: ``> 10000`` records becomes ``> LAG_THRESHOLD`` and the
  ``[15m:1m]`` trend window becomes ``[30s:1s]`` (10000 records of backlog and a 15-minute
  trend would take minutes of both cores).

Every original expression is also evaluated unchanged through the HTTP API and must not error.

Workers (threads of this process, each with its own metrics server on a free port), all in
one consumer group on the embedded broker:

- ``a`` serves from the start; a steady trickle of uploads (good images, bad ones that are
  dead-lettered, a few large images) runs the whole time;
- ``b`` joins (a rebalance), serves, then leaves (another rebalance; its target goes down);
- ``c`` is a worker whose metrics endpoint is up but whose model never warmed (the state a
  worker stuck in start-up reports): never ready;
- a slow image server (a real HTTP server on loopback) makes URL uploads take
  :data:`SLOW_S` each: with a small in-flight cap the group falls behind (slow batches,
  backpressure) and the lag grows.

Then every panel target is evaluated over the run (``query_range``), with Grafana's variables
substituted as Grafana does, and must return data; every alert must evaluate without error,
and the provoked ones must fire: dead letters, a not-ready worker, a worker down, lag growing,
and, once ``a`` has stopped too, no ready worker.

``DASHBOARD_PNG=deploy/dashboard.png`` also draws the dashboard from this run
with ``clipguard dashboard-png`` (and runs the traffic three times as long).
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import image_bytes
from kafka import KafkaProducer
from PIL import Image
from provenance_assets import png_with_text
from streams import fresh_topics, worker_settings

from clipguard.cli.dashboard_png import (
    Prometheus,
    PrometheusError,
    load_panels,
    rate_interval,
    substitute,
)
from clipguard.cli.main import main
from clipguard.consumer.running import RunningWorker
from clipguard.consumer.worker import Worker, engine_from_settings

pytestmark = [pytest.mark.broker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "clipguard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
SCRAPE_S = 1.0
STEP_S = 1.0
FOR = "2s"
LAG_THRESHOLD = 30
SLOW_S = 0.5
PNG_ENV = "DASHBOARD_PNG"
#: Alerts this test provokes: each must fire.
PROVOKED = (
    "ClipguardDeadLetterRateHigh",
    "ClipguardWorkerNotReady",
    "ClipguardWorkerDown",
    "ClipguardConsumerLagHigh",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rules_for_test(source: Path, target: Path) -> list[str]:
    """The alert rules with test-sized time scales; returns what was changed."""
    rules = yaml.safe_load(source.read_text())
    changes = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                changes.append(f"{rule['alert']}: for {rule['for']} -> {FOR}")
                rule["for"] = FOR
            if rule["alert"] == "ClipguardConsumerLagHigh":
                expr = rule["expr"]
                new = expr.replace("> 10000", f"> {LAG_THRESHOLD}").replace("[15m:1m]", "[30s:1s]")
                assert new != expr, "the lag rule changed: update this test"
                changes.append(
                    f"{rule['alert']}: > 10000 -> > {LAG_THRESHOLD}, [15m:1m] -> [30s:1s]"
                )
                rule["expr"] = new
    target.write_text(yaml.safe_dump(rules, sort_keys=False))
    return changes


class Targets:
    """The scrape targets, as a file Prometheus watches (file_sd)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ports: dict[str, int] = {}
        self.write()

    def add(self, name: str, port: int) -> None:
        self.ports[name] = port
        self.write()

    def write(self) -> None:
        groups = [
            {"targets": [f"127.0.0.1:{port}"], "labels": {"worker": name}}
            for name, port in self.ports.items()
        ]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        tmp.replace(self.path)


@contextlib.contextmanager
def prometheus_server(tmp: Path, rules: Path, targets: Path) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus server binary not found (Debian package 'prometheus')")
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_S:g}s",
            "scrape_timeout": f"{SCRAPE_S:g}s",
            "evaluation_interval": "1s",
        },
        "rule_files": [str(rules)],
        "scrape_configs": [
            {
                "job_name": "clipguard",
                "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}],
            }
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--web.enable-lifecycle",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    client = Prometheus(f"http://127.0.0.1:{port}", timeout_s=20)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-3000:]
            with contextlib.suppress(OSError):
                client.get("/api/v1/status/buildinfo")
                break
            assert time.monotonic() < deadline, "prometheus did not answer within 30s"
            time.sleep(0.2)
        yield client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


class SlowImages(http.server.ThreadingHTTPServer):
    """A real HTTP image server on loopback whose every answer takes ``SLOW_S``."""

    daemon_threads = True

    def __init__(self) -> None:
        png = image_bytes((64, 64), (30, 160, 90))

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                time.sleep(SLOW_S)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

            def log_message(self, *args: Any) -> None:
                return

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}.png"


def large_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (3000, 2000), (120, 40, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


class Traffic:
    """A steady trickle of uploads on a thread: 4 good and 1 bad per second (20% dead
    letters), and a large image every 10 seconds; ``slow(rate)`` adds slow URL uploads."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        self.topic = topic
        self.stop = threading.Event()
        self.slow_rate = 0.0
        self.slow_url: Any = None
        self.sent = {"good": 0, "bad": 0, "large": 0, "slow": 0}
        self.large = large_png()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.rng = random.Random(7)

    def event(self, kind: str, **image: str) -> bytes:
        number = self.sent[kind]
        self.sent[kind] += 1
        body = {
            "event_id": f"{kind}-{number}",
            "uploaded_at": datetime.now(timezone.utc).isoformat(),
            **image,
        }
        return json.dumps(body).encode()

    def run(self) -> None:
        tick = 0
        while not self.stop.wait(0.25):
            tick += 1
            color = tuple(self.rng.randrange(256) for _ in range(3))
            fmt = "JPEG" if tick % 2 else "PNG"
            b64 = base64.b64encode(image_bytes((96, 80), color, fmt)).decode()  # type: ignore[arg-type]
            self.producer.send(self.topic, self.event("good", image_b64=b64))
            if tick % 4 == 0:  # bad: undecodable bytes, bad base64, not JSON
                bad = [
                    self.event("bad", image_b64=base64.b64encode(b"not an image").decode()),
                    self.event("bad", image_b64="***"),
                    b"{this is not json",
                ][(tick // 4) % 3]
                self.producer.send(self.topic, bad)
            if tick % 8 == 0:  # generator metadata: provenance evidence for its panel
                b64 = base64.b64encode(png_with_text([("tEXt", "parameters", A1111)])).decode()
                self.producer.send(self.topic, self.event("good", image_b64=b64))
            if tick % 40 == 0:
                b64 = base64.b64encode(self.large).decode()
                self.producer.send(self.topic, self.event("large", image_b64=b64))
            for _ in range(int(self.slow_rate / 4)):
                name = f"slow-{self.sent['slow']}"
                self.producer.send(self.topic, self.event("slow", image_url=self.slow_url(name)))
        self.producer.flush(timeout=30)
        self.producer.close(timeout=30)


A1111 = "a cat\nSteps: 20, Sampler: Euler a, Model: sd_xl_base_1.0, Version: v1.6.0"


def wait_for(what: str, check: Any, timeout_s: float) -> float:
    """Poll ``check()`` until true; returns the seconds it took."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout_s, f"{what}: not within {timeout_s:g}s"
        time.sleep(0.5)
    return time.monotonic() - started


def firing(prom: Prometheus) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for alert in prom.get("/api/v1/alerts")["alerts"]:
        if alert["state"] == "firing":
            found.setdefault(alert["labels"]["alertname"], []).append(alert)
    return found


class AlertWatch:
    """Polls the firing alerts; remembers each alert's first firing values and when."""

    def __init__(self, prom: Prometheus) -> None:
        self.prom = prom
        self.started = time.monotonic()
        self.first: dict[str, tuple[float, list[str]]] = {}
        self.now: dict[str, list[dict[str, Any]]] = {}

    def poll(self) -> dict[str, list[dict[str, Any]]]:
        self.now = firing(self.prom)
        for name, alerts in self.now.items():
            if name not in self.first:
                values = [
                    f"{a['labels'].get('worker') or 'group'}={float(a['value']):.4g}"
                    for a in alerts
                ]
                self.first[name] = (time.monotonic() - self.started, values)
        return self.now

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.poll()
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))

    def until(self, what: str, names: tuple[str, ...], timeout_s: float) -> float:
        return wait_for(what, lambda: set(names) <= set(self.poll()), timeout_s)


def summary(series: list[Any]) -> str:
    values = [v for s in series for v in s.values()]
    if not values:
        return f"series={len(series)} no values"
    last = [s.values()[-1] for s in series if s.values()]
    return f"series={len(series)} last={_fmt(last)} max={max(values):.4g}"


def _fmt(values: list[float]) -> str:
    shown = ", ".join(f"{v:.4g}" for v in values[:6])
    return f"[{shown}{', ...' if len(values) > 6 else ''}]"


def test_dashboard_and_alerts_against_real_prometheus(
    tiny_checkpoint: Path, kafka_bootstrap: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    png = os.environ.get(PNG_ENV)
    scale = 3 if png else 1
    rules = tmp_path / "alerts.test.yml"
    changes = rules_for_test(ALERTS, rules)
    print("\nalert rules loaded with test time scales (deploy/prometheus/alerts.yml otherwise):")
    for change in changes:
        print(f"  {change}")
    targets = Targets(tmp_path / "targets.json")
    topics = fresh_topics(kafka_bootstrap, partitions=4)
    images = SlowImages()
    images.thread.start()
    settings = worker_settings(
        kafka_bootstrap,
        tiny_checkpoint,
        topics,
        max_inflight=16,
        fetch_workers=2,
        decode_workers=1,
        torch_threads=1,
        fetch_allow_cidrs="127.0.0.0/8",
    )
    engine = engine_from_settings(settings)
    stuck = Worker(settings, engine)  # metrics up, model never warmed: never ready
    stuck_server = stuck.start_metrics()
    assert stuck_server is not None
    running: dict[str, RunningWorker] = {}
    traffic = Traffic(kafka_bootstrap, topics.input)
    traffic.slow_url = images.url

    def start(name: str) -> None:
        worker = Worker(settings, engine_from_settings(settings))
        running[name] = RunningWorker(worker).start().wait_ready(90)
        assert worker.metrics_server is not None
        targets.add(name, worker.metrics_server.port)

    try:
        start("a")  # before Prometheus: "no ready worker" is provoked only at the end
        with prometheus_server(tmp_path, rules, targets.path) as prom:
            run_start = time.time()
            watch = AlertWatch(prom)
            targets.add("c", stuck_server.port)
            traffic.thread.start()
            watch.sleep(10 * scale)
            start("b")  # joins the group: a rebalance
            watch.sleep(10 * scale)
            traffic.slow_rate = 16.0  # slow uploads faster than the group can fetch them
            took = watch.until("lag alert firing", ("ClipguardConsumerLagHigh",), 60)
            print(f"lag alert firing {took:.1f}s after the slow uploads began")
            watch.sleep(5 * (scale - 1))
            traffic.slow_rate = 0.0
            running.pop("b").stop(60)  # leaves the group: a rebalance; its target goes down
            watch.until("worker down", ("ClipguardWorkerDown",), 30)
            watch.sleep(3 * scale)
            run_end = time.time()

            # -- every dashboard panel answers -----------------------------------------------
            rate = rate_interval(SCRAPE_S, STEP_S)
            print(f"\ndashboard panels over {run_end - run_start:.0f}s ($__rate_interval={rate}):")
            empty = []
            for panel in load_panels(DASHBOARD):
                for target in panel.targets:
                    expr = substitute(target.expr, rate)
                    assert "$" not in expr, expr
                    series = prom.query_range(expr, run_start, run_end, STEP_S)
                    now = prom.query(expr, run_end)
                    line = f"  {panel.title} [{target.ref}] ({panel.unit or '-'}): "
                    print(
                        line
                        + f"{summary(series)}; at end {_fmt([v for s in now for v in s.values()])}"
                    )
                    if not any(s.values() for s in series):
                        empty.append(f"{panel.title} [{target.ref}]")
            assert not empty, f"panels without data: {empty}"

            if png:
                minutes = (run_end - run_start) / 60
                argv = ["dashboard-png", "--prometheus", prom.url, "--out", png,
                        "--minutes", f"{minutes:.2f}", "--end", f"{run_end:.3f}",
                        "--step", "2", "--scrape-interval", f"{SCRAPE_S:g}",
                        "--dashboard", str(DASHBOARD)]  # fmt: skip
                assert main(argv) == 0

            # -- a stopped, b gone, c stuck: nobody is ready ---------------------------------
            traffic.stop.set()
            traffic.thread.join(30)
            # Before Prometheus' first scrape nothing is ready yet, so with a 2 s `for:` this
            # alert may already have fired at start-up: count only its firing from here on.
            watch.first.pop("ClipguardNoReadyWorkers", None)
            running.pop("a").stop(60)
            watch.until("no ready worker", ("ClipguardNoReadyWorkers",), 30)

            # -- every alert evaluates: the loaded rules and the original expressions -------------
            print("\nalerts (first firing: seconds into the run and value; original expr now):")
            groups = prom.get("/api/v1/rules", type="alert")["groups"]
            loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
            original = yaml.safe_load(ALERTS.read_text())
            names = [r["alert"] for g in original["groups"] for r in g["rules"]]
            assert sorted(loaded) == sorted(names)
            for name, rule in ((r["alert"], r) for g in original["groups"] for r in g["rules"]):
                got = loaded[name]
                assert got["health"] == "ok", (name, got.get("lastError"))
                try:
                    result = prom.query(rule["expr"])
                except PrometheusError as exc:
                    pytest.fail(f"{name}: the original expression fails: {exc}")
                at, values = watch.first.get(name, (None, []))
                when = f"fired at {at:.0f}s {values}" if at is not None else "never fired"
                now = _fmt([v for s in result for v in s.values()])
                print(f"  {name}: {when}; state now {got['state']}; original now {now}")
            missing = [n for n in (*PROVOKED, "ClipguardNoReadyWorkers") if n not in watch.first]
            assert not missing, f"provoked but never fired: {missing}"
    finally:
        traffic.stop.set()
        for worker in running.values():
            with contextlib.suppress(Exception):
                worker.stop(60)
        stuck_server.stop()
        images.shutdown()
    print(f"\nsent: {traffic.sent}; test took {time.monotonic() - started:.1f}s")
