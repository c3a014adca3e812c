"""The worker measured through the real broker: peak events/s, latency under paced load, memory.

Each measurement gets fresh topics and a fresh consumer group, runs a real
:class:`~clipguard.consumer.worker.Worker` on a thread of this process (as the demo does), and
reads the verdict topic back on another thread, noting when every verdict arrives.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from clipguard.bench.mix import ImageMix
from clipguard.bench.probe import RssSampler, Span, rss_bytes
from clipguard.bench.stages import BenchError, fill_topic, load_producer
from clipguard.consumer.config import WorkerSettings
from clipguard.consumer.running import RunningWorker
from clipguard.consumer.worker import Worker
from clipguard.detector.engine import InferenceEngine, ServingEngine
from clipguard.devbroker.broker import create_topics

MB = 1024 * 1024
#: A latency level sends at least this many events, however slow the model (p99 of fewer
#: than 100 events is their maximum).
MIN_LATENCY_EVENTS = 30


@dataclass(frozen=True)
class BenchEnv:
    """Where the bench runs: the broker, its process (for CPU accounting), time limits."""

    bootstrap: str
    broker_pid: int | None
    timeout_s: float
    #: Worker settings for a scenario's topics and group: (input, output, dlq, group) -> settings.
    worker_settings: Callable[[str, str, str, str], WorkerSettings]


@dataclass(frozen=True)
class Topics:
    input: str
    output: str
    dlq: str
    group: str


def fresh_topics(env: BenchEnv, scenario: str, partitions: int = 3) -> Topics:
    tag = f"bench-{scenario}-{uuid.uuid4().hex[:8]}"
    topics = Topics(f"{tag}.uploads", f"{tag}.verdicts", f"{tag}.dlq", f"{tag}.group")
    create_topics(env.bootstrap, {topics.input: partitions, topics.output: 1, topics.dlq: 1})
    return topics


def produce_all(env: BenchEnv, topic: str, events: Sequence[tuple[bytes, bytes]]) -> None:
    """Put a backlog on the input topic and wait until the broker acknowledged all of it."""
    fill_topic(env.bootstrap, topic, events, env.timeout_s)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _prefix(event_id: str) -> str:
    return event_id.rsplit("-", 1)[0]


class Collector:
    """Reads a scenario's verdict and dead-letter topics on a thread, noting arrival times."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        self.topics = topics
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap.split(","),
            client_id="clipguard-bench-collector",
            enable_auto_commit=False,
            fetch_max_wait_ms=10,  # read latency must not hide inside a long fetch wait
        )
        partitions = [TopicPartition(topics.output, 0), TopicPartition(topics.dlq, 0)]
        self.consumer.assign(partitions)
        self.consumer.seek_to_beginning(*partitions)
        self.consumer.poll(timeout_ms=0)
        self.arrived: dict[str, float] = {}  # event_id -> perf_counter at read
        self.decided: dict[str, float] = {}  # event_id -> decided_at (epoch seconds)
        self.inside_ms: dict[str, float] = {}  # event_id -> the verdict's timings_ms.total
        self.per_prefix: Counter[str] = Counter()
        self.error_verdicts = 0
        self.dead_letters = 0
        self.first_arrival: float | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-collector", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            polled = self.consumer.poll(timeout_ms=50)
            now = time.perf_counter()
            if not polled:
                continue
            with self._cond:
                for tp, records in polled.items():
                    for record in records:
                        self._note(tp.topic, record.value, now)
                self._cond.notify_all()

    def _note(self, topic: str, value: bytes, now: float) -> None:
        if topic != self.topics.output:
            self.dead_letters += 1
            return
        verdict = json.loads(value)
        event_id = verdict["event_id"]
        if event_id in self.arrived:
            return  # a repeat (at-least-once): the first one counts
        if self.first_arrival is None:
            self.first_arrival = now
        self.arrived[event_id] = now
        self.decided[event_id] = datetime.fromisoformat(
            verdict["decided_at"].replace("Z", "+00:00")
        ).timestamp()
        self.inside_ms[event_id] = float((verdict.get("timings_ms") or {}).get("total", 0.0))
        self.per_prefix[_prefix(event_id)] += 1
        if verdict.get("error"):
            self.error_verdicts += 1

    def wait(self, prefix: str, count: int, timeout_s: float, alive: Callable[[], bool]) -> None:
        """Block until ``count`` verdicts of ``prefix`` arrived; BenchError on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.per_prefix[prefix] < count:
                left = deadline - time.monotonic()
                if left <= 0 or not alive():
                    why = "the worker stopped" if not alive() else f"{timeout_s:.0f}s passed"
                    raise BenchError(
                        f"{prefix}: {self.per_prefix[prefix]} of {count} verdicts before {why}"
                    )
                self._cond.wait(min(left, 0.5))

    def last_arrival(self, prefix: str) -> float:
        with self._cond:
            return max(t for e, t in self.arrived.items() if _prefix(e) == prefix)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.consumer.close()


class MetricsProbe:
    """The worker's own metrics (DESIGN.md "Metrics") read while it runs: where its time went.

    Samples the in-flight and paused gauges on a thread; histogram sums give the model's and
    the decoders' busy time and the batch sizes actually run.
    """

    def __init__(self, registry: Any, interval_s: float = 0.02) -> None:
        self.registry = registry
        self.interval_s = interval_s
        self.inflight: list[float] = []
        self.paused: list[bool] = []
        self._start = self._histograms()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-metrics", daemon=True)

    def _value(self, name: str) -> float:
        return self.registry.get_sample_value(name) or 0.0

    def _histograms(self) -> dict[str, float]:
        names = ("batch_size", "inference_seconds", "decode_seconds", "batch_wait_seconds")
        return {
            f"{name}_{part}": self._value(f"clipguard_{name}_{part}")
            for name in names
            for part in ("sum", "count")
        }

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.inflight.append(self._value("clipguard_inflight_events"))
            self.paused.append(self._value("clipguard_paused_partitions") > 0)

    def __enter__(self) -> MetricsProbe:
        self._start = self._histograms()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, seconds: float) -> dict[str, Any]:
        end = self._histograms()
        delta = {key: end[key] - self._start[key] for key in end}
        batches = delta["batch_size_count"]
        return {
            "batches": int(batches),
            "mean_batch_size": delta["batch_size_sum"] / batches if batches else 0.0,
            "mean_batch_wait_ms": 1000 * delta["batch_wait_seconds_sum"] / batches
            if batches
            else 0.0,
            "model_busy": delta["inference_seconds_sum"] / seconds,
            "decode_busy_cores": delta["decode_seconds_sum"] / seconds,
            "mean_inflight": statistics.fmean(self.inflight) if self.inflight else 0.0,
            "max_inflight": max(self.inflight, default=0.0),
            "paused_fraction": sum(self.paused) / len(self.paused) if self.paused else 0.0,
        }


@contextlib.contextmanager
def running_worker(
    settings: WorkerSettings, engine: ServingEngine, ready_timeout_s: float
) -> Iterator[RunningWorker]:
    """A real Worker serving on a thread; yields once it is warm and owns its partitions."""
    running = RunningWorker(Worker(settings, engine)).start()
    try:
        running.wait_ready(ready_timeout_s, poll_s=0.005)
    except Exception as exc:
        with contextlib.suppress(Exception):
            running.stop(30)
        raise BenchError(f"the worker never became ready: {exc}") from exc
    try:
        yield running
    finally:
        try:
            running.stop(120)
        except Exception as error:
            raise BenchError(f"the worker failed: {type(error).__name__}: {error}") from error


def _settings(env: BenchEnv, topics: Topics) -> WorkerSettings:
    return env.worker_settings(topics.input, topics.output, topics.dlq, topics.group)


def measure_peak(env: BenchEnv, engine: ServingEngine, mix: ImageMix, count: int) -> dict[str, Any]:
    """Drain a backlog of ``count`` events: events/s from readiness to the last verdict read."""
    topics = fresh_topics(env, "peak")
    produce_all(env, topics.input, mix.events("peak", count))
    collector = Collector(env.bootstrap, topics)
    try:
        with running_worker(_settings(env, topics), engine, env.timeout_s) as run:
            probe = MetricsProbe(run.worker.metrics.registry)
            with Span(env.broker_pid) as span, probe:
                collector.wait("peak", count, env.timeout_s, run.alive)
            last = collector.last_arrival("peak")
            first = collector.first_arrival or last
            ready = run.ready_at
    finally:
        collector.close()
    inside = probe.summary(last - ready)
    return drain_result(collector, count, ready, first, last, span.usage(), inside)


def drain_result(
    collector: Collector,
    count: int,
    ready: float,
    first: float,
    last: float,
    usage: dict[str, Any],
    inside: dict[str, Any],
) -> dict[str, Any]:
    """One drain's figures: events/s from readiness to the last verdict read back."""
    seconds = last - ready
    return {
        "events": count,
        "events_per_s": count / seconds,
        "seconds": seconds,
        "first_verdict_s": max(0.0, first - ready),
        "error_verdicts": collector.error_verdicts,
        "dead_letters": collector.dead_letters,
        **usage,
        "inside": inside,
    }


def _paced_phase(
    env: BenchEnv,
    topics: Topics,
    collector: Collector,
    run: RunningWorker,
    mix: ImageMix,
    load: float,
    rate: float,
    duration_s: float,
) -> dict[str, Any]:
    prefix = f"lat{round(load * 100)}"
    count = max(MIN_LATENCY_EVENTS, round(rate * duration_s))
    producer = load_producer(env.bootstrap, linger_ms=0)
    sent: dict[str, float] = {}
    sent_wall: dict[str, float] = {}
    try:
        with Span(env.broker_pid) as span:
            started = time.perf_counter()
            for index in range(count):
                delay = started + index / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                value = mix.event(prefix, index)
                event_id = f"{prefix}-{index:06d}"
                sent[event_id] = time.perf_counter()
                sent_wall[event_id] = time.time()
                producer.send(topics.input, key=event_id.encode(), value=value)
            last_sent = time.perf_counter()
            producer.flush()
            collector.wait(prefix, count, env.timeout_s, run.alive)
    finally:
        producer.close()
    read_ms = [1000 * (collector.arrived[e] - t) for e, t in sent.items()]
    decided_ms = [1000 * max(0.0, collector.decided[e] - t) for e, t in sent_wall.items()]
    inside_ms = [collector.inside_ms[e] for e in sent]
    return {
        "load": load,
        "target_events_per_s": rate,
        "offered_events_per_s": (count - 1) / (last_sent - started) if count > 1 else rate,
        "events": count,
        "p50_ms": statistics.median(read_ms),
        "p99_ms": percentile(read_ms, 0.99),
        "max_ms": max(read_ms),
        "decided_p50_ms": statistics.median(decided_ms),
        "decided_p99_ms": percentile(decided_ms, 0.99),
        # consumed -> verdict built, as the worker itself reports it in timings_ms.total
        "inside_worker_p50_ms": statistics.median(inside_ms),
        "inside_worker_p99_ms": percentile(inside_ms, 0.99),
        **span.usage(),
    }


def measure_latency(
    env: BenchEnv,
    engine: InferenceEngine,
    mix: ImageMix,
    peak_events_per_s: float,
    loads: Sequence[float],
    duration_s: float,
) -> list[dict[str, Any]]:
    """End-to-end latency (produce -> verdict read back) at fractions of the measured peak."""
    topics = fresh_topics(env, "latency")
    collector = Collector(env.bootstrap, topics)
    phases = []
    try:
        with running_worker(_settings(env, topics), engine, env.timeout_s) as run:
            for load in loads:
                rate = load * peak_events_per_s
                phases.append(
                    _paced_phase(env, topics, collector, run, mix, load, rate, duration_s)
                )
    finally:
        collector.close()
    return phases


def inflight_cap(settings: WorkerSettings) -> tuple[int, str]:
    """The worker's bound on events held at once, and the setting it comes from."""
    cap = getattr(settings, "max_inflight", None)
    if isinstance(cap, int) and cap > 0:
        return cap, "max_inflight"
    return settings.max_batch_size, "max_batch_size (the worker has no max_inflight setting)"


def _fetch_buffer_bytes(worker: Worker) -> int:
    """What the worker's consumer may buffer ahead of it (its ``fetch_max_bytes``)."""
    config = getattr(getattr(worker, "consumer", None), "config", None) or {}
    return int(config.get("fetch_max_bytes") or KafkaConsumer.DEFAULT_CONFIG["fetch_max_bytes"])


def memory_bound(
    settings: WorkerSettings, burst: ImageMix, event_bytes: int, model_size: int, fetch: int
) -> dict[str, Any]:
    """What a worker that respects its in-flight cap may add to RSS for this burst.

    Each in-flight event holds its message, the image bytes taken out of it and its model
    input; only the images being decoded right now hold full-size pixels (decode buffer plus
    the RGB copy); the consumer's fetcher buffers up to ``fetch`` bytes ahead.
    """
    cap, source = inflight_cap(settings)
    decoding = int(getattr(settings, "decode_workers", None) or cap)
    held = event_bytes + int(burst.mean_bytes) + 3 * model_size * model_size * 4
    pixels = 2 * 3 * burst.width * burst.height
    bound = fetch + cap * held + decoding * pixels
    return {
        "inflight_cap": cap,
        "inflight_cap_source": source,
        "decoding_at_once": decoding,
        "held_per_event_mb": held / MB,
        "pixels_per_decode_mb": pixels / MB,
        "fetch_buffer_mb": fetch / MB,
        "bound_mb": bound / MB,
    }


def measure_memory(
    env: BenchEnv, engine: InferenceEngine, burst: ImageMix, count: int
) -> dict[str, Any]:
    """Peak RSS of this process while the worker drains a burst of large images."""
    topics = fresh_topics(env, "burst")
    events = burst.events("burst", count)
    event_bytes = max(len(value) for _, value in events)
    produce_all(env, topics.input, events)
    del events
    gc.collect()
    collector = Collector(env.bootstrap, topics)
    settings = _settings(env, topics)
    baseline = rss_bytes()
    try:
        with RssSampler() as sampler, running_worker(settings, engine, env.timeout_s) as run:
            collector.wait("burst", count, env.timeout_s, run.alive)
            fetch = _fetch_buffer_bytes(run.worker)
            peak_inflight = getattr(run.worker, "peak_inflight", None)
    finally:
        collector.close()
    bound = memory_bound(settings, burst, event_bytes, engine.preprocess.image_size, fetch)
    growth = (sampler.peak - baseline) / MB
    return {
        "events": count,
        "width": burst.width,
        "height": burst.height,
        "mean_jpeg_bytes": round(burst.mean_bytes),
        "event_bytes": event_bytes,
        "baseline_rss_mb": baseline / MB,
        "peak_rss_mb": sampler.peak / MB,
        "growth_mb": growth,
        "peak_inflight": peak_inflight,
        **bound,
        "within_bound": growth <= bound["bound_mb"],
        "rss_samples": sampler.samples,
        "error_verdicts": collector.error_verdicts,
    }
