"""The naive consumer the worker is compared with: one event at a time, same model, same broker.

poll one record -> parse -> decode -> preprocess -> model on a batch of one -> publish the
verdict and wait for its acknowledgement -> commit that offset. No batching, no overlap: this
is what "just call the model in a consumer loop" costs per event.
"""

from __future__ import annotations

import time
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from clipguard.bench.mix import ImageMix
from clipguard.bench.probe import Span
from clipguard.bench.stages import BenchError, load_producer
from clipguard.bench.worker import BenchEnv, fresh_topics, produce_all
from clipguard.consumer.batching import Pending
from clipguard.consumer.judge import Judge
from clipguard.consumer.metrics import WorkerMetrics
from clipguard.consumer.records import RecordRef
from clipguard.consumer.schemas import Verdict
from clipguard.consumer.sources import ImageSources
from clipguard.detector.decode import DecodeLimits
from clipguard.detector.engine import InferenceEngine


class NaiveConsumer:
    """Judges one record at a time and commits after every verdict is acknowledged."""

    def __init__(self, env: BenchEnv, engine: InferenceEngine, input_topic: str, output: str):
        self.output = output
        self.timeout_s = env.timeout_s
        # The worker's own judge (same parsing, decoding, model call and verdict), one event
        # at a time: the comparison is about batching and overlap, not about different code.
        self.judge_one = Judge(
            engine,
            engine.manifest.policy,
            DecodeLimits(),
            ImageSources(DecodeLimits().max_bytes),
            WorkerMetrics(),
        )
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
        [outcome] = self.judge_one([Pending(record, time.monotonic())])
        if outcome.verdict is None:
            raise BenchError(f"naive consumer: event at offset {record.offset} has no verdict")
        return outcome.verdict

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
