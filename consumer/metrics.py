"""Every metric the worker exports, declared in one place (DESIGN.md "Metrics").

Each worker owns a registry, so two workers in one process (tests, the demo) never clash.
Labels are bounded vocabularies: never an event id, a user or a URL.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "clipguard_"

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DECODE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
END_TO_END_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
SCORE_BUCKETS = tuple(round(i / 10, 1) for i in range(1, 11))

#: name (without prefix and ``_total``) -> (type, labels); tests and dashboards check this.
METRIC_DEFS: dict[str, tuple[str, tuple[str, ...]]] = {
    "events_consumed": ("counter", ("topic",)),
    "verdicts": ("counter", ("decision", "label")),
    "dead_letters": ("counter", ("stage", "reason")),
    "errors": ("counter", ("stage",)),
    "commits": ("counter", ("result",)),
    "rebalances": ("counter", ("event",)),
    "batch_size": ("histogram", ()),
    "batch_wait_seconds": ("histogram", ()),
    "decode_seconds": ("histogram", ()),
    "inference_seconds": ("histogram", ()),
    "end_to_end_seconds": ("histogram", ()),
    "ai_score": ("histogram", ()),
    "inflight_events": ("gauge", ()),
    "assigned_partitions": ("gauge", ()),
    "paused_partitions": ("gauge", ()),
    "consumer_lag": ("gauge", ("partition",)),
    "model_info": ("gauge", ("name", "version", "device", "dtype", "dtype_reason")),
    "ready": ("gauge", ()),
    "evidence": ("counter", ("kind", "claim")),
    "decided_by": ("counter", ("decided_by",)),
    "c2pa_reads": ("counter", ("state",)),
    "provenance_seconds": ("histogram", ()),
}


class WorkerMetrics:
    """The worker's instruments, bound to one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        p = PREFIX
        self.events_consumed = Counter(
            p + "events_consumed", "Input records consumed.", ["topic"], registry=r
        )
        self.verdicts = Counter(
            p + "verdicts", "Verdicts published.", ["decision", "label"], registry=r
        )
        self.dead_letters = Counter(
            p + "dead_letters",
            "Records sent to the dead-letter topic.",
            ["stage", "reason"],
            registry=r,
        )
        self.errors = Counter(p + "errors", "Errors by pipeline stage.", ["stage"], registry=r)
        self.commits = Counter(p + "commits", "Offset commits.", ["result"], registry=r)
        self.rebalances = Counter(
            p + "rebalances", "Partition assignment changes.", ["event"], registry=r
        )
        self.batch_size = Histogram(
            p + "batch_size",
            "Events per inference batch.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_wait_seconds = Histogram(
            p + "batch_wait_seconds",
            "Time from a batch's first event to its closing.",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.decode_seconds = Histogram(
            p + "decode_seconds",
            "Decode and preprocess time per image.",
            buckets=DECODE_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            p + "inference_seconds",
            "Model time per batch.",
            buckets=INFERENCE_BUCKETS,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            p + "end_to_end_seconds",
            "Upload time (or record timestamp) to verdict.",
            buckets=END_TO_END_BUCKETS,
            registry=r,
        )
        self.ai_score = Histogram(
            p + "ai_score",
            "Distribution of calibrated AI scores (drift).",
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.inflight_events = Gauge(
            p + "inflight_events", "Events consumed but not yet committed.", registry=r
        )
        self.assigned_partitions = Gauge(
            p + "assigned_partitions", "Partitions assigned to this worker.", registry=r
        )
        self.paused_partitions = Gauge(
            p + "paused_partitions", "Partitions paused for backpressure.", registry=r
        )
        self.consumer_lag = Gauge(
            p + "consumer_lag", "Records behind the partition end.", ["partition"], registry=r
        )
        self.model_info = Gauge(
            p + "model_info",
            "The loaded model (value is always 1).",
            ["name", "version", "device", "dtype", "dtype_reason"],
            registry=r,
        )
        self.ready = Gauge(p + "ready", "1 when the worker can take traffic.", registry=r)
        self.evidence = Counter(
            p + "evidence",
            "Provenance evidence found in uploads (docs/provenance.md).",
            ["kind", "claim"],
            registry=r,
        )
        self.c2pa_reads = Counter(
            p + "c2pa_reads",
            "Content Credentials reads by outcome: absent, trusted, valid, invalid, ...",
            ["state"],
            registry=r,
        )
        self.provenance_seconds = Histogram(
            p + "provenance_seconds",
            "Time spent reading provenance evidence per upload (decode stage).",
            buckets=DECODE_BUCKETS,
            registry=r,
        )
        self.decided_by = Counter(
            p + "decided_by",
            "Verdict decisions by what made them: classifier, provenance or hash list.",
            ["decided_by"],
            registry=r,
        )
