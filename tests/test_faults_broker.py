"""Broker faults under a running `clipguard serve` (issue 13, items 2 and 3).

Each test runs its own embedded broker, so it can freeze (SIGSTOP), kill and restart it.
The embedded broker keeps everything in memory: a restarted broker is empty, so topics are
created again and the events that count after a restart are the ones produced after it.

- Broker frozen longer than the session timeout: the worker stays up, /readyz answers 503
  during the freeze and 200 after, /livez does not stay 503 while the worker recovers, and
  every event produced before, during and after is judged.
- Broker killed and restarted on the same port: the same worker process (no restart of
  its own) judges every event produced after the restart.
- Broker gone for good: the worker keeps retrying with /readyz 503, and only after
  ``broker_retry_timeout_s`` exits with code 4 and one log line saying "broker unreachable"
  (also when it was started while the broker was already down).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from faults import (
    EXIT_BROKER,
    EXIT_OK,
    SESSION_TIMEOUT_S,
    Fleet,
    HealthWatch,
    Outputs,
    Traffic,
    free_port,
    new_topics,
    produce,
    small_events,
    stopped,
    wait_committed,
)
from kafka_fixture import EmbeddedBroker

pytestmark = [pytest.mark.broker, pytest.mark.faults, pytest.mark.slow]

FREEZE_S = 2 * SESSION_TIMEOUT_S  # longer than the session timeout
STALL_S = 20.0  # stall_timeout_s for the restart test: /livez must not stay green past it


def _kill_broker(broker: EmbeddedBroker) -> None:
    """SIGKILL the broker's process group (it runs in its own session) and reap it."""
    assert broker.process is not None
    os.killpg(broker.process.pid, signal.SIGKILL)
    broker.process.wait(timeout=30)
    broker.stop()  # only forgets the dead process (and its atexit hook)


def _wait_status(watch: HealthWatch, path_index: int, want: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and watch.worker.alive():
        if watch.samples and watch.samples[-1][path_index] == want:
            return True
        time.sleep(0.1)
    return False


def test_broker_frozen_longer_than_the_session(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        topics = new_topics(bootstrap, partitions=2, prefix="freeze")
        with (
            Fleet(tiny_checkpoint, bootstrap, topics, tmp_path) as fleet,
            Outputs(bootstrap, topics) as out,
        ):
            worker = fleet.spawn("frozen")
            worker.wait_ready()
            with (
                HealthWatch(worker) as watch,
                Traffic(bootstrap, topics.input, 15.0, "fz", max_seconds=120) as traffic,
            ):
                out.wait_until(lambda o: len(o.snapshot()[0]) >= 30, timeout=30)
                frozen_at = time.monotonic()
                with stopped(broker.pid or 0):
                    time.sleep(FREEZE_S)  # the fault's duration, not an assertion
                thawed_at = time.monotonic()
                recovered = _wait_status(watch, 1, 200, timeout=90)
                recovered_at = time.monotonic()
                time.sleep(3)  # traffic after the recovery
            sent = traffic.sent
            missing = out.wait_sent(sent, timeout=90, alive=worker.alive)
            tally = out.tally(sent)
            alive = worker.alive()
            code, took = worker.terminate(timeout=45)
            tally.extra.update(
                {
                    "freeze": f"{FREEZE_S:.0f}s",
                    "send failures": traffic.failed,
                    "ready again after thaw": f"{recovered_at - thawed_at:.1f}s",
                    "exit": f"{code} after SIGTERM in {took:.1f}s",
                }
            )
            print(tally.line("broker SIGSTOP"))
            print(watch.timeline({"SIGSTOP": frozen_at, "SIGCONT": thawed_at}))
    during = watch.between(frozen_at, thawed_at + 1.0)
    after = watch.between(recovered_at, time.monotonic())
    assert alive, f"worker died during the freeze:\n{worker.log_tail()}"
    assert any(ready == 503 for _, ready, _ in during), "/readyz stayed 200 through the freeze"
    assert recovered, "/readyz never answered 200 again after the freeze"
    assert all(live == 200 for _, _, live in after if live is not None), "/livez 503 after"
    assert not missing and tally.lost == [], f"lost {tally.lost[:10]}"
    assert code == EXIT_OK


def test_broker_killed_and_restarted_on_the_same_port(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    port = free_port()
    broker = EmbeddedBroker(port=port).start()
    try:
        bootstrap = broker.bootstrap_servers
        topics = new_topics(bootstrap, partitions=2, prefix="restart")
        with Fleet(tiny_checkpoint, bootstrap, topics, tmp_path, stall_timeout_s=STALL_S) as fleet:
            worker = fleet.spawn("survivor")
            worker.wait_ready()
            with HealthWatch(worker) as watch:
                with Outputs(bootstrap, topics) as out:
                    before = produce(bootstrap, topics.input, small_events(40, "before"))
                    missing_before = out.wait_for(
                        {(s.partition, s.offset) for s in before}, 60, worker.alive
                    )
                    committed = wait_committed(bootstrap, topics, before, timeout=30)
                assert not missing_before, worker.log_tail()
                killed_at = time.monotonic()
                _kill_broker(broker)
                outage_ok = _wait_status(watch, 1, 503, timeout=20)
                time.sleep(max(0.0, killed_at + SESSION_TIMEOUT_S + 4 - time.monotonic()))
                broker = EmbeddedBroker(port=port).start()  # empty: memory storage
                restarted_at = time.monotonic()
                topics.create(bootstrap)
                with Outputs(bootstrap, topics) as out:
                    after = produce(bootstrap, topics.input, small_events(40, "after"))
                    missing = out.wait_sent(after, timeout=STALL_S + 40, alive=worker.alive)
                    judged_at = time.monotonic()
                    tally = out.tally(after)
            # Not ready, yet "live": how long, once the broker was back, did the worker claim
            # to be fine while it made no progress?
            stuck_live = watch.longest_run(
                lambda ready, live: ready != 200 and live == 200, since=restarted_at
            )
            alive = worker.alive()
            code, took = worker.terminate(timeout=45)
            tally.extra.update(
                {
                    "committed before the kill": committed,
                    "outage": f"{restarted_at - killed_at:.1f}s",
                    "judged after restart within": f"{judged_at - restarted_at:.1f}s",
                    "exit": f"{code} after SIGTERM in {took:.1f}s",
                    "longest /readyz 503 with /livez 200 after the restart": f"{stuck_live:.1f}s",
                    "stall_timeout_s": STALL_S,
                }
            )
            print(tally.line("broker kill + restart"))
            print(watch.timeline({"broker SIGKILL": killed_at, "broker restarted": restarted_at}))
    finally:
        broker.stop()
    assert alive, f"worker exited ({worker.returncode}) instead of riding out the restart"
    assert outage_ok, "/readyz stayed 200 while the broker was down"
    assert stuck_live < STALL_S + 15, "not ready for long, but /livez stayed 200"
    assert not missing and tally.lost == [], f"lost {tally.lost[:10]} after the restart"


def test_broker_gone_for_good_exits_4_after_the_retry_limit(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    retry_s = 10.0
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        topics = new_topics(bootstrap, partitions=1, prefix="gone")
        with Fleet(
            tiny_checkpoint, bootstrap, topics, tmp_path, broker_retry_timeout_s=retry_s
        ) as fleet:
            connected = fleet.spawn("connected")
            connected.wait_ready()
            with HealthWatch(connected) as watch:
                killed_at = time.monotonic()
                _kill_broker(broker)
                # A second worker started while the broker is already down.
                late = fleet.spawn("started-without-broker")
                exits: dict[str, tuple[int, float]] = {}
                deadline = time.monotonic() + retry_s + 45
                while len(exits) < 2 and time.monotonic() < deadline:
                    for w, origin in ((connected, killed_at), (late, late.started_at)):
                        if w.name not in exits and w.returncode is not None:
                            exits[w.name] = (w.returncode, time.monotonic() - origin)
                    time.sleep(0.1)
            code, connected_after = exits.get(connected.name, (None, float("nan")))
            late_code, late_after = exits.get(late.name, (None, float("nan")))
            lines = {
                w.name: [ln for ln in w.log().splitlines() if "broker unreachable" in ln]
                for w in (connected, late)
            }
            print(
                f"[broker gone] connected worker: exit {code} {connected_after:.1f}s after the "
                f"kill; started without broker: exit {late_code} after {late_after:.1f}s; "
                f"retry limit {retry_s:.0f}s; 'broker unreachable' lines "
                f"{ {k: len(v) for k, v in lines.items()} }"
            )
            print(watch.timeline({"broker SIGKILL": killed_at}))
            for w in (connected, late):
                if w.returncode not in (EXIT_BROKER, None):
                    print(f"--- {w.name} log tail ---\n{w.log_tail(12)}")
    assert any(ready == 503 for _, ready, _ in watch.samples), "/readyz never said not-ready"
    assert code == EXIT_BROKER, f"exit {code}:\n{connected.log_tail()}"
    assert connected_after >= retry_s - 1, "gave up before broker_retry_timeout_s"
    assert late_code == EXIT_BROKER, f"exit {late_code}:\n{late.log_tail()}"
    assert lines["connected"] and lines["started-without-broker"], "no 'broker unreachable' line"
    assert EXIT_OK not in (code, late_code)
