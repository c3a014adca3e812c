"""The worker against a real broker: nothing lost, offsets committed, bad input routed."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from conftest import image_bytes
from streams import (
    committed_offsets,
    fresh_topics,
    png_server,
    produce,
    read_outputs,
    running_worker,
    worker_settings,
)

from clipguard.cli.produce import upload_event
from clipguard.consumer.metrics import METRIC_DEFS

pytestmark = pytest.mark.broker


def _good_events(count: int, prefix: str) -> list[tuple[bytes, bytes]]:
    events = []
    for index in range(count):
        event_id = f"{prefix}-{index}"
        color = (index * 7 % 256, index * 13 % 256, index * 29 % 256)
        fmt = "JPEG" if index % 3 == 0 else "PNG"
        value = upload_event(image_bytes(color=color, fmt=fmt), event_id, {"n": index})
        events.append((event_id.encode(), value))
    return events


def test_n_events_in_n_verdicts_out_and_offsets_committed(
    kafka_bootstrap: str, tiny_checkpoint: Path
) -> None:
    topics = fresh_topics(kafka_bootstrap, partitions=3)
    events = _good_events(60, "good")
    settings = worker_settings(kafka_bootstrap, tiny_checkpoint, topics)
    with running_worker(settings):
        placed = produce(kafka_bootstrap, topics.input, events)
        out = read_outputs(kafka_bootstrap, topics, set(placed))
    assert len(out.verdicts) == len(events)  # exactly N, no duplicates in a clean run
    assert not out.dead_letters
    by_id = {v.event_id: v for v in out.verdicts}
    for (key, _), (partition, offset) in zip(events, placed, strict=True):
        verdict = by_id[key.decode()]
        assert (verdict.input.topic, verdict.input.partition, verdict.input.offset) == (
            topics.input,
            partition,
            offset,
        )
        assert verdict.label in ("real", "ai_generated") and verdict.error is None
        assert verdict.decision in ("allow", "review", "block")
        assert verdict.model.name == "clipguard-tiny" and verdict.model.sha256
        assert verdict.metadata == {"n": int(key.decode().split("-")[1])}
        assert verdict.timings_ms["total"] >= verdict.timings_ms["inference"] >= 0
    # Committed only after the outputs were acknowledged, and all the way to the end. The end
    # is taken from where the records landed: Tansu's ListOffsets answers "latest" with the
    # last batch's base offset + 1, which undercounts multi-record batches.
    ends = {}
    for partition, offset in placed:
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    assert committed_offsets(kafka_bootstrap, topics.group, topics.input) == ends


def test_bad_events_become_dead_letters_and_the_worker_keeps_going(
    kafka_bootstrap: str, tiny_checkpoint: Path
) -> None:
    topics = fresh_topics(kafka_bootstrap, partitions=1)
    corrupt = image_bytes(size=(200, 200), fmt="PNG")[:300]
    messages = [
        (None, b"{definitely not json"),
        (b"corrupt-1", upload_event(corrupt, "corrupt-1")),
        (
            b"schema-1",
            json.dumps({"event_id": "schema-1", "schema_version": 99, "image_b64": ""}).encode(),
        ),
        (b"raw-1", image_bytes(fmt="PNG")),  # raw image bytes keyed by event id: judged
        *_good_events(5, "after"),
    ]
    settings = worker_settings(kafka_bootstrap, tiny_checkpoint, topics)
    with running_worker(settings) as worker:
        placed = produce(kafka_bootstrap, topics.input, messages)
        out = read_outputs(kafka_bootstrap, topics, set(placed))
        metrics_url = f"http://127.0.0.1:{worker.metrics_server.port}"
        metrics = urllib.request.urlopen(metrics_url + "/metrics", timeout=5).read().decode()
        ready = urllib.request.urlopen(metrics_url + "/readyz", timeout=5).status
    assert set(out.covered(topics.input)) == set(placed)  # nothing lost
    dlq = {
        headers["clipguard.original.offset"]: (key, value, headers)
        for key, value, headers in out.dead_letters
    }
    assert len(dlq) == 3
    # The malformed event: no id, so a dead letter only, carrying its original bytes.
    key, value, headers = dlq[str(placed[0][1])]
    assert value == b"{definitely not json" and key is None
    assert headers["clipguard.error.stage"] == "parse"
    assert headers["clipguard.original.topic"] == topics.input
    for name in (
        "clipguard.error.class",
        "clipguard.error.message",
        "clipguard.original.partition",
    ):
        assert headers[name]
    # The corrupt image: a dead letter and a review verdict naming the error.
    _, _, headers = dlq[str(placed[1][1])]
    assert (headers["clipguard.error.stage"], headers["clipguard.error.reason"]) == (
        "decode",
        "corrupt",
    )
    verdicts = {v.event_id: v for v in out.verdicts}
    assert verdicts["corrupt-1"].decision == "review" and verdicts["corrupt-1"].label is None
    assert verdicts["corrupt-1"].error.stage == "decode"
    assert verdicts["schema-1"].error.reason == "unsupported_schema_version"
    assert verdicts["raw-1"].error is None and verdicts["raw-1"].label is not None
    assert all(verdicts[f"after-{i}"].error is None for i in range(5))
    assert ready == 200
    for name in METRIC_DEFS:
        assert f"clipguard_{name}" in metrics, name
    assert 'clipguard_dead_letters_total{reason="corrupt",stage="decode"} 1.0' in metrics


def test_url_events_are_fetched_behind_the_ssrf_guard(
    kafka_bootstrap: str, tiny_checkpoint: Path
) -> None:
    topics = fresh_topics(kafka_bootstrap, partitions=1)
    settings = worker_settings(
        kafka_bootstrap, tiny_checkpoint, topics, fetch_allow_cidrs=("127.0.0.1/32",)
    )
    with png_server(image_bytes(fmt="PNG")) as base:
        url = f"{base}/upload.png"
        messages = [
            (b"url-ok", json.dumps({"event_id": "url-ok", "image_url": url}).encode()),
            (
                b"url-meta",
                json.dumps(
                    {"event_id": "url-meta", "image_url": "http://169.254.169.254/latest/"}
                ).encode(),
            ),
        ]
        with running_worker(settings):
            placed = produce(kafka_bootstrap, topics.input, messages)
            out = read_outputs(kafka_bootstrap, topics, set(placed))
    verdicts = {v.event_id: v for v in out.verdicts}
    assert verdicts["url-ok"].error is None and verdicts["url-ok"].label is not None
    assert verdicts["url-meta"].error.stage == "fetch"
    assert verdicts["url-meta"].error.reason == "ssrf_refused"
    [(_, _, headers)] = out.dead_letters
    assert headers["clipguard.error.reason"] == "ssrf_refused"
