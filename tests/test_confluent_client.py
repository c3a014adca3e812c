"""An independent client (librdkafka) on both ends: its events are judged, and it reads
verdicts that parse against the schema."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from conftest import image_bytes
from streams import fresh_topics, running_worker, worker_settings

from clipguard.cli.produce import upload_event
from clipguard.consumer.schemas import Verdict

pytestmark = pytest.mark.broker


def test_confluent_events_are_judged_and_verdicts_read_back(
    kafka_bootstrap: str, tiny_checkpoint: Path
) -> None:
    topics = fresh_topics(kafka_bootstrap, partitions=2)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "acks": "all"})
    delivered: dict[str, tuple[int, int]] = {}

    def on_delivery(error: object, message: object) -> None:
        assert error is None, error
        delivered[message.key().decode()] = (message.partition(), message.offset())

    ids = [f"librdkafka-{i}" for i in range(12)]
    settings = worker_settings(kafka_bootstrap, tiny_checkpoint, topics)
    with running_worker(settings):
        for index, event_id in enumerate(ids):
            value = upload_event(image_bytes(color=(index * 20, 40, 90)), event_id)
            producer.produce(
                topics.input, key=event_id.encode(), value=value, on_delivery=on_delivery
            )
        assert producer.flush(30) == 0
        consumer = Consumer(
            {
                "bootstrap.servers": kafka_bootstrap,
                "group.id": f"{topics.group}-reader",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        consumer.subscribe([topics.output])
        verdicts: dict[str, Verdict] = {}
        deadline = time.monotonic() + 60
        while len(verdicts) < len(ids) and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            verdict = Verdict.model_validate_json(message.value())
            assert message.key().decode() == verdict.event_id
            verdicts[verdict.event_id] = verdict
        consumer.close()
    assert sorted(verdicts) == sorted(ids)
    for event_id, verdict in verdicts.items():
        assert (verdict.input.partition, verdict.input.offset) == delivered[event_id]
        assert verdict.error is None and 0.0 <= verdict.ai_score <= 1.0
