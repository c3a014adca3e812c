"""The shipped commands as processes: ``broker`` -> ``produce`` -> ``serve`` -> SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import image_bytes
from kafka import KafkaConsumer, TopicPartition

from clipguard.consumer.schemas import UploadEvent, Verdict

pytestmark = pytest.mark.broker


def _clipguard(*args: str, **kwargs: object) -> subprocess.Popen:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        # Tansu holds a new group's first join for about half the session timeout.
        "CLIPGUARD_SESSION_TIMEOUT_MS": "6000",
        "CLIPGUARD_HEARTBEAT_INTERVAL_MS": "1000",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "clipguard.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


def _read(bootstrap: str, topic: str, count: int, timeout: float = 60) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or {0}]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    records: list = []
    deadline = time.monotonic() + timeout
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    consumer.close()
    return records


def test_broker_produce_serve_and_graceful_stop(tiny_checkpoint: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for index in range(6):
        (images / f"img{index}.png").write_bytes(image_bytes(color=(index * 40, 80, 160)))
    broker = _clipguard("broker")
    try:
        bootstrap = broker.stdout.readline().strip()
        assert bootstrap.startswith("127.0.0.1:"), broker.stderr.read()
        produced = subprocess.run(
            [
                sys.executable,
                "-m",
                "clipguard.cli",
                "produce",
                "--bootstrap-servers",
                bootstrap,
                str(images),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert produced.returncode == 0, produced.stderr
        assert "sent 6 events to uploads" in produced.stdout
        events = [UploadEvent.model_validate_json(r.value) for r in _read(bootstrap, "uploads", 6)]
        assert len(events) == 6 and all(e.image_b64 for e in events)

        serve = _clipguard(
            "serve",
            "--checkpoint",
            str(tiny_checkpoint),
            "--bootstrap-servers",
            bootstrap,
            "--metrics-port",
            "0",
            "--max-poll-interval-ms",
            "6000",
            "--group-id",
            "cli-test",
        )
        try:
            verdicts = [
                Verdict.model_validate_json(r.value) for r in _read(bootstrap, "verdicts", 6)
            ]
            assert sorted(v.event_id for v in verdicts) == sorted(e.event_id for e in events)
        finally:
            serve.send_signal(signal.SIGTERM)
            _, serve_err = serve.communicate(timeout=60)
        assert serve.returncode == 0, serve_err[-3000:]
        assert "stopped cleanly" in serve_err
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id="cli-test")
        committed = sum(
            consumer.committed(TopicPartition("uploads", p)) or 0
            for p in consumer.partitions_for_topic("uploads")
        )
        consumer.close(autocommit=False)
        assert committed == 6
        assert {v.input.topic for v in verdicts} == {"uploads"}
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.communicate(timeout=30)
    assert broker.returncode == 0
