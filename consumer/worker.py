"""The worker loop: poll -> batch -> judge -> publish -> commit, commit always last.

Single-threaded: the model, the consumer and the commit live on one thread, so a
revocation can finish its partitions' work synchronously inside the rebalance callback.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.structs import OffsetAndMetadata

from clipguard.consumer.batching import Batcher, Pending
from clipguard.consumer.config import WorkerSettings
from clipguard.consumer.health import HealthState, MetricsServer
from clipguard.consumer.judge import Judge
from clipguard.consumer.metrics import WorkerMetrics
from clipguard.consumer.offsets import OffsetTracker
from clipguard.consumer.outcomes import Outcome
from clipguard.consumer.publish import Publisher
from clipguard.consumer.records import RecordRef
from clipguard.consumer.sources import ImageSources
from clipguard.detector.decode import DecodeLimits
from clipguard.detector.engine import EngineConfig, InferenceEngine
from clipguard.detector.policy import Policy

log = logging.getLogger(__name__)

OutcomeListener = Callable[[Outcome], None]


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
        max_poll_records=settings.max_poll_records,
        max_poll_interval_ms=settings.max_poll_interval_ms,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        partition_assignment_strategy=strategies,
    )


def make_producer(settings: WorkerSettings) -> KafkaProducer:
    return KafkaProducer(
        **settings.client_kwargs(),
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_request_size=max(1_048_576, settings.max_image_bytes * 2),
    )


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
        self.batcher = Batcher(settings.max_batch_size, settings.max_batch_wait_ms / 1000)
        self.offsets = OffsetTracker()
        limits = DecodeLimits(
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            formats=settings.image_formats,
        )
        self.judge = Judge(
            engine,
            self.policy,
            limits,
            ImageSources(settings.max_image_bytes, settings.file_root),
            self.metrics,
            clock,
        )
        self.consumer: KafkaConsumer | None = None
        self.publisher: Publisher | None = None
        self.metrics_server: MetricsServer | None = None
        self.assigned: set[tuple[str, int]] = set()

    # -- lifecycle -----------------------------------------------------------------------

    def start_metrics(self) -> MetricsServer | None:
        if not self.settings.metrics_enabled:
            return None
        self.metrics_server = MetricsServer(
            self.metrics.registry,
            self.health,
            self.settings.metrics_host,
            self.settings.metrics_port,
        ).start()
        return self.metrics_server

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set, then drain, publish and commit what was consumed."""
        if self.metrics_server is None:
            self.start_metrics()
        self.engine.warm_up()
        self.health.model_ready = True
        self.metrics.model_info.labels(
            name=self.engine.manifest.model_name,
            version=self.engine.manifest.version,
            device=str(self.engine.device),
            dtype=str(self.engine.dtype).removeprefix("torch."),
        ).set(1)
        self.consumer = make_consumer(self.settings)
        producer = make_producer(self.settings)
        self.publisher = Publisher(
            producer,
            self.settings.output_topic,
            self.settings.dlq_topic,
            self.settings.produce_timeout_s,
        )
        try:
            self.consumer.subscribe([self.settings.input_topic], listener=self)
            while not stop.is_set():
                self.step()
            self._drain()
        finally:
            self.metrics.ready.set(0)
            self.health.model_ready = False
            try:
                self.consumer.close(autocommit=False)
            finally:
                producer.close(timeout=self.settings.produce_timeout_s)
                if self.metrics_server is not None:
                    self.metrics_server.stop()

    def step(self) -> None:
        """One turn of the loop: poll for what fits, then run every batch that is due."""
        assert self.consumer is not None
        self.health.beat()
        now = self.clock()
        wait_s = min(self.batcher.time_left(now), 0.1)
        room = max(1, self.settings.max_batch_size - len(self.batcher))
        polled = self.consumer.poll(timeout_ms=max(0, int(wait_s * 1000)), max_records=room)
        received_at = self.clock()
        for records in polled.values():
            for raw in records:
                record = RecordRef.from_kafka(raw)
                self.batcher.add(Pending(record, received_at))
                self.offsets.consumed((record.topic, record.partition), record.offset)
                self.metrics.events_consumed.labels(topic=record.topic).inc()
        self.metrics.inflight_events.set(self.offsets.inflight())
        while self.batcher.ready(self.clock()):
            self._process(self.batcher.take())
        self.metrics.ready.set(1 if self.health.ready() else 0)

    def _drain(self) -> None:
        while len(self.batcher):
            self._process(self.batcher.take())

    # -- the chain: judge -> publish -> commit ------------------------------------------

    def _process(self, batch: list[Pending]) -> None:
        if not batch:
            return
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_wait_seconds.observe(max(0.0, self.clock() - batch[0].received_at))
        outcomes = self.judge(batch)
        assert self.publisher is not None
        self.publisher.publish(outcomes)
        for outcome in outcomes:
            self._count(outcome)
            record = outcome.record
            self.offsets.acknowledged((record.topic, record.partition), record.offset)
            if self.on_outcome is not None:
                self.on_outcome(outcome)
        self._commit()

    def _count(self, outcome: Outcome) -> None:
        if outcome.verdict is not None:
            verdict = outcome.verdict
            self.metrics.verdicts.labels(
                decision=verdict.decision, label=verdict.label or "none"
            ).inc()
            if verdict.ai_score is not None:
                self.metrics.ai_score.observe(verdict.ai_score)
            if outcome.event_time is not None:
                elapsed = time.time() - outcome.event_time
                self.metrics.end_to_end_seconds.observe(max(0.0, elapsed))
        if outcome.dead_letter is not None:
            self.metrics.dead_letters.labels(
                stage=outcome.dead_letter.stage, reason=outcome.dead_letter.reason
            ).inc()

    def _commit(self) -> None:
        assert self.consumer is not None
        positions = self.offsets.committable()
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
        self.offsets.committed(positions)
        self.metrics.inflight_events.set(self.offsets.inflight())
        self._update_lag(positions)

    def _update_lag(self, positions: dict[tuple[str, int], int]) -> None:
        assert self.consumer is not None
        for (topic, partition), offset in positions.items():
            highwater = self.consumer.highwater(TopicPartition(topic, partition))
            if highwater is not None:
                self.metrics.consumer_lag.labels(partition=str(partition)).set(
                    max(0, highwater - offset)
                )

    # -- rebalances ------------------------------------------------------------------------

    def on_partitions_revoked(self, revoked: Any) -> None:
        """Finish and commit the revoked partitions' waiting work before letting go."""
        gone = {(tp.topic, tp.partition) for tp in revoked}
        self.metrics.rebalances.labels(event="revoked").inc()
        waiting = self.batcher.take_where(lambda p: (p.record.topic, p.record.partition) in gone)
        for start in range(0, len(waiting), self.settings.max_batch_size):
            self._process(waiting[start : start + self.settings.max_batch_size])
        self.offsets.forget(gone)
        self._set_assigned(self.assigned - gone)

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.metrics.rebalances.labels(event="assigned").inc()
        self._set_assigned(self.assigned | {(tp.topic, tp.partition) for tp in assigned})

    def on_partitions_lost(self, lost: Any) -> None:
        """Lost, not revoked: someone else may own them already, so drop, never commit."""
        gone = {(tp.topic, tp.partition) for tp in lost}
        self.metrics.rebalances.labels(event="lost").inc()
        self.batcher.take_where(lambda p: (p.record.topic, p.record.partition) in gone)
        self.offsets.forget(gone)
        self._set_assigned(self.assigned - gone)

    def _set_assigned(self, assigned: set[tuple[str, int]]) -> None:
        for _, partition in self.assigned - assigned:
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(str(partition))
        self.assigned = assigned
        self.metrics.assigned_partitions.set(len(assigned))
        self.health.partitions_assigned = bool(assigned)


def engine_from_settings(settings: WorkerSettings) -> InferenceEngine:
    return InferenceEngine.from_checkpoint(
        settings.checkpoint,
        EngineConfig(
            device=settings.device,
            dtype=settings.dtype,
            max_batch_size=settings.max_batch_size,
            threads=settings.torch_threads,
        ),
    )
