"""Test helpers for the broker suite: a worker on a thread, producing and reading back."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka_fixture import create_topics, unique_topic

from clipguard.consumer.config import WorkerSettings
from clipguard.consumer.running import RunningWorker
from clipguard.consumer.schemas import Verdict
from clipguard.consumer.worker import Worker, engine_from_settings


@dataclass
class Topics:
    input: str
    output: str
    dlq: str
    group: str


def fresh_topics(bootstrap: str, partitions: int = 3) -> Topics:
    topics = Topics(
        unique_topic("uploads"),
        unique_topic("verdicts"),
        unique_topic("dlq"),
        unique_topic("group"),
    )
    create_topics(bootstrap, {topics.input: partitions, topics.output: 1, topics.dlq: 1})
    return topics


def worker_settings(
    bootstrap: str, checkpoint: Path, topics: Topics, **extra: Any
) -> WorkerSettings:
    """Settings for a test worker: fast Tansu group joins, small batches, any free port."""
    values: dict[str, Any] = {
        "checkpoint": checkpoint,
        "bootstrap_servers": bootstrap,
        "input_topic": topics.input,
        "output_topic": topics.output,
        "dlq_topic": topics.dlq,
        "group_id": topics.group,
        "metrics_host": "127.0.0.1",
        "metrics_port": 0,
        "max_batch_size": 8,
        "max_batch_wait_ms": 20,
        "max_poll_interval_ms": 6_000,
        "session_timeout_ms": 6_000,
        "heartbeat_interval_ms": 1_000,
    }
    return WorkerSettings(**{**values, **extra})


@contextlib.contextmanager
def running_worker(settings: WorkerSettings, ready_timeout: float = 60.0) -> Iterator[Worker]:
    """A worker serving on a thread, ready (warm, partitions assigned) before we go on."""
    engine = engine_from_settings(settings)
    running = RunningWorker(Worker(settings, engine)).start()
    try:
        running.wait_ready(ready_timeout)
        yield running.worker
    finally:
        try:
            running.stop(60)
        finally:
            engine.close()


@contextlib.contextmanager
def png_server(png: bytes, delay_s: float = 0.0) -> Iterator[str]:
    """A loopback HTTP server that answers every GET with ``png`` after ``delay_s``;
    yields its base URL (``http://127.0.0.1:PORT``)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(delay_s)
            self.send_response(200)
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def produce(
    bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes]]
) -> list[tuple[int, int]]:
    """Send (key, value) pairs; returns (partition, offset) of each, in order."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=16 << 20)
    futures = [producer.send(topic, key=key, value=value) for key, value in messages]
    producer.flush()
    placed = [(m.partition, m.offset) for m in (f.get(timeout=30) for f in futures)]
    producer.close()
    return placed


@dataclass
class Output:
    verdicts: list[Verdict] = field(default_factory=list)
    dead_letters: list[tuple[bytes | None, bytes, dict[str, str]]] = field(default_factory=list)

    def covered(self, input_topic: str) -> list[tuple[int, int]]:
        """Every (partition, offset) of the input named by a verdict or a dead letter."""
        named = [
            (v.input.partition, v.input.offset)
            for v in self.verdicts
            if v.input.topic == input_topic
        ]
        named += [
            (int(h["clipguard.original.partition"]), int(h["clipguard.original.offset"]))
            for _, _, h in self.dead_letters
            if h["clipguard.original.topic"] == input_topic
        ]
        return named


def read_outputs(
    bootstrap: str, topics: Topics, expect: set[tuple[int, int]], timeout: float = 60.0
) -> Output:
    """Read verdicts and dead letters until every expected input offset is named."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    partitions = [TopicPartition(topics.output, 0), TopicPartition(topics.dlq, 0)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    out = Output()
    deadline = time.monotonic() + timeout
    while not expect <= set(out.covered(topics.input)) and time.monotonic() < deadline:
        for tp, records in consumer.poll(timeout_ms=200).items():
            for record in records:
                if tp.topic == topics.output:
                    out.verdicts.append(Verdict.model_validate_json(record.value))
                else:
                    headers = {k: v.decode() for k, v in record.headers}
                    out.dead_letters.append((record.key, record.value, headers))
    consumer.close()
    return out


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    """The group's committed positions, read without joining the group."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        partitions = sorted(consumer.partitions_for_topic(topic) or ())
        return {p: consumer.committed(TopicPartition(topic, p)) for p in partitions}
    finally:
        consumer.close(autocommit=False)
