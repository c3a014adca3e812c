"""Publishing outcomes and waiting for the broker to acknowledge every one of them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from clipguard.consumer.outcomes import Outcome
from clipguard.detector.errors import ClipguardError


class PublishError(ClipguardError):
    """The broker did not acknowledge an output: the input offset must not be committed."""

    stage = "publish"
    reason = "not_acknowledged"
    permanent = False


class Publisher:
    def __init__(self, producer: Any, output_topic: str, dlq_topic: str, timeout_s: float):
        self.producer = producer
        self.output_topic = output_topic
        self.dlq_topic = dlq_topic
        self.timeout_s = timeout_s

    def send(self, outcomes: Sequence[Outcome]) -> list[Any]:
        """Queue every output of ``outcomes``; returns futures in the same order."""
        futures = []
        for outcome in outcomes:
            if outcome.verdict is not None:
                futures.append(
                    self.producer.send(
                        self.output_topic,
                        key=outcome.verdict.event_id.encode("utf-8"),
                        value=outcome.verdict.to_bytes(),
                    )
                )
            if outcome.dead_letter is not None:
                record = outcome.dead_letter.record
                futures.append(
                    self.producer.send(
                        self.dlq_topic,
                        key=record.key,
                        value=record.value or b"",
                        headers=outcome.dead_letter.headers(),
                    )
                )
        return futures

    def publish(self, outcomes: Sequence[Outcome]) -> None:
        """Send and block until all are acknowledged, or raise :class:`PublishError`."""
        futures = self.send(outcomes)
        self.producer.flush(timeout=self.timeout_s)
        for future in futures:
            try:
                future.get(timeout=self.timeout_s)
            except Exception as exc:
                raise PublishError(f"output not acknowledged: {type(exc).__name__}: {exc}") from exc
