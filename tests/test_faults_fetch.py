"""A drip-feeding image server among inline events (issue 10, item 2).

One slow URL per partition (the server sends its headers, then a byte a second) is produced
ahead of inline events on the same partitions. URL fetches run in their own I/O pool with a
per-event deadline (``fetch_deadline_s``) and batches take the events whose pixels are
ready, so the inline events behind the slow ones get their verdicts while the slow fetches
are still running, and each slow event ends as a dead letter with stage ``fetch`` once its
deadline is over. The inline latency with and without the slow URLs is measured and the
ratio printed; the assertion is structural (ordering), never a speed.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
from faults import DripServer, Fleet, Outputs, Sent, new_topics, producer, small_events, url_event

pytestmark = [pytest.mark.broker, pytest.mark.faults, pytest.mark.slow]

FETCH_DEADLINE_S = 10.0
INLINE = 30


def _send(bootstrap: str, topic: str, messages: list[tuple[int, bytes, bytes]]) -> list[Sent]:
    """(partition, key, value) triples, each acknowledged; in order."""
    client = producer(bootstrap)
    try:
        futures = [(k, client.send(topic, key=k, value=v, partition=p)) for p, k, v in messages]
        client.flush(timeout=30)
        out = []
        for key, future in futures:
            meta = future.get(timeout=30)
            out.append(Sent(key, meta.partition, meta.offset, time.monotonic()))
        return out
    finally:
        client.close(timeout=5)


def _latencies(out: Outputs, sent: list[Sent]) -> list[float]:
    verdicts, _ = out.snapshot()
    seen = {v.named: v.at for v in verdicts}
    return [seen[(s.partition, s.offset)] - s.at for s in sent if (s.partition, s.offset) in seen]


def test_drip_feeding_url_does_not_hold_back_inline_events(
    kafka_bootstrap: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    partitions = 3
    topics = new_topics(kafka_bootstrap, partitions=partitions, prefix="drip")
    with (
        DripServer(drip_seconds=FETCH_DEADLINE_S * 6) as server,
        Fleet(
            tiny_checkpoint,
            kafka_bootstrap,
            topics,
            tmp_path,
            fetch_allow_cidrs="127.0.0.1/32",
            fetch_deadline_s=FETCH_DEADLINE_S,
        ) as fleet,
        Outputs(kafka_bootstrap, topics) as out,
    ):
        worker = fleet.spawn("drip")
        worker.wait_ready()

        def inline(prefix: str) -> list[tuple[int, bytes, bytes]]:
            events = small_events(INLINE, prefix)
            return [(i % partitions, k, v) for i, (k, v) in enumerate(events)]

        # A: inline events alone, for the normal latency.
        alone = _send(kafka_bootstrap, topics.input, inline("alone"))
        missing = out.wait_for({(s.partition, s.offset) for s in alone}, 60, worker.alive)
        assert not missing, worker.log_tail()
        # B: one drip-feeding URL at the head of every partition, inline events behind them.
        slow = _send(
            kafka_bootstrap,
            topics.input,
            [
                (p, f"slow-{p}".encode(), url_event(server.url(f"/drip/{p}.jpg"), f"slow-{p}"))
                for p in range(partitions)
            ],
        )
        slow_sent = min(s.at for s in slow)
        behind = _send(kafka_bootstrap, topics.input, inline("behind"))
        behind_names = {(s.partition, s.offset) for s in behind}
        slow_names = {(s.partition, s.offset) for s in slow}
        # Wait for the inline events, at most until the slow ones' deadline is over.
        out.wait_for(behind_names, FETCH_DEADLINE_S - (time.monotonic() - slow_sent), worker.alive)
        inline_done_at = time.monotonic()
        named_then = out.named()
        slow_named_then = slow_names & named_then
        # Then the slow ones must end as dead letters (bounded wait).
        missing_slow = out.wait_for(slow_names, FETCH_DEADLINE_S + 60, worker.alive)
        _, dead = out.snapshot()
        slow_dead = [d for d in dead if d.named in slow_names]
        slow_done = {d.named: d.at - slow_sent for d in slow_dead}
        base, held = _latencies(out, alone), _latencies(out, behind)
        p50_a, p50_b = statistics.median(base), statistics.median(held) if held else float("nan")
        print(
            f"[drip] inline latency alone p50 {p50_a:.3f}s max {max(base):.3f}s; behind "
            f"{partitions} drip URLs p50 {p50_b:.3f}s max {max(held, default=float('nan')):.3f}s; "
            f"ratio p50 {p50_b / p50_a:.2f} max {max(held, default=float('nan')) / max(base):.2f}; "
            f"inline judged {len(behind_names & named_then)}/{len(behind)} after "
            f"{inline_done_at - slow_sent:.1f}s; slow dead letters after "
            f"{sorted(round(v, 1) for v in slow_done.values())}s (deadline {FETCH_DEADLINE_S}s); "
            f"drip requests {server.hits['drip']}; worker exit code {worker.returncode}"
        )
        tally = out.tally(alone + slow + behind)
        print(tally.line("drip"))
        assert worker.alive(), f"worker stopped with {worker.returncode}:\n{worker.log_tail()}"
    # Structural: every inline event was judged while the slow fetches were still running.
    assert behind_names <= named_then, f"{len(behind_names - named_then)} inline events held back"
    assert not slow_named_then, "a slow URL finished before the inline events behind it"
    # ...and each slow one became a dead letter from the fetch stage.
    assert not missing_slow, f"slow events never accounted for: {sorted(missing_slow)}"
    assert {d.named for d in slow_dead} == slow_names
    assert all(d.headers["clipguard.error.stage"] == "fetch" for d in slow_dead)
    assert tally.lost == []
