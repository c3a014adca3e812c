"""The worker's stages, each alone: output sizing, in-order release, offsets, health, retry
deadlines, and flags that exist for every setting an error message may name."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from clipguard.cli.serve import add_serve_flags
from clipguard.consumer.batching import Pending
from clipguard.consumer.config import SettingsError, WorkerSettings
from clipguard.consumer.errors import SourceError
from clipguard.consumer.fit import MAX_KEY_BYTES, TRUNCATED_KEY, OutputFitter
from clipguard.consumer.health import HealthState
from clipguard.consumer.judge import Decoded
from clipguard.consumer.offsets import BackwardsCommitError, OffsetTracker
from clipguard.consumer.ordering import InOrderRelease
from clipguard.consumer.outcomes import DeadLetter, Outcome
from clipguard.consumer.records import RecordRef
from clipguard.consumer.retry import retry
from clipguard.consumer.schemas import InputRef, ModelRef, PolicyRef, Verdict

LIMIT = 64 * 1024


def _verdict(metadata: dict) -> Verdict:
    return Verdict(
        event_id="e-1",
        decision="allow",
        label="real",
        ai_score=0.1,
        model=ModelRef(name="m", version="v", sha256="0" * 64),
        policy=PolicyRef(review_at=0.5, block_at=0.9),
        input=InputRef(topic="uploads", partition=0, offset=7),
        decided_at=datetime(2026, 12, 1, tzinfo=timezone.utc),
        metadata=metadata,
    )


def test_a_verdict_with_huge_metadata_is_trimmed_to_fit_with_a_marker() -> None:
    fitter = OutputFitter("verdicts", "dlq", LIMIT)
    metadata = {"blob": "x" * (2 * 1024 * 1024)}
    record = fitter.verdict(_verdict(metadata))
    assert record.size() <= LIMIT
    sent = json.loads(record.value)
    original = json.dumps(metadata, separators=(",", ":")).encode()
    assert sent["metadata"] == {
        TRUNCATED_KEY: {"bytes": len(original), "sha256": hashlib.sha256(original).hexdigest()}
    }
    assert sent["event_id"] == "e-1" and sent["input"]["offset"] == 7
    small = fitter.verdict(_verdict({"k": "v"}))  # what fits is left alone
    assert json.loads(small.value)["metadata"] == {"k": "v"}


def test_an_oversized_dead_letter_keeps_a_prefix_size_and_hash() -> None:
    fitter = OutputFitter("verdicts", "dlq", LIMIT)
    value = bytes(range(256)) * 2000  # 512 000 bytes
    key = b"k" * (MAX_KEY_BYTES * 3)
    record = RecordRef("uploads", 2, 41, key, value)
    out = fitter.dead_letter(DeadLetter(record, "parse", "InvalidEventError", "bad_key", "m"))
    headers = dict(out.headers)
    assert out.size() <= LIMIT and out.topic == "dlq"
    assert value.startswith(out.value) and len(out.value) > LIMIT // 2
    assert headers["clipguard.original.size"] == str(len(value)).encode()
    assert headers["clipguard.original.sha256"] == hashlib.sha256(value).hexdigest().encode()
    assert headers["clipguard.original.truncated"] == b"true"
    assert headers["clipguard.original.offset"] == b"41"
    assert out.key == key[:MAX_KEY_BYTES]
    assert headers["clipguard.original.key_size"] == str(len(key)).encode()


def _decoded(offset: int, epoch: int = 1, partition: int = 0) -> Decoded:
    record = RecordRef("uploads", partition, offset, None, b"")
    return Decoded(Pending(record, 0.0, epoch), None, None, 0.0, None)


def test_in_order_release_holds_later_offsets_until_earlier_ones_are_ready() -> None:
    released: list[int] = []
    ordering = InOrderRelease(lambda d: released.append(d.item.record.offset))
    tp = ("uploads", 0)
    for offset in (3, 5, 9):  # offsets may have gaps (transaction markers)
        ordering.expect(tp, offset, 1)
    ordering(_decoded(9))
    ordering(_decoded(5))
    assert released == []
    ordering(_decoded(3))
    assert released == [3, 5, 9]
    ordering.forget({tp})
    ordering.expect(tp, 3, 2)  # taken again under a new epoch
    ordering(_decoded(3, epoch=1))  # stale work from before the rebalance is dropped
    assert released == [3, 5, 9]
    ordering(_decoded(3, epoch=2))
    assert released == [3, 5, 9, 3]


def test_offsets_skip_gaps_refuse_backwards_and_change_epoch_when_retaken() -> None:
    tracker = OffsetTracker()
    tp = ("uploads", 0)
    epoch = tracker.consumed(tp, 10)
    tracker.consumed(tp, 12)
    tracker.consumed(tp, 13)
    for offset in (13, 12):
        tracker.acknowledged(tp, offset, epoch)
    assert tracker.committable() == {}  # 10 is not acknowledged
    tracker.acknowledged(tp, 10, epoch)
    assert tracker.committable() == {tp: 14}  # 11 was never consumed (a marker): not waited for
    tracker.committed({tp: 14})
    with pytest.raises(BackwardsCommitError):
        tracker.committed({tp: 12})
    tracker.forget([tp])
    assert not tracker.is_current(tp, epoch)
    new_epoch = tracker.consumed(tp, 14)
    assert new_epoch != epoch and tracker.is_current(tp, new_epoch)
    tracker.acknowledged(tp, 14, epoch)  # an acknowledgement from before the rebalance
    assert tracker.committable() == {}


def test_health_liveness_and_readiness_with_an_injected_clock() -> None:
    now = [0.0]
    health = HealthState(
        60, lambda: now[0], assignment_timeout_s=300, broker_stale_after_s=5, loops=("consumer",)
    )
    health.model_ready = True
    health.assignment(assigned=True, group_stable=True)
    health.broker_answered()
    assert health.live() and health.ready()
    now[0] = 30.0
    health.beat("consumer")
    health.broker_failed()  # the broker froze: not ready, still live (a restart would not help)
    assert not health.ready() and health.live()
    assert health.broker_unreachable_for() == pytest.approx(30.0)
    health.broker_answered()
    assert health.ready() and health.broker_unreachable_for() == 0.0
    now[0] = 95.0  # the consumer loop is stuck in a call: it no longer beats
    assert health.problems() == ["consumer loop stalled for 65s"]
    health.beat("consumer")
    health.broker_answered()
    health.watch_outputs(lambda: 20.0)  # an output sent at t=20 is still not acknowledged
    assert health.problems() == ["outputs unacknowledged for 75s"]
    health.watch_outputs(lambda: None)
    health.assignment(assigned=False, group_stable=False)  # a join that never completes
    now[0] = 396.0
    health.beat("consumer")
    health.broker_answered()
    assert health.problems() == ["no partitions and no stable group for 301s"]
    health.assignment(assigned=False, group_stable=True)  # a spare member of a stable group
    assert health.live() and not health.ready()


def test_retry_stops_before_the_deadline() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    def attempt() -> bytes:
        now[0] += 4.0  # each attempt times out after 4 s
        raise SourceError("timed out", "timeout", permanent=False)

    with pytest.raises(SourceError, match="gave up after 2 attempts"):
        retry(attempt, 10, 1.0, 1.0, sleep, lambda: 1.0, deadline=9.5, clock=lambda: now[0])
    assert slept == [1.0]  # a third attempt would start at t=10, past the deadline


def test_every_setting_has_a_serve_flag(tiny_checkpoint: Path) -> None:
    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    flags = {a for action in parser._actions for a in action.option_strings}
    for name in WorkerSettings.model_fields:
        assert "--" + name.replace("_", "-") in flags, name
    args = parser.parse_args(
        ["--max-inflight", "4", "--fetch-allow-cidrs", "127.0.0.1/32", "--no-fetch-enabled"]
    )
    assert (args.max_inflight, args.fetch_allow_cidrs, args.fetch_enabled) == (
        4,
        "127.0.0.1/32",
        False,
    )
    with pytest.raises(SettingsError) as info:
        WorkerSettings.load(
            checkpoint=tiny_checkpoint, bootstrap_servers="h:1", max_inflight=4, max_batch_size=8
        )
    message = str(info.value)
    named = re.findall(r"--[a-z-]+", message)
    assert named == ["--max-inflight", "--max-batch-size"]
    assert all(flag in flags for flag in named)
    assert "CLIPGUARD_MAX_INFLIGHT" in message and "CLIPGUARD_MAX_BATCH_SIZE" in message


def test_outcome_needs_an_output() -> None:
    with pytest.raises(ValueError):
        Outcome(RecordRef("t", 0, 0, None, b""), None, None)


def test_predict_and_bench_have_a_flag_for_every_setting() -> None:
    from clipguard.bench import command as bench
    from clipguard.cli import predict

    special = {"json_file": "--json", "worker_overrides": "--set"}
    for module, settings_cls in ((predict, predict.PredictSettings), (bench, bench.BenchSettings)):
        root = argparse.ArgumentParser()
        module.register(root.add_subparsers())
        sub = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
        parser = next(iter(sub.choices.values()))
        flags = {f for action in parser._actions for f in action.option_strings}
        for name in settings_cls.model_fields:
            assert special.get(name, "--" + name.replace("_", "-")) in flags, (module, name)
