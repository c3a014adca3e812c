"""One JSON object per log record (``--log-format json``), for log pipelines to index.

Fields: ``ts`` (RFC 3339 UTC, milliseconds), ``level``, ``logger``, ``message``, and, when
the call passes them with ``extra=``, ``event_id``, ``topic``, ``partition``, ``offset``
(:data:`RECORD_FIELDS`); ``exception`` holds a traceback when there is one. Nothing else
from ``extra`` is written, so no field can carry what was not meant to be logged.

Never an image byte: a ``bytes`` argument of a log call is written as ``<N bytes>``, and a
message is cut at :data:`MAX_MESSAGE_CHARS`. Secrets are ``SecretStr`` in the settings,
which print masked.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

RECORD_FIELDS = ("event_id", "topic", "partition", "offset")
MAX_MESSAGE_CHARS = 4000
MAX_FIELD_CHARS = 512


def _scrub(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    return value


def _message(record: logging.LogRecord) -> str:
    args = record.args
    if isinstance(args, tuple):
        args = tuple(_scrub(a) for a in args)
    elif isinstance(args, dict):
        args = {k: _scrub(v) for k, v in args.items()}
    msg = _scrub(record.msg)
    try:
        text = str(msg) % args if args else str(msg)
    except (TypeError, ValueError):
        text = f"{msg} {args!r}"
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[:MAX_MESSAGE_CHARS] + f"... ({len(text)} chars)"
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, timezone.utc)
        line: dict[str, Any] = {
            "ts": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": _message(record),
        }
        for name in RECORD_FIELDS:
            value = getattr(record, name, None)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                value = str(_scrub(value))
            if isinstance(value, str):
                value = value[:MAX_FIELD_CHARS]
            line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)[-MAX_MESSAGE_CHARS:]
        return json.dumps(line, ensure_ascii=False, default=str)
