"""Metrics and health endpoints: readiness after warm-up, the DESIGN.md metric set, promtool."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import image_bytes
from provenance_assets import png_with_text
from streams import fresh_topics, produce, read_outputs, worker_settings

from clipguard.cli.produce import upload_event
from clipguard.cli.serve import StopOnSignal
from clipguard.consumer.health import HealthState
from clipguard.consumer.metrics import METRIC_DEFS
from clipguard.consumer.worker import Worker, engine_from_settings


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_health_state_with_an_injected_clock() -> None:
    now = [100.0]
    health = HealthState(stale_after_s=5, clock=lambda: now[0])
    assert health.live() and not health.ready()
    health.model_ready = health.partitions_assigned = True
    assert health.ready()
    now[0] += 6  # the loop stopped beating
    assert not health.live() and not health.ready()
    health.beat()
    assert health.live() and health.ready()


@pytest.mark.broker
def test_readyz_after_warm_up_and_metrics_pass_promtool(
    kafka_bootstrap: str, tiny_checkpoint: Path
) -> None:
    topics = fresh_topics(kafka_bootstrap, partitions=2)
    settings = worker_settings(kafka_bootstrap, tiny_checkpoint, topics)
    worker = Worker(settings, engine_from_settings(settings))
    server = worker.start_metrics()
    base = f"http://127.0.0.1:{server.port}"
    assert _status(base + "/livez") == 200
    assert _status(base + "/readyz") == 503  # no model warmed, no partitions yet
    assert _status(base + "/healthz") == 404  # a misspelt probe fails instead of passing
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while _status(base + "/readyz") != 200 and time.monotonic() < deadline:
            assert worker.engine.warmed_up or not worker.health.model_ready
            time.sleep(0.05)
        assert _status(base + "/readyz") == 200
        assert worker.engine.warmed_up and worker.assigned
        events = [
            (f"m-{i}".encode(), upload_event(image_bytes(color=(i, 9, 9)), f"m-{i}"))
            for i in range(12)
        ]
        a1111 = "a cat\nSteps: 20, Sampler: Euler a, Model: sd_xl_base_1.0, Version: v1.6.0"
        stated = png_with_text([("tEXt", "parameters", a1111)])
        events.append((b"stated", upload_event(stated, "stated")))  # generator metadata
        placed = produce(kafka_bootstrap, topics.input, [*events, (None, b"not json")])
        read_outputs(kafka_bootstrap, topics, set(placed))
        time.sleep(0.3)  # one more loop turn updates the gauges
        text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    finally:
        stop.set()
        thread.join(timeout=60)
    for name, (kind, labels) in METRIC_DEFS.items():
        assert re.search(rf"^# TYPE clipguard_{name}(_total)? {kind}$", text, re.M), name
        for label in labels:
            assert re.search(rf"^clipguard_{name}(_total)?\{{[^}}]*{label}=", text, re.M), (
                name,
                label,
            )
    assert 'clipguard_events_consumed_total{topic="' + topics.input + '"} 14.0' in text
    assert "clipguard_ready 1.0" in text
    for forbidden in ("m-0", "m-11"):  # never an event id in a label
        assert forbidden not in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'); .ci/run installs it")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_second_signal_exits_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    exits: list[int] = []
    monkeypatch.setattr("os._exit", exits.append)
    stopper = StopOnSignal()
    stopper(signal.SIGTERM, None)
    assert stopper.stop.is_set() and exits == []
    stopper(signal.SIGINT, None)
    assert exits == [130]
