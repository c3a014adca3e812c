"""Stage capacities, each measured alone: the model, decode+preprocess, the broker round trip."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from clipguard.bench.mix import ImageMix
from clipguard.bench.probe import Span, cores
from clipguard.detector.decode import DecodeLimits, decode_image
from clipguard.detector.engine import InferenceEngine
from clipguard.detector.errors import ClipguardError
from clipguard.detector.preprocess import (
    PreprocessConfig,
    decode_min_side,
    preprocess,
    preprocess_views,
)
from clipguard.provenance import ProvenanceReader


class BenchError(ClipguardError):
    """A measurement could not be completed (broker, worker or timeout)."""

    stage = "bench"
    reason = "failed"


def load_producer(bootstrap: str, **overrides: Any) -> KafkaProducer:
    """The load generator's producer: large batches, large records, every write acknowledged."""
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap.split(","),
        "client_id": "clipguard-bench",
        "acks": "all",
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "max_request_size": 64 * 1024 * 1024,
    }
    config.update(overrides)
    return KafkaProducer(**config)


def kafka_crc_mode() -> str:
    """How kafka-python computes record-batch CRC-32C: the C extension or pure Python.

    Without the ``crc32c`` package every byte produced and every byte consumed (``check_crcs``
    is on by default) goes through a pure-Python loop of a few MB/s, holding the GIL.
    """
    try:
        from kafka.record import util
    except ImportError:  # pragma: no cover - kafka-python moved it
        return "unknown"
    return "c" if getattr(util, "crc32c_c", None) is not None else "pure-python"


def fill_topic(
    bootstrap: str, topic: str, events: Sequence[tuple[bytes, bytes]], timeout_s: float
) -> None:
    """Put a backlog on a topic (setup, not measured) and wait for every acknowledgement.

    Uses confluent-kafka (librdkafka) where it is installed, so large bursts do not wait on
    kafka-python's CRC; the worker under test still consumes them with kafka-python.
    """
    try:
        import confluent_kafka
    except ImportError:
        confluent_kafka = None
    if confluent_kafka is None:
        producer = load_producer(bootstrap)
        try:
            futures = [producer.send(topic, key=key, value=value) for key, value in events]
            producer.flush(timeout=timeout_s)
            for future in futures:
                future.get(timeout=timeout_s)
        finally:
            producer.close()
        return
    failures: list[str] = []

    def delivered(error: Any, _message: Any) -> None:
        if error is not None:
            failures.append(str(error))

    fast = confluent_kafka.Producer(
        {
            "bootstrap.servers": bootstrap,
            "client.id": "clipguard-bench-fill",
            "acks": "all",
            "linger.ms": 5,
            "message.max.bytes": 64 * 1024 * 1024,
            "queue.buffering.max.kbytes": 512 * 1024,
        }
    )
    for key, value in events:
        while True:
            try:
                fast.produce(topic, value=value, key=key, on_delivery=delivered)
                break
            except BufferError:
                fast.poll(0.05)
        fast.poll(0)
    left = fast.flush(timeout_s)
    if left or failures:
        raise BenchError(
            f"filling {topic}: {left} records unacknowledged, {len(failures)} failed "
            f"({failures[:1]})"
        )


def model_batch(mix: ImageMix, cfg: PreprocessConfig, batch_size: int) -> torch.Tensor:
    """A batch of real preprocessed images from the mix (decoded outside the timing)."""
    side = decode_min_side(cfg)
    pixels = [preprocess(decode_image(jpeg, min_side=side), cfg) for jpeg in mix.jpegs[:batch_size]]
    return torch.stack([pixels[i % len(pixels)] for i in range(batch_size)])


def measure_model(
    engine: InferenceEngine,
    batch: torch.Tensor,
    duration_s: float,
    min_batches: int = 3,
    warm: bool = False,
) -> dict[str, Any]:
    """images/s of ``engine.scores`` on a pre-made batch at the configured size, warmed up
    first unless ``warm`` says the engine just ran this batch shape."""
    if not warm:
        engine.warm_up()
        engine.scores(batch)
    times: list[float] = []
    with Span() as span:
        while len(times) < min_batches or sum(times) < duration_s:
            started = time.perf_counter()
            engine.scores(batch)
            times.append(time.perf_counter() - started)
    size = batch.shape[0]
    return {
        "images_per_s": size * len(times) / sum(times),
        "batch_size": size,
        "batches": len(times),
        "batch_seconds_p50": statistics.median(times),
        "batch_seconds_mean": statistics.fmean(times),
        "seconds": span.wall,
        **span.usage(),
    }


def measure_decode(
    mix: ImageMix,
    cfg: PreprocessConfig,
    limits: DecodeLimits,
    duration_s: float,
    min_images: int = 20,
) -> dict[str, Any]:
    """decode_image + preprocess on one thread: images/s per core, times the cores here;
    for a mix of several kinds, also the cost of each kind."""
    count = 0
    per_kind: dict[str, list[float]] = {}
    side = decode_min_side(cfg)  # DCT-scaled JPEG decode where the contract allows it
    with Span() as span:
        started = time.perf_counter()
        while count < min_images or time.perf_counter() - started < duration_s:
            began = time.perf_counter()
            preprocess(decode_image(mix.jpegs[count % len(mix.jpegs)], limits, side), cfg)
            per_kind.setdefault(mix.kind_of(count), []).append(time.perf_counter() - began)
            count += 1
    per_core = count / span.wall
    n_cores = cores()
    result: dict[str, Any] = {
        "images_per_s_per_core": per_core,
        "cores": n_cores,
        "images_per_s": per_core * n_cores,
        "ms_per_image": 1000 / per_core,
        "images": count,
        "seconds": span.wall,
        "jpeg_draft": side is not None,
        **span.usage(),
    }
    if len(per_kind) > 1:
        result["kinds"] = {
            kind: {"ms_per_image": 1000 * statistics.fmean(times), "images": len(times)}
            for kind, times in per_kind.items()
        }
    return result


def measure_provenance(
    mix: ImageMix, limits: DecodeLimits, duration_s: float, min_images: int = 20
) -> dict[str, Any]:
    """What the worker's provenance readers (C2PA, XMP, EXIF, generator text) cost per upload
    on one thread, next to decode+preprocess: they run in the decode stage, so their share of
    it is what they take from the pipeline (docs/provenance.md)."""
    reader = ProvenanceReader()
    images = [decode_image(data, limits) for data in mix.jpegs]
    reader.inspect(mix.jpegs[0], images[0])  # first call loads the C2PA library
    count, started = 0, time.perf_counter()
    while count < min_images or time.perf_counter() - started < duration_s:
        index = count % len(mix.jpegs)
        reader.inspect(mix.jpegs[index], images[index])
        count += 1
    seconds = time.perf_counter() - started
    reader.close()
    return {"ms_per_image": 1000 * seconds / count, "images": count, "readers": reader.readers}


def _consume_count(consumer: KafkaConsumer, count: int, deadline: float, done: list[float]) -> None:
    seen = 0
    while seen < count and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=100).values():
            seen += len(records)
    done.append(time.perf_counter() if seen >= count else float("nan"))


def measure_broker(
    bootstrap: str,
    topic: str,
    events: Sequence[tuple[bytes, bytes]],
    broker_pid: int | None,
    timeout_s: float,
) -> dict[str, Any]:
    """Produce the events and consume them back concurrently: records/s first send to last read.

    Producer and consumer share this process, as the worker's consumer and producer do.
    """
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap.split(","),
        client_id="clipguard-bench",
        enable_auto_commit=False,
    )
    partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    consumer.poll(timeout_ms=0)  # resolve positions before the clock starts
    producer = load_producer(bootstrap)
    done: list[float] = []
    reader = threading.Thread(
        target=_consume_count,
        args=(consumer, len(events), time.monotonic() + timeout_s, done),
        daemon=True,
    )
    try:
        with Span(broker_pid) as span:
            started = time.perf_counter()
            reader.start()
            for key, value in events:
                producer.send(topic, key=key, value=value)
            producer.flush()
            reader.join()
    finally:
        producer.close()
        consumer.close()
    finished = done[0] if done else float("nan")
    if finished != finished:  # NaN: not everything came back
        raise BenchError(f"broker round trip: not all {len(events)} records read back")
    seconds = finished - started
    return {
        "records_per_s": len(events) / seconds,
        "records": len(events),
        "mean_record_bytes": round(sum(len(v) for _, v in events) / len(events)),
        "seconds": seconds,
        **span.usage(),
    }


def draft_agreement(
    engine: InferenceEngine, mix: ImageMix, cfg: PreprocessConfig
) -> dict[str, Any]:
    """How far DCT-scaled decoding moves the scores against a full decode, same model.

    A checkpoint trained with ``jpeg_draft`` saw DCT-scaled pixels; this is what serving it
    on full decodes instead (or a full-decode checkpoint on scaled ones) would change.
    """
    side = decode_min_side(cfg)
    drafted = [preprocess_views(decode_image(data, min_side=side), cfg) for data in mix.jpegs]
    full = [preprocess_views(decode_image(data), cfg) for data in mix.jpegs]
    with_draft, _ = engine.scores(drafted)
    without, _ = engine.scores(full)
    delta = (with_draft - without).abs()
    threshold = engine.threshold
    same = ((with_draft >= threshold) == (without >= threshold)).float().mean()
    return {
        "images": len(mix.jpegs),
        "max_abs_delta": float(delta.max()),
        "p99_abs_delta": float(torch.quantile(delta, 0.99)),
        "decisions_identical": float(same),
    }
