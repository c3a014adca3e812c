"""The worker: a chain of small stages, composed here.

    consumer thread        prepare pools             inference thread       producer thread
    poll -> track ----> parse / fetch / decode ----> batch -> model -----> publish -> ack
      ^                                                                               |
      +------------------------- commit (the one committer, last) <------------------+

- the consumer thread owns the ``KafkaConsumer``: it polls (so ``max_poll_interval_ms`` is
  never exceeded by a slow batch), records each offset, hands the record to the prepare
  stage, commits, applies backpressure and watches the broker;
- the prepare stage (:mod:`~clipguard.consumer.prepare`) parses and decodes on a CPU pool
  and fetches URLs on an I/O pool, delivering each record when it is ready;
- the inference stage (:mod:`~clipguard.consumer.infer`) owns the model and batches what is
  ready, not the head of the queue, so a slow upload holds back only itself;
- the publisher (:mod:`~clipguard.consumer.publish`) sizes and sends outputs; the producer's
  acknowledgement marks the input offset done in the :class:`OffsetTracker`;
- the committer (:mod:`~clipguard.consumer.committer`) is the only place offsets move: the
  contiguous acknowledged prefix, with an offset commit or inside a transaction.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import KafkaError
from kafka.structs import MemberState

from clipguard.consumer.batching import Pending
from clipguard.consumer.brokerprobe import BrokerProbe
from clipguard.consumer.committer import Committer, OffsetCommitter, TransactionCommitter
from clipguard.consumer.config import WorkerSettings
from clipguard.consumer.deadletter import DeadLetterBrake, DeadLetterLimit
from clipguard.consumer.device_decode import jpeg_decoder
from clipguard.consumer.errors import BrokerUnavailableError
from clipguard.consumer.fit import OutputFitter
from clipguard.consumer.health import HealthState, MetricsServer
from clipguard.consumer.infer import InferenceStage
from clipguard.consumer.judge import Decoded, Judge
from clipguard.consumer.metrics import WorkerMetrics
from clipguard.consumer.offsets import OffsetTracker, TopicPartitionKey
from clipguard.consumer.ordering import InOrderRelease
from clipguard.consumer.outcomes import Outcome
from clipguard.consumer.prepare import PrepareStage
from clipguard.consumer.publish import Publisher
from clipguard.consumer.rebalance import Rebalancer
from clipguard.consumer.records import RecordRef
from clipguard.consumer.sources import ImageSources
from clipguard.detector.decode import DecodeLimits
from clipguard.detector.engine import EngineConfig, InferenceEngine, ServingEngine
from clipguard.detector.policy import Policy
from clipguard.detector.process_engine import ProcessEngine
from clipguard.provenance import ProvenanceReader

log = logging.getLogger(__name__)

OutcomeListener = Callable[[Outcome], None]
POLL_TIMEOUT_MS = 100
LOOP = "consumer"


def build_policy(settings: WorkerSettings, engine: ServingEngine) -> Policy:
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


def producer_max_request_size(settings: WorkerSettings) -> int:
    return max(1_048_576, settings.max_image_bytes * 2)


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
        max_request_size=producer_max_request_size(settings),
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


def engine_from_settings(settings: WorkerSettings) -> ServingEngine:
    """The checkpoint's engine, in this process or (``model_process``) in a child of its own."""
    config = EngineConfig(
        device=settings.device,
        dtype=settings.dtype,
        max_batch_size=settings.max_batch_size,
        threads=default_torch_threads(settings.device, settings.torch_threads),
        compile=settings.torch_compile,
        views=settings.views,
        aggregate=settings.view_aggregation,
    )
    if settings.model_process:
        return ProcessEngine(partial(InferenceEngine.from_checkpoint, settings.checkpoint, config))
    return InferenceEngine.from_checkpoint(settings.checkpoint, config)


class Worker:
    """One consumer-group member judging uploads until ``stop`` is set."""

    def __init__(
        self,
        settings: WorkerSettings,
        engine: ServingEngine,
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
        self.health = HealthState(
            settings.stall_timeout_s,
            clock,
            assignment_timeout_s=settings.assignment_timeout_s,
            broker_stale_after_s=settings.broker_stale_after_s,
            loops=(LOOP,),
        )
        # Computed at scrape time, so a stuck loop cannot keep reporting its last value.
        self.metrics.ready.set_function(lambda: 1.0 if self.health.ready() else 0.0)
        limits = DecodeLimits(
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            formats=settings.image_formats,
        )
        self.judge = Judge(
            engine,
            self.policy,
            limits,
            ImageSources.from_settings(settings),
            self.metrics,
            clock,
            provenance=ProvenanceReader(settings.provenance())
            if settings.provenance_enabled
            else None,
            jpeg_decoder=jpeg_decoder(settings, engine.preprocess, limits),
        )
        self.brake = DeadLetterBrake(
            DeadLetterLimit(
                max_consecutive=settings.dlq_max_consecutive,
                max_ratio=settings.dlq_max_ratio,
                window=settings.dlq_window,
            )
        )
        self.offsets = OffsetTracker()
        self.consumer: KafkaConsumer | None = None
        self.publisher: Publisher | None = None
        self.metrics_server: MetricsServer | None = None
        self.assigned: set[TopicPartitionKey] = set()
        self.paused = False
        self.peak_inflight = 0
        self._failure: BaseException | None = None
        self._failure_lock = threading.Lock()
        self._brake_lock = threading.Lock()
        self._last_consumed: dict[TopicPartitionKey, int] = {}
        self._next_lag_update = 0.0
        self._next_poll_warning = 0.0

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

    @property
    def failure(self) -> BaseException | None:
        return self._failure

    def fail(self, exc: BaseException) -> None:
        """Record what stops the worker; the first one wins, later ones are logged."""
        with self._failure_lock:
            if self._failure is None:
                log.error("worker stopping: %s: %s", type(exc).__name__, exc)
                self._failure = exc
                return
        log.debug("also failed after the first failure: %s: %s", type(exc).__name__, exc)

    def inflight(self) -> int:
        return self.offsets.inflight()

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set, then drain, publish and commit what was consumed.

        Raises what stopped the worker early (the dead-letter brake, the broker gone for
        longer than ``broker_retry_timeout_s``, a failed transaction, a bug).
        """
        settings = self.settings
        self.start_metrics()
        self.engine.warm_up()
        self.health.model_ready = True
        self.metrics.model_info.labels(
            name=self.engine.manifest.model_name,
            version=self.engine.manifest.version,
            device=str(self.engine.device),
            dtype=str(self.engine.dtype).removeprefix("torch."),
            dtype_reason=self.engine.dtype_reason,
        ).set(1)
        probe = BrokerProbe(settings.client_kwargs(), self.health)
        producer = self._connect("producer", lambda: make_producer(settings), stop)
        consumer: KafkaConsumer | None = None
        inference_thread: threading.Thread | None = None
        prepare: PrepareStage | None = None
        serving = [True]
        try:
            if producer is None:
                return
            if settings.exactly_once:
                producer.init_transactions()
            consumer = self._connect("consumer", lambda: make_consumer(settings), stop)
            if consumer is None:
                return
            self.consumer = consumer
            fitter = OutputFitter(
                settings.output_topic,
                settings.dlq_topic,
                self._output_limit(probe),
                settings.forward_headers,
            )
            probe.start()
            committer, transaction = self._committer(consumer, producer)
            self.publisher = Publisher(
                producer,
                fitter,
                self.offsets,
                self.metrics,
                self.health,
                self.fail,
                transaction,
                self.clock,
                producer_factory=None if settings.exactly_once else lambda: make_producer(settings),
            )
            self.publisher.on_rerouted = self._rerouted
            self.health.watch_outputs(self.publisher.oldest_unacked)
            inference = InferenceStage(
                self.judge,
                self.publisher,
                self.metrics,
                self.health,
                settings.max_batch_size,
                settings.max_batch_wait_ms / 1000,
                self._is_current,
                self._judged,
                self.clock,
            )
            ordering = InOrderRelease(inference.put) if settings.exactly_once else None
            prepare = PrepareStage(
                self.judge,
                ordering or inference.put,
                settings.decode_workers,
                settings.fetch_workers,
                settings.fetch_deadline_s,
            )
            rebalancer = Rebalancer(
                self.offsets,
                committer,
                self.metrics,
                self._assignment,
                seek=lambda tp, offset: consumer.seek(TopicPartition(*tp), offset),
                skip_acknowledged=not settings.exactly_once,
            )
            if ordering is not None:
                rebalancer.on_change = self._with_ordering(ordering)
            inference_thread = threading.Thread(
                target=self._guarded(
                    lambda: inference.run(lambda: serving[0] and self._failure is None)
                ),
                name="clipguard-inference",
                daemon=True,
            )
            inference_thread.start()
            consumer.subscribe([settings.input_topic], listener=rebalancer)
            while not stop.is_set() and self._failure is None:
                self._poll(consumer, prepare, committer, ordering)
            self._drain(consumer, committer)
        finally:
            self.health.model_ready = False
            serving[0] = False
            if inference_thread is not None:
                inference_thread.join(timeout=settings.drain_timeout_s)
                self.health.retire("inference")
            if prepare is not None:
                prepare.close()
            probe.stop()
            if consumer is not None:
                with contextlib.suppress(Exception):
                    consumer.close(autocommit=False)
            if self.publisher is not None:  # it may have replaced the producer
                producer = self.publisher.producer
            if producer is not None:
                with contextlib.suppress(Exception):
                    producer.close(timeout=settings.produce_timeout_s)
            if self.metrics_server is not None:
                self.metrics_server.stop()
            if self._failure is not None:  # also when set-up gave up (no broker at all)
                raise self._failure

    # -- set-up ---------------------------------------------------------------------------

    def _connect(self, what: str, factory: Callable[[], Any], stop: threading.Event) -> Any:
        """Build a Kafka client, retrying while the broker is away (bounded by the limit)."""
        delay = 0.5
        while not stop.is_set():
            self.health.beat(LOOP)
            try:
                client = factory()
            except KafkaError as exc:
                self.health.broker_failed()
                self._check_broker_limit()
                if self._failure is not None:
                    return None
                log.warning("cannot reach the broker for the %s yet (%s); retrying", what, exc)
                stop.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.health.broker_answered()
            return client
        return None

    def _output_limit(self, probe: BrokerProbe) -> int:
        """The largest record we may send: our producer's cap, the topics' own limits, and
        ``max_output_bytes`` when set, whichever is smallest."""
        settings = self.settings
        limits = [producer_max_request_size(settings)]
        limits += probe.max_message_bytes([settings.output_topic, settings.dlq_topic]).values()
        if settings.max_output_bytes is not None:
            limits.append(settings.max_output_bytes)
        limit = min(limits)
        log.info("outputs are sized to fit %d bytes per record", limit)
        return limit

    def _committer(
        self, consumer: KafkaConsumer, producer: KafkaProducer
    ) -> tuple[Committer, TransactionCommitter | None]:
        if not self.settings.exactly_once:
            return OffsetCommitter(consumer, self.offsets, self.metrics), None
        transaction = TransactionCommitter(
            consumer, producer, self.offsets, self.metrics, threading.Lock()
        )
        transaction.begin()
        return transaction, transaction

    def _guarded(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
                self.fail(exc)

        return run

    # -- consumer thread ---------------------------------------------------------------------

    def _poll(
        self,
        consumer: KafkaConsumer,
        prepare: PrepareStage,
        committer: Committer,
        ordering: InOrderRelease | None,
    ) -> None:
        self.health.beat(LOOP)
        room = self.settings.max_inflight - self.offsets.inflight()
        try:
            polled = consumer.poll(timeout_ms=POLL_TIMEOUT_MS, max_records=max(1, room))
        except KafkaError as exc:
            self._poll_failed(exc)
            return
        committer.settle()
        received_at = self.clock()
        for records in polled.values():
            for raw in records:
                record = RecordRef.from_kafka(raw)
                key = (record.topic, record.partition)
                epoch = self.offsets.consumed(key, record.offset)
                self._last_consumed[key] = record.offset
                self.metrics.events_consumed.labels(topic=record.topic).inc()
                if ordering is not None:
                    ordering.expect(key, record.offset, epoch)
                prepare.submit(Pending(record, received_at, epoch))
        inflight = self.offsets.inflight()
        self.peak_inflight = max(self.peak_inflight, inflight)
        self.metrics.inflight_events.set(inflight)
        committer.commit()
        self._apply_backpressure(consumer, inflight)
        self._update_lag(consumer, force=bool(polled))
        state = consumer.group_metadata().state
        self.health.assignment(bool(self.assigned), state == MemberState.STABLE)
        self._check_broker_limit()

    def _poll_failed(self, exc: KafkaError) -> None:
        """A poll that raised: the client retries its connections itself; we wait a little,
        keep the health facts current and give up only at the broker limit."""
        self.metrics.errors.labels(stage="consume").inc()
        now = self.clock()
        if now >= self._next_poll_warning:
            log.warning("poll failed: %s: %s (retrying)", type(exc).__name__, exc)
            self._next_poll_warning = now + 10.0
        self._check_broker_limit()
        time.sleep(0.5)

    def _check_broker_limit(self) -> None:
        away = self.health.broker_unreachable_for()
        limit = self.settings.broker_retry_timeout_s
        if away > limit:
            self.fail(
                BrokerUnavailableError(
                    f"broker unreachable for {away:.0f}s (limit broker_retry_timeout_s={limit:g})"
                )
            )

    def _apply_backpressure(self, consumer: KafkaConsumer, inflight: int) -> None:
        """Pause every assigned partition above the cap, resume at half: keep polling."""
        cap = self.settings.max_inflight
        if not self.paused and inflight >= cap:
            self.paused = True
        elif self.paused and inflight <= cap // 2:
            consumer.resume(*consumer.paused())
            self.paused = False
            self.metrics.paused_partitions.set(0)
        if self.paused:  # every round: partitions assigned meanwhile obey the pause too
            partitions = consumer.assignment()
            consumer.pause(*partitions)
            self.metrics.paused_partitions.set(len(partitions))

    def _update_lag(self, consumer: KafkaConsumer, force: bool = False) -> None:
        """Records behind the high watermark the broker reported with our last fetch.

        ``highwater`` is what the last fetch response said (no request), so this is cheap.
        """
        now = self.clock()
        if now < self._next_lag_update and not force:
            return
        self._next_lag_update = now + 1.0
        for (topic, partition), offset in list(self._last_consumed.items()):
            if (topic, partition) not in self.assigned:
                continue
            highwater = consumer.highwater(TopicPartition(topic, partition))
            if highwater is not None:
                lag = max(0, highwater - offset - 1)
                self.metrics.consumer_lag.labels(partition=str(partition)).set(lag)

    def _drain(self, consumer: KafkaConsumer, committer: Committer) -> None:
        """Stop taking records, let every consumed one finish and commit, within a deadline."""
        with contextlib.suppress(Exception):
            consumer.pause(*consumer.assignment())
        deadline = self.clock() + self.settings.drain_timeout_s
        while self.offsets.inflight() and self._failure is None and self.clock() < deadline:
            self.health.beat(LOOP)
            try:
                consumer.poll(timeout_ms=50)
            except KafkaError as exc:
                log.warning("poll during drain failed: %s", exc)
                time.sleep(0.2)
            committer.settle()
            committer.commit()
        if self._failure is None:
            committer.commit()
        left = self.offsets.inflight()
        if left:
            log.warning("stopped with %d events uncommitted; they will be redelivered", left)

    # -- callbacks from the other stages ---------------------------------------------------------

    def _is_current(self, decoded: Decoded) -> bool:
        record = decoded.item.record
        epoch = decoded.item.epoch
        return epoch is None or self.offsets.is_current((record.topic, record.partition), epoch)

    def _judged(self, outcomes: list[Outcome]) -> None:
        """Inference thread, after a batch was handed to the publisher."""
        for outcome in outcomes:
            self._count(outcome)
            if self.on_outcome is not None:
                self.on_outcome(outcome)
            self._brake(outcome)

    def _rerouted(self, outcome: Outcome) -> None:
        """Producer thread: an output was refused and its input dead-lettered instead."""
        assert outcome.dead_letter is not None
        self.metrics.dead_letters.labels(
            stage=outcome.dead_letter.stage, reason=outcome.dead_letter.reason
        ).inc()
        self._brake(outcome)

    def _brake(self, outcome: Outcome) -> None:
        """Only our own failures count (model, outputs, bugs): bad input is normal traffic
        on a moderation path and must not be able to stop the worker."""
        with self._brake_lock:
            try:
                if outcome.internal:
                    self.brake.record(True)
                elif outcome.dead_letter is None:
                    self.brake.record(False)
            except Exception as exc:  # noqa: BLE001 - the brake's verdict stops the worker
                self.fail(exc)

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

    # -- assignment (called by the rebalancer on the client's IO thread) --------------------------

    def _assignment(self, added: set[TopicPartitionKey], removed: set[TopicPartitionKey]) -> None:
        for key in removed:
            self._last_consumed.pop(key, None)
        assigned = (self.assigned | added) - removed
        for _, partition in self.assigned - assigned:
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(str(partition))
        self.assigned = assigned
        self.metrics.assigned_partitions.set(len(assigned))
        self.health.partitions_assigned = bool(assigned)

    def _with_ordering(
        self, ordering: InOrderRelease
    ) -> Callable[[set[TopicPartitionKey], set[TopicPartitionKey]], None]:
        def on_change(added: set[TopicPartitionKey], removed: set[TopicPartitionKey]) -> None:
            ordering.forget(removed)
            self._assignment(added, removed)

        return on_change
