"""Through the real broker: verdicts and dead letters validate against the published schemas
(with the independent ``jsonschema`` validator) and carry the input's trace context."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from conftest import image_bytes
from jsonschema import Draft202012Validator
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from streams import fresh_topics, running_worker, worker_settings

pytestmark = [pytest.mark.broker, pytest.mark.slow]

DOCS = Path(__file__).resolve().parents[1] / "docs" / "schemas"
PARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def validator(name: str) -> Draft202012Validator:
    schema = json.loads((DOCS / f"{name}.schema.json").read_text())
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def event(event_id: str, image: bytes) -> bytes:
    return json.dumps(
        {"event_id": event_id, "image_b64": base64.b64encode(image).decode()}
    ).encode()


def read_back(bootstrap: str, topic: str, count: int, timeout: float = 60.0) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    records: list = []
    deadline = time.monotonic() + timeout
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    consumer.close()
    return records


def test_outputs_validate_and_carry_trace_context(
    tiny_checkpoint: Path, kafka_bootstrap: str
) -> None:
    topics = fresh_topics(kafka_bootstrap, partitions=1)
    trace = [("traceparent", PARENT), ("tracestate", b"vendor=abc"), ("x-tenant", b"acme"),
             ("x-private", b"not forwarded")]  # fmt: skip
    sends = [
        # (key, value, headers): judged, judged without headers, bad image with an id,
        # unparseable JSON, malformed traceparent
        (b"ok-1", event("ok-1", image_bytes()), trace),
        (b"ok-2", event("ok-2", image_bytes(color=(200, 10, 10), fmt="JPEG")), []),
        (b"bad-1", event("bad-1", b"not an image at all"), trace),
        (None, b"{not json", trace),
        (b"ok-3", event("ok-3", image_bytes()), [("traceparent", b"00-garbage"), *trace[1:]]),
    ]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    stamps = []
    for key, value, headers in sends:
        meta = producer.send(topics.input, key=key, value=value, headers=headers).get(timeout=30)
        stamps.append(meta.timestamp)
    producer.close()
    settings = worker_settings(kafka_bootstrap, tiny_checkpoint, topics, forward_headers="X-Tenant")
    with running_worker(settings):
        verdicts = read_back(kafka_bootstrap, topics.output, 4)  # bad JSON has no id
        dead = read_back(kafka_bootstrap, topics.dlq, 2)
    assert len(verdicts) == 4 and len(dead) == 2

    check_verdict, check_dead = validator("verdict"), validator("dead-letter")
    by_id = {}
    for record in verdicts:
        body = json.loads(record.value)
        check_verdict.validate(body)
        by_id[body["event_id"]] = (body, dict(record.headers))
    for record in dead:
        check_dead.validate({k: v.decode() for k, v in record.headers})

    carried = {"traceparent": PARENT, "tracestate": b"vendor=abc", "x-tenant": b"acme"}
    for event_id in ("ok-1", "bad-1"):
        assert by_id[event_id][1] == carried
    assert by_id["ok-2"][1] == {}
    assert by_id["ok-3"][1] == {"x-tenant": b"acme"}  # bad traceparent dropped, state with it
    assert by_id["bad-1"][0]["error"]["stage"] == "decode"
    for record in dead:
        headers = dict(record.headers)
        assert headers["traceparent"] == PARENT and headers["x-tenant"] == b"acme"
        assert b"x-private" not in b"".join(k.encode() for k in headers)

    for index, (key, _, _) in enumerate(sends):
        if key is None:
            continue
        body = by_id[key.decode()][0]
        assert body["input"]["offset"] == index
        millis = stamps[index]
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(millis / 1000))
        assert body["input"]["timestamp"] == f"{expected}.{millis % 1000:03d}Z"
