"""Input headers carried to verdicts and dead letters (consumer/headers.py, consumer/fit.py)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from clipguard.consumer.config import SettingsError, WorkerSettings
from clipguard.consumer.fit import OutputFitter
from clipguard.consumer.headers import (
    MAX_FORWARDED,
    MAX_TRACESTATE_BYTES,
    MAX_VALUE_BYTES,
    carried,
    valid_traceparent,
)
from clipguard.consumer.outcomes import DeadLetter, Outcome, input_ref
from clipguard.consumer.records import RecordRef
from clipguard.consumer.schemas import ModelRef, PolicyRef, Verdict

PARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
STATE = b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"


@pytest.mark.parametrize(
    "value, ok",
    [
        (PARENT, True),
        (b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", True),
        (PARENT + b"-extra", False),  # version 00 has exactly four fields
        (b"01" + PARENT[2:] + b"-future", True),  # a later version may append fields
        (b"ff" + PARENT[2:], False),  # version ff is invalid
        (b"00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),  # zero trace id
        (b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", False),  # zero parent id
        (PARENT.upper(), False),  # lower-case hex only
        (b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", False),  # short trace id
        (b"", False),
        (b"\xff\xfe garbage", False),
        (b"not a traceparent at all", False),
    ],
)
def test_traceparent_validation(value: bytes, ok: bool) -> None:
    assert valid_traceparent(value) is ok


def test_trace_context_and_allow_list_are_carried_in_input_order() -> None:
    headers = [
        ("x-tenant", b"acme"),
        ("traceparent", PARENT),
        ("tracestate", STATE),
        ("x-other", b"not allowed"),
        ("X-Request-Id", b"r-1"),
    ]
    assert carried(headers, ("x-tenant", "x-request-id")) == [
        ("traceparent", PARENT),
        ("tracestate", STATE),
        ("x-tenant", b"acme"),
        ("X-Request-Id", b"r-1"),  # matched case-insensitively, the input's spelling kept
    ]


def test_malformed_traceparent_is_dropped_with_its_tracestate() -> None:
    headers = [("traceparent", b"00-zz-bad"), ("tracestate", STATE), ("x-tenant", b"acme")]
    assert carried(headers, ("x-tenant",)) == [("x-tenant", b"acme")]
    assert carried([("tracestate", STATE)]) == []  # no parent, no state


def test_sizes_are_bounded() -> None:
    members = [f"k{i}=" + "v" * 40 for i in range(40)]  # ~1.8 KB of tracestate
    state = ",".join(members).encode()
    out = dict(carried([("traceparent", PARENT), ("tracestate", state)]))
    assert len(out["tracestate"]) <= MAX_TRACESTATE_BYTES
    assert out["tracestate"].startswith(b"k0=")  # trimmed from the end, by whole members
    assert out["tracestate"].split(b",")[-1].endswith(b"v" * 40)

    big = [("x-big", b"x" * (MAX_VALUE_BYTES + 1)), ("x-small", b"ok")]
    assert carried(big, ("x-big", "x-small")) == [("x-small", b"ok")]

    many = [(f"x-{i}", b"v") for i in range(MAX_FORWARDED + 5)]
    assert len(carried(many, [name for name, _ in many])) == MAX_FORWARDED

    twice = [("x-a", b"first"), ("x-a", b"second"), ("x-a", None)]
    assert carried(twice, ("x-a",)) == [("x-a", b"first")]


def test_reserved_names_are_never_copied() -> None:
    forged = [("clipguard.error.stage", b"forged"), ("x-a", b"1")]
    assert carried(forged, ("clipguard.error.stage", "x-a")) == [("x-a", b"1")]


def test_forward_headers_setting(tiny_checkpoint: Path) -> None:
    base = {"checkpoint": tiny_checkpoint, "bootstrap_servers": "k:9092"}
    settings = WorkerSettings.load(**base, forward_headers="x-tenant, x-request-id")
    assert settings.forward_headers == ("x-tenant", "x-request-id")
    with pytest.raises(SettingsError, match="forward_headers"):
        WorkerSettings.load(**base, forward_headers="clipguard.error.stage")
    with pytest.raises(SettingsError, match="forward_headers"):
        WorkerSettings.load(**base, forward_headers="has space")


def _record(**extra: object) -> RecordRef:
    values: dict = {
        "topic": "uploads",
        "partition": 2,
        "offset": 9,
        "key": b"e-1",
        "value": b"not an image",
        "headers": (("traceparent", PARENT), ("x-tenant", b"acme"), ("x-secret", b"no")),
        "timestamp_ms": 1_700_000_000_123,
    }
    values.update(extra)
    return RecordRef(**values)  # type: ignore[arg-type]


def _verdict(record: RecordRef, metadata: dict | None = None) -> Verdict:
    return Verdict(
        event_id="e-1",
        decision="allow",
        label="real",
        model=ModelRef(name="m", version="v", sha256="s"),
        policy=PolicyRef(review_at=0.5, block_at=0.9),
        input=input_ref(record),
        decided_at=datetime.now(timezone.utc),
        metadata=metadata or {},
    )


def test_fitter_copies_headers_to_the_verdict_and_the_dead_letter() -> None:
    record = _record()
    fitter = OutputFitter("verdicts", "dlq", 1 << 20, ("x-tenant",))
    dead = DeadLetter(record, "decode", "DecodeError", "undecodable", "bad bytes")
    verdict_out, dead_out = fitter.records(Outcome(record, _verdict(record), dead))
    expected = [("traceparent", PARENT), ("x-tenant", b"acme")]
    assert verdict_out.headers == expected
    assert dead_out.headers[-2:] == expected
    assert ("clipguard.error.reason", b"undecodable") in dead_out.headers
    sent = json.loads(verdict_out.value)
    assert sent["input"]["timestamp"] == "2023-11-14T22:13:20.123Z"


def test_verdict_without_record_timestamp_says_null() -> None:
    record = _record(timestamp_ms=None, headers=())
    out = OutputFitter("verdicts", "dlq", 1 << 20).records(Outcome(record, _verdict(record), None))
    assert json.loads(out[0].value)["input"]["timestamp"] is None
    assert out[0].headers == []


def test_a_verdict_that_would_not_fit_drops_metadata_then_headers_never_itself() -> None:
    record = _record(headers=(("traceparent", PARENT), ("x-tenant", b"t" * 1000)))
    fitter = OutputFitter("verdicts", "dlq", 4096, ("x-tenant",))
    out = fitter.verdict(
        _verdict(record, {"blob": "m" * 3000}), carried(record.headers, ("x-tenant",))
    )
    assert out.size() <= fitter.budget
    assert "clipguard_truncated" in json.loads(out.value)["metadata"]
