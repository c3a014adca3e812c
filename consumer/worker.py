"""The worker: poll -> decode pool -> batching inference thread -> publish -> commit.

Three kinds of threads, each owning one thing:

- the consumer thread owns the ``KafkaConsumer``: it polls (so ``max_poll_interval_ms`` is
  never exceeded by a slow batch), submits decodes, commits and applies backpressure;
- the decode pool turns records into model-ready pixels (never on the inference thread);
- the inference thread owns the model: it closes batches at ``max_batch_size`` events or
  ``max_batch_wait_ms`` after the first one, runs them, and publishes the outcomes.

Records travel in consumption order through one FIFO, so batches are per-partition runs
and commits (or transactions) only ever move forward. An offset is committed after the
broker acknowledged its verdict or dead letter; commit is always the last step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.structs import OffsetAndMetadata

from clipguard.consumer.batching import Batcher, Pending
from clipguard.consumer.config import WorkerSettings
from clipguard.consumer.deadletter import DeadLetterBrake, DeadLetterLimit
from clipguard.consumer.health import HealthState, MetricsServer
from clipguard.consumer.judge import Decoded, Judge
from clipguard.consumer.metrics import WorkerMetrics
from clipguard.consumer.offsets import OffsetTracker, TopicPartitionKey
from clipguard.consumer.outcomes import Outcome
from clipguard.consumer.publish import Publisher, PublishError
from clipguard.consumer.records import RecordRef
from clipguard.consumer.sources import ImageSources
from clipguard.detector.decode import DecodeLimits
from clipguard.detector.engine import EngineConfig, InferenceEngine
from clipguard.detector.policy import Policy

log = logging.getLogger(__name__)

OutcomeListener = Callable[[Outcome], None]
POLL_TIMEOUT_MS = 100


def build_policy(settings: WorkerSettings, engine: InferenceEngine) -> Policy:
    """Thresholds from the settings where given, else from the checkpoint."""
    stored = engine.manifest.policy
    return Policy(
        review_at=settings.review_at if settings.review_at is not None else stored.review_at,
        block_at=settings.block_at if settings.block_at is not None else stored.block_at,
    )


def make_consumer(settings: WorkerSettings) -> KafkaConsumer:
    strategies: tuple[Any, ...] = (
        (CooperativeStickyAssignor,)
        if settings.partition_assignment == "cooperative-sticky"
        else (RangePartitionAssignor,)
    )
    return KafkaConsumer(
        **settings.client_kwargs(),
        group_id=settings.group_id,
        group_instance_id=settings.group_instance_id,
        enable_auto_commit=False,
        auto_offset_reset=settings.auto_offset_reset,
        isolation_level="read_committed",
        max_poll_records=settings.max_poll_records,
        max_poll_interval_ms=settings.max_poll_interval_ms,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        partition_assignment_strategy=strategies,
        # Bound what the fetcher buffers ahead of us: memory stays proportional to the cap.
        max_partition_fetch_bytes=max(1_048_576, settings.max_image_bytes * 2),
        fetch_max_bytes=max(8 * 1_048_576, settings.max_image_bytes * 4),
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
    )


def make_producer(settings: WorkerSettings) -> KafkaProducer:
    extra: dict[str, Any] = {}
    if settings.exactly_once:
        extra["transactional_id"] = settings.transactional_id or (
            f"{settings.group_id}-{settings.group_instance_id or uuid.uuid4().hex[:12]}"
        )
    return KafkaProducer(
        **settings.client_kwargs(),
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_request_size=max(1_048_576, settings.max_image_bytes * 2),
        **extra,
    )


def default_torch_threads(device: str, threads: int | None = None) -> int | None:
    """On the CPU, leave a core to polling and decoding: two OpenMP threads on two shared
    cores next to the decode pool stall far more than they gain (see docs/bench.md)."""
    if threads is not None:
        return threads
    if device in ("auto", "cpu") and not torch.cuda.is_available():
        return max(1, (os.cpu_count() or 1) - 1)
    return None


def engine_from_settings(settings: WorkerSettings) -> InferenceEngine:
    return InferenceEngine.from_checkpoint(
        settings.checkpoint,
        EngineConfig(
            device=settings.device,
            dtype=settings.dtype,
            max_batch_size=settings.max_batch_size,
            threads=default_torch_threads(settings.device, settings.torch_threads),
            compile=settings.torch_compile,
        ),
    )


@dataclass(frozen=True)
class InFlight:
    """A record handed to the decode pool, in consumption order."""

    pending: Pending
    decoded: Future[Decoded]


_STOP = object()


class Worker(ConsumerRebalanceListener):
    """One consumer-group member judging uploads until ``stop`` is set."""

    def __init__(
        self,
        settings: WorkerSettings,
        engine: InferenceEngine,
        metrics: WorkerMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_outcome: OutcomeListener | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics or WorkerMetrics()
        self.clock = clock
        self.on_outcome = on_outcome
        self.policy = build_policy(settings, engine)
        self.health = HealthState(settings.max_poll_interval_ms / 2000, clock)
        # Computed at scrape time, so a stuck loop cannot keep reporting its last value.
        self.metrics.ready.set_function(lambda: 1.0 if self.health.ready() else 0.0)
        self.judge = Judge(
            engine,
            self.policy,
            DecodeLimits(
                max_bytes=settings.max_image_bytes,
                max_pixels=settings.max_image_pixels,
                formats=settings.image_formats,
            ),
            ImageSources.from_settings(settings),
            self.metrics,
            clock,
        )
        self.brake = DeadLetterBrake(
            DeadLetterLimit(
                max_consecutive=settings.dlq_max_consecutive,
                max_ratio=settings.dlq_max_ratio,
                window=settings.dlq_window,
            )
        )
        self.offsets = OffsetTracker()
        self._offsets_lock = threading.Lock()
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._failure: BaseException | None = None
        self.consumer: KafkaConsumer | None = None
        self.publisher: Publisher | None = None
        self.metrics_server: MetricsServer | None = None
        self.assigned: set[TopicPartitionKey] = set()
        self.paused = False
        self.peak_inflight = 0
        self._last_consumed: dict[TopicPartitionKey, int] = {}
        self._next_lag_update = 0.0

    # -- lifecycle -----------------------------------------------------------------------

    def start_metrics(self) -> MetricsServer | None:
        if not self.settings.metrics_enabled or self.metrics_server is not None:
            return self.metrics_server
        self.metrics_server = MetricsServer(
            self.metrics.registry,
            self.health,
            self.settings.metrics_host,
            self.settings.metrics_port,
        ).start()
        return self.metrics_server

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set, then drain, publish and commit what was consumed.

        Raises what stopped the worker early (a publish failure, the dead-letter brake).
        """
        self.start_metrics()
        self.engine.warm_up()
        self.health.model_ready = True
        self.metrics.model_info.labels(
            name=self.engine.manifest.model_name,
            version=self.engine.manifest.version,
            device=str(self.engine.device),
            dtype=str(self.engine.dtype).removeprefix("torch."),
        ).set(1)
        producer = make_producer(self.settings)
        if self.settings.exactly_once:
            producer.init_transactions()
        self.publisher = Publisher(
            producer,
            self.settings.output_topic,
            self.settings.dlq_topic,
            self.settings.produce_timeout_s,
        )
        self.consumer = make_consumer(self.settings)
        decode_pool = ThreadPoolExecutor(
            self.settings.decode_workers, thread_name_prefix="clipguard-decode"
        )
        inference = threading.Thread(
            target=self._inference_loop, name="clipguard-inference", daemon=True
        )
        inference.start()
        try:
            self.consumer.subscribe([self.settings.input_topic], listener=self)
            while not stop.is_set() and self._failure is None:
                self._poll(decode_pool)
            self._drain()
        finally:
            self.health.model_ready = False
            self._inbox.put(_STOP)
            inference.join(timeout=self.settings.drain_timeout_s)
            decode_pool.shutdown(wait=False, cancel_futures=True)
            try:
                self.consumer.close(autocommit=False)
            finally:
                producer.close(timeout=self.settings.produce_timeout_s)
                if self.metrics_server is not None:
                    self.metrics_server.stop()
        if self._failure is not None:
            raise self._failure

    # -- consumer thread -------------------------------------------------------------------

    def inflight(self) -> int:
        with self._offsets_lock:
            return self.offsets.inflight()

    def _poll(self, decode_pool: ThreadPoolExecutor) -> None:
        assert self.consumer is not None
        self.health.beat()
        room = self.settings.max_inflight - self.inflight()
        polled = self.consumer.poll(timeout_ms=POLL_TIMEOUT_MS, max_records=max(1, room))
        received_at = self.clock()
        for records in polled.values():
            for raw in records:
                record = RecordRef.from_kafka(raw)
                key = (record.topic, record.partition)
                with self._offsets_lock:
                    self.offsets.consumed(key, record.offset)
                self._last_consumed[key] = record.offset
                self.metrics.events_consumed.labels(topic=record.topic).inc()
                pending = Pending(record, received_at)
                self._inbox.put(InFlight(pending, decode_pool.submit(self.judge.prepare, pending)))
        inflight = self.inflight()
        self.peak_inflight = max(self.peak_inflight, inflight)
        self.metrics.inflight_events.set(inflight)
        if not self.settings.exactly_once:
            self._commit()
        self._apply_backpressure(inflight)
        self._update_lag(force=bool(polled))

    def _apply_backpressure(self, inflight: int) -> None:
        """Pause every assigned partition above the cap, resume at half: keep polling."""
        assert self.consumer is not None
        cap = self.settings.max_inflight
        if not self.paused and inflight >= cap:
            partitions = list(self.consumer.assignment())
            self.consumer.pause(*partitions)
            self.paused = True
            self.metrics.paused_partitions.set(len(partitions))
        elif self.paused and inflight <= cap // 2:
            self.consumer.resume(*self.consumer.paused())
            self.paused = False
            self.metrics.paused_partitions.set(0)

    def _commit(self, only: set[TopicPartitionKey] | None = None) -> None:
        """Commit acknowledged offsets (at-least-once). Consumer thread only."""
        assert self.consumer is not None
        with self._offsets_lock:
            positions = self.offsets.committable()
        if only is not None:
            positions = {tp: offset for tp, offset in positions.items() if tp in only}
        if not positions:
            return
        offsets = {
            TopicPartition(topic, partition): OffsetAndMetadata(offset, "", -1)
            for (topic, partition), offset in positions.items()
        }
        try:
            self.consumer.commit(offsets)
        except Exception:
            self.metrics.commits.labels(result="failure").inc()
            raise
        self.metrics.commits.labels(result="success").inc()
        with self._offsets_lock:
            self.offsets.committed(positions)

    def _update_lag(self, force: bool = False) -> None:
        """Records behind the high watermark the broker reported with our last fetch.

        ``highwater`` is what the last fetch response said (no request), so this is cheap.
        """
        now = self.clock()
        if (now < self._next_lag_update and not force) or self.consumer is None:
            return
        self._next_lag_update = now + 1.0
        for (topic, partition), offset in self._last_consumed.items():
            if (topic, partition) not in self.assigned:
                continue
            highwater = self.consumer.highwater(TopicPartition(topic, partition))
            if highwater is not None:
                lag = max(0, highwater - offset - 1)
                self.metrics.consumer_lag.labels(partition=str(partition)).set(lag)

    def _drain(self) -> None:
        """Stop taking records, let every consumed one finish and commit, within a deadline."""
        assert self.consumer is not None
        with contextlib.suppress(Exception):
            self.consumer.pause(*self.consumer.assignment())
        deadline = self.clock() + self.settings.drain_timeout_s
        while self.inflight() and self._failure is None and self.clock() < deadline:
            self.consumer.poll(timeout_ms=50)
            if not self.settings.exactly_once:
                self._commit()
        if not self.settings.exactly_once:
            self._commit()
        left = self.inflight()
        if left:
            log.warning("stopped with %d events uncommitted; they will be redelivered", left)

    # -- inference thread ------------------------------------------------------------------

    def _next_batch(self) -> list[InFlight] | None:
        """Block for the first event, then gather until the batch is full or its wait is up.

        Whatever is already queued joins the batch before the deadline is looked at: under a
        backlog the first event's wait has long passed, and closing on it alone would run
        batches of one.
        """
        batcher = Batcher(self.settings.max_batch_size, self.settings.max_batch_wait_ms / 1000)
        items: list[InFlight] = []
        while len(items) < batcher.max_size:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                if items and batcher.ready(self.clock()):
                    return items
                timeout = 0.5 if not items else batcher.time_left(self.clock())
                try:
                    item = self._inbox.get(timeout=max(0.0005, timeout))
                except queue.Empty:
                    if items:
                        return items
                    self.health.beat()
                    continue
            if item is _STOP:
                self._inbox.put(_STOP)  # leave the sentinel for the loop's own check
                return items or None
            items.append(item)
            batcher.add(item.pending)
        return items

    def _inference_loop(self) -> None:
        try:
            while self._failure is None:
                batch = self._next_batch()
                if batch is None:
                    return
                self._run_batch(batch)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread to raise
            log.error("worker stopping: %s: %s", type(exc).__name__, exc)
            self._failure = exc

    def _run_batch(self, batch: list[InFlight]) -> None:
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_wait_seconds.observe(
            max(0.0, self.clock() - batch[0].pending.received_at)
        )
        decoded = [item.decoded.result() for item in batch]
        outcomes = self.judge.finish(decoded)
        if self.settings.exactly_once:
            self._publish_transaction(outcomes)
        else:
            self._publish(outcomes)
        for outcome in outcomes:
            self._count(outcome)
            if self.on_outcome is not None:
                self.on_outcome(outcome)
            self.brake.record(outcome.dead_letter is not None)

    def _publish(self, outcomes: Iterable[Outcome]) -> None:
        """Send; each record is acknowledged when all of its outputs are (producer thread)."""
        assert self.publisher is not None
        for outcome in outcomes:
            futures = self.publisher.send([outcome])
            remaining = [len(futures)]
            key = (outcome.record.topic, outcome.record.partition)
            offset = outcome.record.offset
            lock = threading.Lock()

            def on_success(
                _: Any,
                key: TopicPartitionKey = key,
                offset: int = offset,
                remaining: list[int] = remaining,
                lock: threading.Lock = lock,
            ) -> None:
                with lock:
                    remaining[0] -= 1
                    done = remaining[0] == 0
                if done:
                    with self._offsets_lock:
                        self.offsets.acknowledged(key, offset)

            def on_error(exc: BaseException) -> None:
                self.metrics.errors.labels(stage="publish").inc()
                self._failure = PublishError(f"output not acknowledged: {exc!r}")

            for future in futures:
                future.add_callback(on_success)
                future.add_errback(on_error)

    def _publish_transaction(self, outcomes: list[Outcome]) -> None:
        """Outputs and input offsets in one transaction: read_committed sees each event once."""
        assert self.publisher is not None and self.consumer is not None
        producer = self.publisher.producer
        positions: dict[TopicPartitionKey, int] = {}
        for outcome in outcomes:
            key = (outcome.record.topic, outcome.record.partition)
            positions[key] = max(positions.get(key, 0), outcome.record.offset + 1)
        producer.begin_transaction()
        try:
            self.publisher.send(outcomes)
            producer.send_offsets_to_transaction(
                {
                    TopicPartition(t, p): OffsetAndMetadata(o, "", -1)
                    for (t, p), o in positions.items()
                },
                self.consumer.group_metadata(),
            )
            producer.commit_transaction()
        except Exception as exc:
            self.metrics.commits.labels(result="failure").inc()
            with contextlib.suppress(Exception):
                producer.abort_transaction()
            raise PublishError(f"transaction failed: {type(exc).__name__}: {exc}") from exc
        self.metrics.commits.labels(result="success").inc()
        with self._offsets_lock:
            for outcome in outcomes:
                key = (outcome.record.topic, outcome.record.partition)
                self.offsets.acknowledged(key, outcome.record.offset)
            self.offsets.committed(self.offsets.committable())

    def _count(self, outcome: Outcome) -> None:
        if outcome.verdict is not None:
            verdict = outcome.verdict
            self.metrics.verdicts.labels(
                decision=verdict.decision, label=verdict.label or "none"
            ).inc()
            if verdict.ai_score is not None:
                self.metrics.ai_score.observe(verdict.ai_score)
            if outcome.event_time is not None:
                self.metrics.end_to_end_seconds.observe(max(0.0, time.time() - outcome.event_time))
        if outcome.dead_letter is not None:
            self.metrics.dead_letters.labels(
                stage=outcome.dead_letter.stage, reason=outcome.dead_letter.reason
            ).inc()

    # -- rebalances (called on the consumer thread, inside poll) ------------------------------

    def _wait_for(self, partitions: set[TopicPartitionKey], timeout_s: float) -> None:
        deadline = self.clock() + timeout_s
        while self._failure is None and self.clock() < deadline:
            with self._offsets_lock:
                busy = any(self.offsets.outstanding(tp) for tp in partitions)
            if not busy:
                return
            time.sleep(0.01)

    def on_partitions_revoked(self, revoked: Any) -> None:
        """Finish and commit the revoked partitions' in-flight work before letting go."""
        gone = {(tp.topic, tp.partition) for tp in revoked}
        if gone:
            self.metrics.rebalances.labels(event="revoked").inc()
            self._wait_for(gone, self.settings.max_poll_interval_ms / 2000)
            if not self.settings.exactly_once:
                with contextlib.suppress(Exception):
                    self._commit(only=gone)
        self._forget(gone)

    def on_partitions_assigned(self, assigned: Any) -> None:
        if assigned:
            self.metrics.rebalances.labels(event="assigned").inc()
        self._set_assigned(self.assigned | {(tp.topic, tp.partition) for tp in assigned})
        if self.paused and self.consumer is not None:  # new partitions obey the pause too
            self.consumer.pause(*self.consumer.assignment())

    def on_partitions_lost(self, lost: Any) -> None:
        """Lost, not revoked: someone else may own them already, so drop, never commit."""
        if lost:
            self.metrics.rebalances.labels(event="lost").inc()
        self._forget({(tp.topic, tp.partition) for tp in lost})

    def _forget(self, gone: set[TopicPartitionKey]) -> None:
        with self._offsets_lock:
            self.offsets.forget(gone)
        for key in gone:
            self._last_consumed.pop(key, None)
        self._set_assigned(self.assigned - gone)

    def _set_assigned(self, assigned: set[TopicPartitionKey]) -> None:
        for _, partition in self.assigned - assigned:
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(str(partition))
        self.assigned = assigned
        self.metrics.assigned_partitions.set(len(assigned))
        self.health.partitions_assigned = bool(assigned)
