"""Hostile input against a real `clipguard serve` process (issue 10, items 1 and 3).

- A poison record (an output larger than any request the producer may send) between normal
  ones: it is accounted for (a verdict with a truncation marker, or a dead letter holding a
  bounded prefix of the original plus its size and sha256), the other events on every
  partition keep flowing, and the worker never stops.
- 300 bad events in a row (unparseable JSON, undecodable images, refused URLs) are bad input,
  not a bad deploy: the dead-letter brake does not trip, every one ends as a dead letter.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from pathlib import Path

import pytest
from conftest import image_bytes
from faults import Fleet, Outputs, new_topics, produce, sha256, small_events

pytestmark = [pytest.mark.broker, pytest.mark.faults]

MIB = 1 << 20
#: Above the worker's default producer request size (40 MiB) and any broker's message size.
POISON_BYTES = 41 * MIB


def test_poison_outputs_are_routed_and_the_worker_goes_on(
    kafka_bootstrap: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    topics = new_topics(kafka_bootstrap, partitions=3, prefix="poison")
    blob = "m" * POISON_BYTES
    meta_event = json.dumps(
        {
            "schema_version": 1,
            "event_id": "poison-meta",
            "image_b64": base64.b64encode(image_bytes()).decode(),
            "metadata": {"blob": blob},
        }
    ).encode()
    raw = b"\xffRAW" + os.urandom(POISON_BYTES - 4)  # not JSON: the key is its event id
    with (
        Fleet(tiny_checkpoint, kafka_bootstrap, topics, tmp_path) as fleet,
        Outputs(kafka_bootstrap, topics) as out,
    ):
        worker = fleet.spawn("poisoned")
        worker.wait_ready()
        sent = produce(kafka_bootstrap, topics.input, small_events(30, "before"))
        poison = produce(
            kafka_bootstrap, topics.input, [(b"poison-meta", meta_event), (b"poison-raw", raw)]
        )
        sent += poison + produce(kafka_bootstrap, topics.input, small_events(30, "after"))
        del meta_event
        expected = {(s.partition, s.offset) for s in sent}
        missing = out.wait_for(expected, timeout=120, alive=worker.alive)
        tally = out.tally(sent)
        tally.extra["worker exit code"] = worker.returncode
        print(tally.line("poison"))
        assert worker.alive(), f"worker stopped with {worker.returncode}:\n{worker.log_tail()}"
        assert not missing, f"{len(missing)} events never judged, e.g. {sorted(missing)[:5]}"
        verdicts, dead = out.snapshot()

    by_id = {v.verdict["event_id"]: v.verdict for v in verdicts}
    # Events on every partition, before and after the poison, got their real verdicts.
    normal = [f"{p}-{i}" for p in ("before", "after") for i in range(30)]
    assert all(by_id.get(i, {}).get("label") in ("real", "ai_generated") for i in normal)
    assert {s.partition for s in sent} == {0, 1, 2}
    # The oversized verdict: judged, its metadata replaced by a marker.
    meta_verdict = by_id["poison-meta"]
    marker = meta_verdict["metadata"]
    print(f"poison-meta verdict: decision {meta_verdict['decision']}, metadata {marker}")
    assert set(marker) == {"clipguard_truncated"}, str(marker)[:200]
    assert marker["clipguard_truncated"]["bytes"] >= len(blob)
    assert re.fullmatch(r"[0-9a-f]{64}", marker["clipguard_truncated"]["sha256"])
    assert meta_verdict["decision"] in ("allow", "review", "block")
    # The oversized original: dead-lettered as a bounded prefix plus its size and digest.
    raw_dead = [d for d in dead if d.named == (poison[1].partition, poison[1].offset)]
    assert raw_dead, "the raw poison record has no dead letter"
    letter = raw_dead[0]
    print(
        f"poison-raw dead letter: {len(letter.value)} of {len(raw)} bytes, "
        + ", ".join(f"{k}={v[:80]}" for k, v in letter.headers.items())
    )
    assert letter.key == b"poison-raw"
    assert letter.headers["clipguard.original.size"] == str(len(raw))
    assert letter.headers["clipguard.original.sha256"] == sha256(raw)
    assert letter.headers["clipguard.original.truncated"] == "true"
    assert len(letter.value) < len(raw) and raw.startswith(letter.value)
    assert tally.lost == []


def _bad_events(count: int) -> list[tuple[bytes | None, bytes]]:
    """Input that is bad on its own: it says nothing about the worker's health."""
    garbage = base64.b64encode(b"\x00not an image at all" * 8).decode()
    kinds = [
        lambda i: (f"bad-{i}".encode(), b"{bad json"),
        lambda i: (f"bad-{i}".encode(), b"\x00\x01 raw bytes that no decoder reads"),
        lambda i: (
            f"bad-{i}".encode(),
            json.dumps({"event_id": f"bad-{i}", "image_b64": garbage}).encode(),
        ),
        lambda i: (
            f"bad-{i}".encode(),
            json.dumps(
                {"event_id": f"bad-{i}", "image_url": "http://169.254.169.254/latest/meta-data"}
            ).encode(),
        ),
        lambda i: (
            f"bad-{i}".encode(),
            json.dumps({"event_id": f"bad-{i}", "image_url": "http://10.1.2.3/x.jpg"}).encode(),
        ),
        lambda i: (
            f"bad-{i}".encode(),
            json.dumps({"event_id": f"bad-{i}", "image_url": "http://127.0.0.1:9/x"}).encode(),
        ),
        lambda i: (None, b'{"schema_version": 99, "event_id": "x"}'),
    ]
    return [kinds[i % len(kinds)](i) for i in range(count)]


def test_bad_input_never_trips_the_dead_letter_brake(
    kafka_bootstrap: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    topics = new_topics(kafka_bootstrap, partitions=1, prefix="brake")  # all in a row
    with (
        Fleet(tiny_checkpoint, kafka_bootstrap, topics, tmp_path) as fleet,
        Outputs(kafka_bootstrap, topics) as out,
    ):
        worker = fleet.spawn("brake")
        worker.wait_ready()
        started = time.monotonic()
        bad = produce(kafka_bootstrap, topics.input, _bad_events(300))
        good = produce(kafka_bootstrap, topics.input, small_events(15, "good"))
        missing = out.wait_for(
            {(s.partition, s.offset) for s in bad + good}, timeout=90, alive=worker.alive
        )
        tally = out.tally(bad + good)
        tally.extra["worker exit code"] = worker.returncode
        tally.extra["seconds"] = round(time.monotonic() - started, 1)
        print(tally.line("300 bad events"))
        assert worker.alive(), f"worker stopped with {worker.returncode}:\n{worker.log_tail()}"
        assert not missing, f"{len(missing)} events never judged, e.g. {sorted(missing)[:5]}"
        verdicts, dead = out.snapshot()
    dead_named = {d.named for d in dead}
    assert {(s.partition, s.offset) for s in bad} <= dead_named  # every bad one dead-lettered
    good_ids = {f"good-{i}" for i in range(15)}
    judged = {v.verdict["event_id"] for v in verdicts if v.verdict.get("label")}
    assert good_ids <= judged
    assert tally.lost == []
