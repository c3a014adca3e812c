"""The worker drained in a process of its own, as ``clipguard serve`` runs it.

In the in-process measurement (:func:`~clipguard.bench.worker.measure_peak`) the bench's own
verdict reader and metrics sampler are Python threads of the worker's process: they take
CPU and, between every two torch calls, the interpreter lock from the model's thread. A
deployed worker has neither. Here the worker and its engine are built in a spawned child from
the same :class:`WorkerSettings` (``engine_from_settings``, exactly as ``serve`` does); the
reader stays in the bench process. The child reports when it became ready (``perf_counter``
is the system's monotonic clock on Linux, so both processes read the same time line), then
its own metrics and CPU time over the drain.

Parent and child talk over a pipe; every wait is bounded, and a child that dies or hangs is
reported as a :class:`BenchError` and killed, never waited on forever.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from multiprocessing.connection import Connection
from typing import Any

from clipguard.bench.mix import ImageMix
from clipguard.bench.probe import process_cpu_seconds
from clipguard.bench.stages import BenchError
from clipguard.bench.worker import (
    BenchEnv,
    Collector,
    MetricsProbe,
    drain_result,
    fresh_topics,
    produce_all,
)
from clipguard.consumer.config import WorkerSettings

#: The child samples its gauges this often: a deployed worker is not scraped every 20 ms.
CHILD_SAMPLE_S = 0.2
STOP_TIMEOUT_S = 120.0


def _child(settings: WorkerSettings, conn: Connection, ready_timeout_s: float) -> None:
    """The worker's process: build, serve, report, stop on the parent's word."""
    from clipguard.consumer.running import RunningWorker
    from clipguard.consumer.worker import Worker, engine_from_settings

    try:
        running = RunningWorker(Worker(settings, engine_from_settings(settings))).start()
        running.wait_ready(ready_timeout_s, poll_s=0.005)
    except Exception as exc:  # noqa: BLE001 - told to the parent, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    probe = MetricsProbe(running.worker.metrics.registry, interval_s=CHILD_SAMPLE_S)
    with probe:
        cpu_at_ready = time.process_time()
        conn.send(("ready", running.ready_at))
        message = conn.recv()  # ("summary", seconds) once the last verdict was read
    cpu = time.process_time() - cpu_at_ready
    conn.send(("summary", probe.summary(message[1]), cpu))
    conn.recv()  # ("stop",)
    try:
        running.stop(STOP_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001
        conn.send(("stopped", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("stopped", None))


def _receive(conn: Connection, timeout_s: float, waiting_for: str) -> tuple[Any, ...]:
    if not conn.poll(timeout_s):
        raise BenchError(f"the worker process sent no {waiting_for} within {timeout_s:.0f}s")
    try:
        message = conn.recv()
    except EOFError:
        raise BenchError(f"the worker process exited before its {waiting_for}") from None
    if message[0] == "error":
        raise BenchError(f"the worker process failed: {message[1]}")
    return message


def measure_peak_process(
    env: BenchEnv, settings: WorkerSettings, mix: ImageMix, count: int
) -> dict[str, Any]:
    """Drain a backlog of ``count`` events with the worker in a spawned process: events/s
    from its readiness to the last verdict read here, its metrics and its CPU."""
    topics = fresh_topics(env, "serve")
    produce_all(env, topics.input, mix.events("serve", count))
    settings = settings.model_copy(
        update={
            "input_topic": topics.input,
            "output_topic": topics.output,
            "dlq_topic": topics.dlq,
            "group_id": topics.group,
        }
    )
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(
        target=_child, args=(settings, child, env.timeout_s), name="clipguard-bench-worker"
    )
    collector = Collector(env.bootstrap, topics)
    process.start()
    child.close()
    try:
        _, ready = _receive(parent, env.timeout_s, "readiness")
        broker0 = process_cpu_seconds(env.broker_pid)
        collector.wait("serve", count, env.timeout_s, process.is_alive)
        last = collector.last_arrival("serve")
        seconds = last - ready
        broker1 = process_cpu_seconds(env.broker_pid)
        parent.send(("summary", seconds))
        _, inside, cpu = _receive(parent, 30, "metrics")
        parent.send(("stop",))
        _, error = _receive(parent, STOP_TIMEOUT_S + 10, "stop")
        if error:
            raise BenchError(f"the worker process failed: {error}")
        process.join(30)
    finally:
        collector.close()
        if process.is_alive():
            with contextlib.suppress(Exception):
                process.kill()
            process.join(10)
        parent.close()
    first = collector.first_arrival or last
    usage: dict[str, Any] = {"process_cpu_cores": round(cpu / seconds, 2)}
    if broker0 is not None and broker1 is not None:
        usage["broker_cpu_cores"] = round((broker1 - broker0) / seconds, 2)
    return drain_result(collector, count, ready, first, last, usage, inside)
