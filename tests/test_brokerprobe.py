"""The broker probe behind /readyz: a real Metadata round trip, or a failure it reports."""

from __future__ import annotations

import pytest

from clipguard.consumer.brokerprobe import BrokerProbe
from clipguard.consumer.health import HealthState
from clipguard.devbroker import find_free_port

pytestmark = pytest.mark.broker


def test_the_probe_answers_against_a_live_broker_and_fails_against_none(
    kafka_bootstrap: str,
) -> None:
    now = [0.0]
    health = HealthState(60, lambda: now[0], broker_stale_after_s=5)
    live = BrokerProbe({"bootstrap_servers": [kafka_bootstrap], "client_id": "t"}, health)
    try:
        assert live.check()
        now[0] = 4.0
        assert health.broker_reachable() and health.broker_unreachable_for() == 0.0
    finally:
        live.stop()  # never started: stopping is still fine
    dead = BrokerProbe(
        {
            "bootstrap_servers": [f"127.0.0.1:{find_free_port()}"],
            "client_id": "t",
            "bootstrap_timeout_ms": 1000,
            "reconnect_backoff_max_ms": 200,
        },
        health,
    )
    now[0] = 10.0
    assert not dead.check()
    assert not health.broker_reachable()
    assert health.broker_unreachable_for() == pytest.approx(10.0)  # since its last answer
    dead.stop()
