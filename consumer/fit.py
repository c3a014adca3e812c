"""Outputs that always fit: every verdict and dead letter is sized before it is sent.

A record bigger than the producer's ``max_request_size`` or the topic's ``max.message.bytes``
fails its publish, and a worker that stops on it restarts, reads the same record and stops
again (a crash loop). So the limit is known up front and enforced here:

- a verdict whose copied ``metadata`` would not fit gets a marker instead:
  ``{"clipguard_truncated": {"bytes": N, "sha256": "..."}}`` (N and the hash of the metadata
  as JSON), so the platform can still join it to its own copy;
- a dead letter whose original bytes would not fit carries a prefix of them, plus headers
  ``clipguard.original.size``, ``clipguard.original.sha256`` and
  ``clipguard.original.truncated: true`` (DESIGN.md "dead letters").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from clipguard.consumer.headers import carried
from clipguard.consumer.outcomes import DeadLetter, Outcome
from clipguard.consumer.schemas import Verdict

#: Record framing, header names and batch overhead the size estimate leaves room for.
RECORD_OVERHEAD = 512
MAX_KEY_BYTES = 1024
TRUNCATED_KEY = "clipguard_truncated"

Header = tuple[str, bytes]
Headers = list[Header]


@dataclass(frozen=True)
class OutRecord:
    topic: str
    key: bytes | None
    value: bytes
    headers: Headers

    def size(self) -> int:
        key = len(self.key) if self.key else 0
        return key + len(self.value) + sum(len(k) + len(v) for k, v in self.headers)


class OutputTooLargeError(RuntimeError):
    """Even the trimmed output does not fit: the limit is smaller than any verdict."""


class OutputFitter:
    """Builds the records of an outcome, each within ``max_record_bytes``."""

    def __init__(
        self,
        output_topic: str,
        dlq_topic: str,
        max_record_bytes: int,
        forward_headers: tuple[str, ...] = (),
    ) -> None:
        self.output_topic = output_topic
        self.dlq_topic = dlq_topic
        #: Input headers copied to every output besides trace context (consumer/headers.py).
        self.forward_headers = forward_headers
        self.max_record_bytes = max_record_bytes
        self.budget = max(1024, max_record_bytes - RECORD_OVERHEAD)

    def records(self, outcome: Outcome) -> list[OutRecord]:
        records = []
        forwarded = carried(outcome.record.headers, self.forward_headers)
        if outcome.verdict is not None:
            records.append(self.verdict(outcome.verdict, forwarded))
        if outcome.dead_letter is not None:
            records.append(self.dead_letter(outcome.dead_letter, forwarded))
        return records

    def verdict(self, verdict: Verdict, forwarded: Sequence[Header] = ()) -> OutRecord:
        key = verdict.event_id.encode("utf-8")
        value = verdict.to_bytes()
        headers = list(forwarded)
        if len(key) + len(value) + _size(headers) > self.budget:
            metadata = json.dumps(verdict.metadata, separators=(",", ":"), default=str).encode()
            marker = {
                TRUNCATED_KEY: {
                    "bytes": len(metadata),
                    "sha256": hashlib.sha256(metadata).hexdigest(),
                }
            }
            value = verdict.model_copy(update={"metadata": marker}).to_bytes()
            if len(key) + len(value) + _size(headers) > self.budget:
                headers = []  # the verdict matters more than the carried headers
            if len(key) + len(value) > self.budget:
                raise OutputTooLargeError(
                    f"verdict of {len(value)} bytes exceeds the {self.budget}-byte output limit"
                )
        return OutRecord(self.output_topic, key, value, headers)

    def dead_letter(self, dead_letter: DeadLetter, forwarded: Sequence[Header] = ()) -> OutRecord:
        record = dead_letter.record
        headers = dead_letter.headers() + list(forwarded)
        key = record.key
        if key is not None and len(key) > MAX_KEY_BYTES:
            headers.append(("clipguard.original.key_size", str(len(key)).encode()))
            key = key[:MAX_KEY_BYTES]
        value = record.value or b""
        room = self.budget - (len(key) if key else 0) - sum(len(k) + len(v) for k, v in headers)
        if len(value) > room:
            extra = [
                ("clipguard.original.size", str(len(value)).encode()),
                ("clipguard.original.sha256", hashlib.sha256(value).hexdigest().encode()),
                ("clipguard.original.truncated", b"true"),
            ]
            room -= sum(len(k) + len(v) for k, v in extra)
            headers += extra
            value = value[: max(0, room)]
        return OutRecord(self.dlq_topic, key, value, headers)


def _size(headers: Sequence[Header]) -> int:
    return sum(len(k) + len(v) for k, v in headers)
