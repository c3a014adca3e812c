"""Group members killed with SIGKILL under traffic (issue 10 suite, issue 13 item 1).

- A busy worker is SIGKILLed at random moments (at least five times, restarted each time)
  while a second worker shares its group: afterwards every input offset is named by a
  verdict or a dead letter; duplicates are counted and printed, never gaps.
- Revocation never blocks: after a peer's SIGKILL the survivor's longest stretch without a
  verdict stays near one batch plus the group's re-join (about the session timeout),
  whatever ``max_poll_interval_ms`` is (measured at the default and at 20 s).
"""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path

import pytest
from faults import (
    EXIT_OK,
    SESSION_TIMEOUT_S,
    Fleet,
    Outputs,
    Serve,
    Traffic,
    longest_gap,
    new_topics,
    wait_committed,
)

pytestmark = [pytest.mark.broker, pytest.mark.faults, pytest.mark.slow]

KILLS = 5
RATE = 25.0  # events per second: enough to keep both workers busy, light on 2 cores


def _consumed(worker: Serve) -> float:
    total = 0.0
    for match in re.finditer(
        r"^clipguard_events_consumed_total\{[^}]*\} ([0-9.e+]+)$", worker.metrics_text(), re.M
    ):
        total += float(match.group(1))
    return total


def _busy(worker: Serve, timeout: float) -> bool:
    """Wait (bounded) until the worker has consumed something since it started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and worker.alive():
        if _consumed(worker) > 0:
            return True
        time.sleep(0.1)
    return False


def test_sigkill_at_random_moments_loses_nothing(
    kafka_bootstrap: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    seed = int(os.environ.get("CLIPGUARD_FAULTS_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    topics = new_topics(kafka_bootstrap, partitions=3, prefix="kill")
    kills: list[str] = []
    with (
        Fleet(
            tiny_checkpoint, kafka_bootstrap, topics, tmp_path, max_poll_interval_ms=20_000
        ) as fleet,
        Outputs(kafka_bootstrap, topics) as out,
    ):
        anchor = fleet.spawn("anchor")
        victim = fleet.spawn("victim-0")
        anchor.wait_ready()
        victim.wait_ready()
        with Traffic(kafka_bootstrap, topics.input, RATE, "kill", max_seconds=240) as traffic:
            for k in range(KILLS):
                busy = _busy(victim, timeout=30)
                time.sleep(rng.uniform(0.2, 2.5))  # a random moment of decode/infer/publish/commit
                consumed = _consumed(victim)
                victim.kill()
                kills.append(
                    f"kill {k + 1} at +{time.monotonic() - victim.started_at:.1f}s after start "
                    f"(busy={busy}, had consumed {consumed:.0f})"
                )
                assert anchor.alive(), f"anchor died ({anchor.returncode}):\n{anchor.log_tail()}"
                victim = fleet.spawn(f"victim-{k + 1}")
                victim.wait_ready()
            time.sleep(2)  # the last victim works a little too
        sent = traffic.sent
        missing = out.wait_sent(sent, timeout=120, alive=anchor.alive)
        committed = wait_committed(kafka_bootstrap, topics, sent, timeout=30)
        codes = [w.terminate(timeout=45) for w in (anchor, victim)]
        tally = out.tally(sent)
        tally.extra.update(
            {
                "kills": len(kills),
                "seed": seed,
                "send failures": traffic.failed,
                "committed": committed,
                "SIGTERM exits (code, s)": [(c, round(s, 1)) for c, s in codes],
            }
        )
        print("\n".join(kills))
        print(tally.line("sigkill"))
    assert len(kills) >= KILLS
    assert not missing and tally.lost == [], f"lost {tally.lost[:10]}"
    assert [c for c, _ in codes] == [EXIT_OK, EXIT_OK]


@pytest.mark.parametrize(
    "max_poll_interval_ms", [None, 20_000], ids=["default-poll-interval", "poll-interval-20s"]
)
def test_survivor_keeps_judging_after_its_peer_is_killed(
    kafka_bootstrap: str, tiny_checkpoint: Path, tmp_path: Path, max_poll_interval_ms: int | None
) -> None:
    topics = new_topics(kafka_bootstrap, partitions=3, prefix="revoke")
    bound = SESSION_TIMEOUT_S + 10.0
    # Observed after the kill: the peer's session expiry (when the group rebalances) plus more
    # than the bound, so a stall that starts at the rebalance cannot hide past the window's end.
    window = SESSION_TIMEOUT_S + bound + 10.0
    with (
        Fleet(
            tiny_checkpoint,
            kafka_bootstrap,
            topics,
            tmp_path,
            max_poll_interval_ms=max_poll_interval_ms,
        ) as fleet,
        Outputs(kafka_bootstrap, topics) as out,
    ):
        survivor = fleet.spawn("survivor")
        peer = fleet.spawn("peer")
        survivor.wait_ready()
        peer.wait_ready()
        with Traffic(kafka_bootstrap, topics.input, 60.0, "rv", max_seconds=120) as traffic:
            # Both members judging (verdicts flowing) before the kill.
            flowing = out.wait_until(lambda o: len(o.snapshot()[0]) >= 120, timeout=30)
            _busy(peer, timeout=10)
            killed_at = time.monotonic()
            peer.kill()
            # Observe while traffic goes on (bounded); the survivor must keep publishing.
            deadline = killed_at + window
            while time.monotonic() < deadline and survivor.alive():
                time.sleep(0.2)
            observed_until = time.monotonic()
        sent = traffic.sent
        verdicts, _ = out.snapshot()
        gap, gap_start = longest_gap([v.at for v in verdicts], killed_at, observed_until)
        missing = out.wait_sent(sent, timeout=45, alive=survivor.alive)
        code, took = survivor.terminate(timeout=45)
        tally = out.tally(sent)
        tally.extra.update(
            {
                "max_poll_interval_ms": max_poll_interval_ms or "default (300000)",
                "longest gap after the kill": f"{gap:.1f}s from +{gap_start - killed_at:.1f}s",
                "bound": f"{bound:.0f}s",
                "survivor SIGTERM": f"exit {code} after {took:.1f}s",
            }
        )
        print(tally.line("peer SIGKILL"))
    assert flowing, "verdicts never flowed before the kill"
    assert gap < bound, f"survivor published nothing for {gap:.1f}s after its peer's SIGKILL"
    assert not missing and tally.lost == [], f"lost {tally.lost[:10]}"
    assert code == EXIT_OK
