"""Kafka record -> upload event: JSON events and raw-bytes messages, typed errors otherwise."""

from __future__ import annotations

import base64
import binascii
import json
import unicodedata
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


MAX_EVENT_ID = 512
_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
#: First bytes of a JSON text (object, array, string, number, true/false/null); no image
#: format we accept starts with one of them.
_JSON_START = frozenset(b'{["-0123456789tfn')


def usable_event_id(text: str) -> bool:
    """1..512 characters, none of them a control character (it becomes a Kafka key, a
    header and a log field)."""
    return 0 < len(text) <= MAX_EVENT_ID and all(
        unicodedata.category(ch) not in ("Cc", "Cf", "Cs") for ch in text
    )


def _key_as_id(key: bytes | None) -> str | None:
    """The message key as an event id, or None when it cannot be one."""
    if not key or len(key) > 4 * MAX_EVENT_ID:
        return None
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        text = key.hex()
    return text if usable_event_id(text) else None


def _as_json_text(value: bytes) -> bytes | None:
    """The value as UTF-8 JSON text when it looks like JSON (BOMs and UTF-16 accepted)."""
    if value.startswith(_UTF16_BOMS):
        try:
            return value.decode("utf-16").encode("utf-8")
        except UnicodeDecodeError:
            return None
    text = value.removeprefix(_UTF8_BOM).lstrip()
    return text if text[:1] and text[0] in _JSON_START else None


def _best_effort_id(value: bytes) -> str | None:
    """An event id from a message that failed validation, so its sender still gets a verdict."""
    try:
        data = json.loads(value)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    event_id = data.get("event_id") if isinstance(data, dict) else None
    return event_id if isinstance(event_id, str) and usable_event_id(event_id) else None


def _decode_b64(text: str, event_id: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidEventError(
            f"image_b64 is not valid base64: {exc}", "bad_base64", event_id
        ) from exc
    if not data:
        raise InvalidEventError("image_b64 is empty", "empty_image", event_id)
    return data


def _schema_reason(error: dict[str, Any], text: bytes) -> str:
    kind = error["type"]
    if kind == "json_invalid":
        return "too_deep" if "recursion" in str(error.get("msg", "")).lower() else "bad_json"
    if kind == "model_type" and not error["loc"]:
        return "not_an_object"
    if "newer than supported" in str(error.get("msg", "")):
        return "unsupported_schema_version"
    return "schema"


def parse_record(record: RecordRef) -> Upload:
    """Interpret a record's value; raises :class:`InvalidEventError` when it cannot.

    JSON is strict about types: ``schema_version`` must be an integer (absent means 1) and
    ``event_id`` a string of 1..512 characters without control characters; nothing is
    coerced (``"1"`` or ``true`` as a version is refused, like ``12345`` as an id).
    """
    value = record.value
    key_id = _key_as_id(record.key)
    if not value:
        raise InvalidEventError("empty message", "empty", key_id)
    text = _as_json_text(value)
    if text is None:
        if record.key and key_id is None:
            raise InvalidEventError(
                "raw image message whose key is not a usable event id "
                f"(1..{MAX_EVENT_ID} characters, no control characters)",
                "bad_key",
            )
        if key_id is None:
            raise InvalidEventError("raw image message without a key to use as event id", "no_key")
        return Upload(key_id, value, None, None)
    try:
        event = UploadEvent.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        reason = _schema_reason(dict(first), text)
        where = ".".join(str(p) for p in first["loc"]) or "message"
        message = f"{where}: {first['msg']}"[:300]
        raise InvalidEventError(message, reason, _best_effort_id(text) or key_id) from None
    uploaded_at = event.uploaded_at
    if uploaded_at is not None and uploaded_at.tzinfo is None:
        uploaded_at = uploaded_at.replace(tzinfo=timezone.utc)
    image_bytes = (
        _decode_b64(event.image_b64, event.event_id) if event.image_b64 is not None else None
    )
    return Upload(event.event_id, image_bytes, event.image_url, uploaded_at, event.metadata)
