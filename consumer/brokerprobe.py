"""Is the broker answering? A small Metadata request every few seconds, on its own thread.

The consumer's ``poll()`` returns nothing both when the topic is idle and when the broker is
frozen, so readiness cannot be read off it. The probe asks the cluster directly with a short
timeout and reports each answer (or its absence) to :class:`HealthState`. It also reads the
output topics' ``max.message.bytes`` where the broker tells it, so outputs are sized to fit.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType

from clipguard.consumer.health import HealthState

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_MS = 2000


class BrokerProbe:
    def __init__(
        self,
        client_kwargs: dict[str, Any],
        health: HealthState,
        interval_s: float = PROBE_INTERVAL_S,
    ) -> None:
        self.client_kwargs = client_kwargs
        self.health = health
        self.interval_s = interval_s
        self._admin: KafkaAdminClient | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clipguard-probe", daemon=True)

    def start(self) -> BrokerProbe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # the worker may stop before the probe started
            self._thread.join(timeout=PROBE_TIMEOUT_MS / 1000 + 2)
        self._close_admin()

    def check(self) -> bool:
        """One round trip; True when the broker answered."""
        try:
            if self._admin is None:
                kwargs = {
                    **self.client_kwargs,
                    "request_timeout_ms": PROBE_TIMEOUT_MS,
                    "client_id": f"{self.client_kwargs.get('client_id', 'clipguard')}-probe",
                }
                self._admin = KafkaAdminClient(**kwargs)
            self._admin.list_topics()
        except Exception as exc:  # noqa: BLE001 - any failure means "did not answer"
            log.debug("broker probe failed: %s: %s", type(exc).__name__, exc)
            self.health.broker_failed()
            self._close_admin()  # a fresh client after an outage: no stale connection state
            return False
        self.health.broker_answered()
        return True

    def max_message_bytes(self, topics: list[str]) -> dict[str, int]:
        """``max.message.bytes`` of each topic the broker reports it for (may be none)."""
        found: dict[str, int] = {}
        if self._admin is None and not self.check():
            return found
        assert self._admin is not None
        try:
            responses = self._admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic) for topic in topics]
            )
        except Exception as exc:  # noqa: BLE001 - brokers that do not answer: use our own cap
            log.info("cannot read topic configs (%s); sizing outputs by the producer's cap", exc)
            return found
        for topic, value in _config_values(responses, "max.message.bytes"):
            with contextlib.suppress(TypeError, ValueError):
                found[topic] = int(value)
        return found

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()

    def _close_admin(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            with contextlib.suppress(Exception):
                admin.close()


def _config_values(responses: Any, name: str) -> list[tuple[str, str]]:
    """(topic, value) pairs from kafka-python's describe_configs answer, whatever its shape."""
    pairs: list[tuple[str, str]] = []
    if isinstance(responses, dict):  # newer kafka-python: {"topic": {name: {config: value}}}
        for topic, configs in responses.get("topic", {}).items():
            value = configs.get(name) if isinstance(configs, dict) else None
            if isinstance(value, dict):
                value = value.get("value")
            if value is not None:
                pairs.append((topic, str(value)))
        return pairs
    for response in responses if isinstance(responses, list) else [responses]:
        for resource in getattr(response, "resources", []):
            topic, entries = resource[3], resource[4]
            for entry in entries:
                if entry[0] == name and entry[1] is not None:
                    pairs.append((topic, str(entry[1])))
    return pairs
