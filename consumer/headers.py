"""Input headers carried to the outputs: W3C trace context and an operator allow-list.

Each verdict and dead letter gets, as Kafka headers, the input record's

- ``traceparent`` (W3C Trace Context), when it is well formed; a malformed one is dropped,
  and ``tracestate`` with it (the W3C rule: without a valid parent the state is meaningless);
- ``tracestate``, at most :data:`MAX_TRACESTATE_BYTES`, trimmed by whole list members;
- the headers named in ``forward_headers`` (names match case-insensitively, the input's
  spelling is kept), each value at most :data:`MAX_VALUE_BYTES`, at most
  :data:`MAX_FORWARDED` of them and :data:`MAX_TOTAL_BYTES` in all.

Only the first occurrence of a name is carried. ``clipguard.*`` names are ours and never
copied, so an input cannot forge the dead-letter headers. Nothing here raises: a header
that breaks a rule is left behind, the event goes on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

Headers = list[tuple[str, bytes]]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
RESERVED_PREFIX = "clipguard."
#: W3C: at least 512 characters of tracestate must be propagated; we carry no more.
MAX_TRACESTATE_BYTES = 512
MAX_VALUE_BYTES = 1024
MAX_FORWARDED = 16
MAX_TOTAL_BYTES = 2048
MAX_NAME_CHARS = 128

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_HEADER_NAME = re.compile(rf"[!-~]{{1,{MAX_NAME_CHARS}}}")  # printable ASCII, no spaces


def valid_traceparent(value: bytes) -> bool:
    """W3C Trace Context ``traceparent``: version 00 exactly, later versions by prefix."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return False
    match = _TRACEPARENT.match(text)
    if match is None:
        return False
    version, trace_id, parent_id, _ = match.groups()
    if version == "ff" or set(trace_id) == {"0"} or set(parent_id) == {"0"}:
        return False
    if version == "00":
        return len(text) == 55
    return len(text) == 55 or text[55] == "-"  # a future version may append fields


def bounded_tracestate(value: bytes) -> bytes | None:
    """The tracestate within :data:`MAX_TRACESTATE_BYTES`, trimmed by whole members."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not text.isprintable():
        return None
    members = [m.strip() for m in text.split(",") if m.strip()]
    while members and len(",".join(members)) > MAX_TRACESTATE_BYTES:
        members.pop()  # W3C: drop from the end (the oldest entries)
    return ",".join(members).encode("ascii") if members else None


def valid_header_name(name: str) -> bool:
    return bool(_HEADER_NAME.fullmatch(name)) and not name.lower().startswith(RESERVED_PREFIX)


def carried(headers: Iterable[tuple[str, bytes | None]], allow: Iterable[str] = ()) -> Headers:
    """The headers of an input record that its outputs carry, in the input's order."""
    allowed = {name.lower() for name in allow} - {TRACEPARENT, TRACESTATE}
    first: dict[str, tuple[str, bytes]] = {}
    for name, value in headers:
        if not isinstance(name, str) or value is None:
            continue
        key = name.lower()
        if key in first or not (key in allowed or key in (TRACEPARENT, TRACESTATE)):
            continue
        first[key] = (name, bytes(value))
    out: Headers = []
    parent = first.get(TRACEPARENT)
    if parent is not None and valid_traceparent(parent[1]):
        out.append((TRACEPARENT, parent[1]))
        state = first.get(TRACESTATE)
        bounded = bounded_tracestate(state[1]) if state is not None else None
        if bounded is not None:
            out.append((TRACESTATE, bounded))
    total = sum(len(k) + len(v) for k, v in out)
    forwarded = 0
    for key, (name, value) in first.items():
        if key in (TRACEPARENT, TRACESTATE) or not valid_header_name(name):
            continue
        size = len(name) + len(value)
        if len(value) > MAX_VALUE_BYTES or total + size > MAX_TOTAL_BYTES:
            continue
        if forwarded >= MAX_FORWARDED:
            break
        out.append((name, value))
        total += size
        forwarded += 1
    return out
