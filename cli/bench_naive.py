"""The naive consumer the worker is compared with: one event at a time, same model, same broker.

poll one record -> parse -> decode -> preprocess -> model on a batch of one -> publish the
verdict and wait for its acknowledgement -> commit that offset. No batching, no overlap: this
is what "just call the model in a consumer loop" costs per event.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from clipguard.cli.bench_mix import ImageMix
from clipguard.cli.bench_probe import Span
from clipguard.cli.bench_stages import BenchError, load_producer
from clipguard.cli.bench_worker import BenchEnv, fresh_topics, produce_all
from clipguard.consumer.records import RecordRef, parse_record
from clipguard.consumer.schemas import InputRef, ModelRef, PolicyRef, Verdict
from clipguard.detector.decode import DecodeLimits, decode_image
from clipguard.detector.engine import InferenceEngine
from clipguard.detector.preprocess import preprocess


class NaiveConsumer:
    """Judges one record at a time and commits after every verdict is acknowledged."""

    def __init__(self, env: BenchEnv, engine: InferenceEngine, input_topic: str, output: str):
        self.engine = engine
        self.output = output
        self.timeout_s = env.timeout_s
        manifest = engine.manifest
        self.policy = manifest.policy
        self.model_ref = ModelRef(
            name=manifest.model_name, version=manifest.version, sha256=manifest.sha256
        )
        self.policy_ref = PolicyRef(review_at=self.policy.review_at, block_at=self.policy.block_at)
        self.limits = DecodeLimits()
        self.consumer = KafkaConsumer(
            bootstrap_servers=env.bootstrap.split(","),
            client_id="clipguard-bench-naive",
            group_id=f"{input_topic}.naive",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=1,
        )
        partitions = sorted(self.consumer.partitions_for_topic(input_topic) or ())
        self.consumer.assign([TopicPartition(input_topic, p) for p in partitions])
        self.producer = load_producer(env.bootstrap, linger_ms=0)

    def judge(self, raw: Any) -> Verdict:
        record = RecordRef.from_kafka(raw)
        upload = parse_record(record)
        assert upload.image_bytes is not None
        pixels = preprocess(decode_image(upload.image_bytes, self.limits), self.engine.preprocess)
        [prediction] = self.engine.predict_tensors(pixels.unsqueeze(0))
        return Verdict(
            event_id=upload.event_id,
            decision=self.policy.decide(prediction.ai_score).value,
            label=prediction.label,
            ai_score=round(prediction.ai_score, 6),
            source=prediction.source,
            source_scores=prediction.source_scores,
            model=self.model_ref,
            policy=self.policy_ref,
            input=InputRef(topic=record.topic, partition=record.partition, offset=record.offset),
            decided_at=datetime.now(timezone.utc),
            metadata=upload.metadata,
        )

    def run(self, count: int, seconds: float) -> int:
        """Judge up to ``count`` records for at most ``seconds``; returns how many were done."""
        done = 0
        deadline = time.monotonic() + seconds
        while done < count and time.monotonic() < deadline:
            for tp, records in self.consumer.poll(timeout_ms=100, max_records=1).items():
                for raw in records:
                    verdict = self.judge(raw)
                    key = verdict.event_id.encode()
                    future = self.producer.send(self.output, key=key, value=verdict.to_bytes())
                    future.get(timeout=self.timeout_s)
                    self.consumer.commit({tp: OffsetAndMetadata(raw.offset + 1, "", -1)})
                    done += 1
        return done

    def close(self) -> None:
        self.producer.close()
        self.consumer.close(autocommit=False)


def measure_naive(
    env: BenchEnv, engine: InferenceEngine, mix: ImageMix, count: int, seconds: float
) -> dict[str, Any]:
    """events/s of the naive consumer draining a backlog: ``count`` events or ``seconds``."""
    topics = fresh_topics(env, "naive")
    produce_all(env, topics.input, mix.events("naive", count))
    naive = NaiveConsumer(env, engine, topics.input, topics.output)
    try:
        with Span(env.broker_pid) as span:
            done = naive.run(count, seconds)
    finally:
        naive.close()
    if done == 0:
        raise BenchError(f"naive consumer: no event judged in {seconds:.0f}s")
    return {
        "events": done,
        "events_per_s": done / span.wall,
        "seconds": span.wall,
        **span.usage(),
    }
