"""Kafka record -> upload event: JSON events and raw-bytes messages, typed errors otherwise."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from clipguard.consumer.errors import InvalidEventError
from clipguard.consumer.schemas import UploadEvent


@dataclass(frozen=True)
class RecordRef:
    """Where a record came from: the identity every verdict and dead letter names."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int | None = None

    @classmethod
    def from_kafka(cls, record: Any) -> RecordRef:
        return cls(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value,
            headers=tuple(record.headers or ()),
            timestamp_ms=record.timestamp if record.timestamp and record.timestamp > 0 else None,
        )


@dataclass(frozen=True)
class Upload:
    """A parsed event: who it is, where its image is, and what to copy to the verdict."""

    event_id: str
    image_bytes: bytes | None
    image_url: str | None
    uploaded_at: datetime | None
    metadata: dict[str, Any] = field(default_factory=dict)


def _key_as_id(key: bytes | None) -> str | None:
    if not key:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return key.hex()


def _looks_like_json(value: bytes) -> bool:
    return value.lstrip()[:1] in (b"{", b"[", b'"')


def _best_effort_id(value: bytes) -> str | None:
    """An event id from a message that failed validation, so its sender still gets a verdict."""
    try:
        data = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return None
    event_id = data.get("event_id") if isinstance(data, dict) else None
    return event_id if isinstance(event_id, str) and 0 < len(event_id) <= 512 else None


def _decode_b64(text: str, event_id: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidEventError(
            f"image_b64 is not valid base64: {exc}", "bad_base64", event_id
        ) from exc


def parse_record(record: RecordRef) -> Upload:
    """Interpret a record's value; raises :class:`InvalidEventError` when it cannot."""
    value = record.value
    key_id = _key_as_id(record.key)
    if not value:
        raise InvalidEventError("empty message", "empty", key_id)
    if not _looks_like_json(value):
        if key_id is None:
            raise InvalidEventError("raw image message without a key to use as event id", "no_key")
        return Upload(key_id, value, None, None)
    try:
        event = UploadEvent.model_validate_json(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        reason = "bad_json" if first["type"] == "json_invalid" else "schema"
        if "newer than supported" in str(exc):
            reason = "unsupported_schema_version"
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise InvalidEventError(
            f"{where}: {first['msg']}", reason, _best_effort_id(value) or key_id
        ) from exc
    uploaded_at = event.uploaded_at
    if uploaded_at is not None and uploaded_at.tzinfo is None:
        uploaded_at = uploaded_at.replace(tzinfo=timezone.utc)
    image_bytes = _decode_b64(event.image_b64, event.event_id) if event.image_b64 else None
    return Upload(event.event_id, image_bytes, event.image_url, uploaded_at, event.metadata)
