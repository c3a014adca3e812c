"""The worker's small steps, each alone: batching deadlines, offsets, record parsing."""

from __future__ import annotations

import base64
import json

import pytest
from conftest import image_bytes

from clipguard.consumer.batching import Batcher, Pending
from clipguard.consumer.errors import InvalidEventError
from clipguard.consumer.offsets import OffsetTracker
from clipguard.consumer.records import RecordRef, parse_record


def _record(offset: int, value: bytes | None = b"{}", key: bytes | None = None, p: int = 0):
    return RecordRef("uploads", p, offset, key, value)


def test_batch_closes_at_max_size_or_max_wait() -> None:
    batcher = Batcher(max_size=3, max_wait_s=0.05)
    assert not batcher.ready(now=0.0) and batcher.time_left(0.0) == float("inf")
    batcher.add(Pending(_record(0), received_at=10.0))
    assert not batcher.ready(now=10.01)
    assert batcher.time_left(10.01) == pytest.approx(0.04)
    assert batcher.ready(now=10.05)  # the first event waited max_wait
    batcher.add(Pending(_record(1), 10.02))
    batcher.add(Pending(_record(2), 10.03))
    assert batcher.ready(now=10.03)  # full
    assert [p.record.offset for p in batcher.take()] == [0, 1, 2]
    assert len(batcher) == 0


def test_take_where_removes_only_matching() -> None:
    batcher = Batcher(max_size=10, max_wait_s=1)
    for offset in range(4):
        batcher.add(Pending(_record(offset, p=offset % 2), 0.0))
    taken = batcher.take_where(lambda item: item.record.partition == 1)
    assert [p.record.offset for p in taken] == [1, 3]
    assert [p.record.offset for p in batcher.take()] == [0, 2]


def test_offsets_commit_only_the_contiguous_acknowledged_prefix() -> None:
    tracker = OffsetTracker()
    tp = ("uploads", 0)
    for offset in (5, 6, 7, 8):
        tracker.consumed(tp, offset)
    assert tracker.committable() == {}
    tracker.acknowledged(tp, 6)
    assert tracker.committable() == {}  # 5 is not done yet
    tracker.acknowledged(tp, 5)
    assert tracker.committable() == {tp: 7}
    tracker.committed({tp: 7})
    tracker.acknowledged(tp, 8)
    assert tracker.committable() == {}  # 7 still outstanding
    tracker.acknowledged(tp, 7)
    assert tracker.committable() == {tp: 9}
    tracker.committed({tp: 9})
    assert tracker.inflight() == 0
    tracker.acknowledged(tp, 3)  # never consumed: ignored, cannot move anything backwards
    assert tracker.committable() == {}


def test_forgotten_partitions_are_not_committed() -> None:
    tracker = OffsetTracker()
    tracker.consumed(("t", 1), 0)
    tracker.acknowledged(("t", 1), 0)
    tracker.forget([("t", 1)])
    assert tracker.committable() == {} and tracker.inflight() == 0


def test_json_event_parses() -> None:
    data = image_bytes()
    value = json.dumps(
        {
            "event_id": "e1",
            "image_b64": base64.b64encode(data).decode(),
            "uploaded_at": "2026-11-23T10:00:00Z",
            "metadata": {"user_tier": "free"},
            "unknown_field": 1,
        }
    ).encode()
    upload = parse_record(_record(0, value))
    assert upload.event_id == "e1" and upload.image_bytes == data
    assert upload.metadata == {"user_tier": "free"}
    assert upload.uploaded_at.tzinfo is not None


def test_raw_bytes_use_the_key_as_event_id() -> None:
    upload = parse_record(_record(0, image_bytes(), key=b"from-key"))
    assert upload.event_id == "from-key" and upload.image_bytes == image_bytes()
    with pytest.raises(InvalidEventError) as info:
        parse_record(_record(0, image_bytes(), key=None))
    assert info.value.reason == "no_key"


@pytest.mark.parametrize(
    ("value", "reason", "event_id"),
    [
        (b"{broken", "bad_json", None),
        (b'{"event_id": "x"}', "schema", "x"),
        (b'{"event_id": "x", "image_b64": "a", "image_url": "file:///a"}', "schema", "x"),
        (b'{"event_id": "x", "image_b64": "***"}', "bad_base64", "x"),
        (
            b'{"event_id": "x", "schema_version": 2, "image_b64": ""}',
            "unsupported_schema_version",
            "x",
        ),
        (b"", "empty", "k"),
        (b"[1, 2]", "not_an_object", "k"),
        (b"42", "not_an_object", "k"),
        (b"null", "not_an_object", "k"),
        (b"[" * 100_000 + b"]" * 100_000, "too_deep", "k"),
        (b'{"event_id": "e", "image_b64": ""}', "empty_image", "e"),
        (b'{"schema_version": "1", "event_id": "e", "image_b64": "aGk="}', "schema", "e"),
        (b'{"schema_version": true, "event_id": "e", "image_b64": "aGk="}', "schema", "e"),
        (b'{"event_id": 12345, "image_b64": "aGk="}', "schema", "k"),
        (b'{"event_id": "a\\u0000b", "image_b64": "aGk="}', "schema", "k"),
    ],
)
def test_invalid_events_have_reasons_and_ids(value: bytes, reason: str, event_id: str | None):
    with pytest.raises(InvalidEventError) as info:
        parse_record(_record(0, value, key=b"k" if event_id == "k" else None))
    assert info.value.reason == reason
    assert info.value.event_id == event_id


def _stage(is_current=lambda decoded: True):
    from clipguard.consumer.health import HealthState
    from clipguard.consumer.infer import InferenceStage
    from clipguard.consumer.metrics import WorkerMetrics

    now = [1000.0]
    stage = InferenceStage(
        judge=None,  # type: ignore[arg-type] - batching alone never calls the model
        publisher=None,  # type: ignore[arg-type]
        metrics=WorkerMetrics(),
        health=HealthState(60),
        max_batch_size=8,
        max_batch_wait_s=0.005,
        is_current=is_current,
        on_outcomes=lambda outcomes: None,
        clock=lambda: now[0],
    )
    return stage


def _ready(offset: int, partition: int = 0):
    from clipguard.consumer.judge import Decoded

    return Decoded(Pending(_record(offset, p=partition), received_at=0.0), None, None, 0.0, None)


def test_bom_and_utf16_json_are_events() -> None:
    event = {"event_id": "bom", "image_b64": base64.b64encode(b"hi").decode()}
    for value in (b"\xef\xbb\xbf" + json.dumps(event).encode(), json.dumps(event).encode("utf-16")):
        upload = parse_record(_record(0, value))
        assert upload.event_id == "bom" and upload.image_bytes == b"hi"


@pytest.mark.parametrize("key", [b"x" * (1 << 20), b"a\x00b", b"line\nbreak"])
def test_raw_messages_with_unusable_keys_are_refused(key: bytes) -> None:
    with pytest.raises(InvalidEventError) as info:
        parse_record(_record(0, b"\xff\xd8\xff\xe0 raw jpeg", key=key))
    assert info.value.reason == "bad_key" and info.value.event_id is None


def test_a_backlog_fills_whole_batches() -> None:
    """Under a backlog every event's wait is long past; batches must still be full."""
    stage = _stage()
    for offset in range(20):
        stage.put(_ready(offset))
    sizes = [len(stage._next_batch()) for _ in range(2)]
    assert sizes == [8, 8]
    last = stage._next_batch()  # 4 left, nothing more coming: the wait closes the batch
    assert [d.item.record.offset for d in last] == [16, 17, 18, 19]
    assert stage._next_batch() == []  # idle: an empty batch after the idle wait, no hang


def test_work_of_a_revoked_partition_is_dropped_before_the_model() -> None:
    stage = _stage(is_current=lambda d: d.item.record.partition != 1)
    for offset in range(6):
        stage.put(_ready(offset, partition=offset % 2))
    batch = stage._next_batch()
    assert [d.item.record.partition for d in batch] == [0, 0, 0]
    assert stage.stale_dropped == 3
