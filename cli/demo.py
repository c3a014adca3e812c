"""``clipguard demo``: the whole product on one machine, end to end, in a few minutes.

Embedded broker -> detector trained on the synthetic zoo (cached) -> worker with metrics ->
a stream of labelled uploads plus deliberately bad ones -> verdicts read back -> summary.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from PIL import Image
from pydantic import Field

from clipguard.cli.common import EXIT_FAILURE, EXIT_OK, add_flag, flag_values
from clipguard.cli.produce import upload_event
from clipguard.consumer.config import ClipguardSettings, WorkerSettings
from clipguard.consumer.running import RunningWorker
from clipguard.consumer.schemas import Verdict
from clipguard.consumer.worker import Worker, engine_from_settings
from clipguard.detector.checkpoint import CheckpointError, read_manifest
from clipguard.devbroker.broker import EmbeddedBroker, create_topics
from clipguard.training import zoo
from clipguard.training.recipes import SYNTHETIC_NOTICE, train_synthetic

INPUT, OUTPUT, DLQ = "uploads", "verdicts", "uploads.dlq"


class DemoSettings(ClipguardSettings):
    events: int = Field(default=300, ge=1, le=100_000)
    workdir: Path = Path.home() / ".cache" / "clipguard" / "demo"
    retrain: bool = False
    metrics_port: int = Field(default=9400, ge=0, le=65535)
    max_batch_size: int = Field(default=32, ge=1, le=1024)
    max_batch_wait_ms: int = Field(default=20, ge=0)
    seed: int = 2026
    quiet: bool = False
    timeout_s: float = Field(default=240.0, gt=0)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="embedded broker + synthetic-trained detector + worker, end to end",
        description="Runs everything on this machine; nothing is downloaded. The detector is "
        "trained on synthetic data and is for demonstration only.",
    )
    add_flag(parser, "--events", type=int, help="good upload events to stream (default 300)")
    add_flag(parser, "--workdir", type=Path, help="where the demo detector is cached")
    parser.add_argument(
        "--retrain",
        action="store_const",
        const=True,
        default=None,
        help="train the demo detector again even if one is cached",
    )
    add_flag(
        parser,
        "--metrics-port",
        dest="metrics_port",
        type=int,
        help="default 9400; 0 picks a free port",
    )
    add_flag(parser, "--max-batch-size", dest="max_batch_size", type=int)
    add_flag(parser, "--max-batch-wait-ms", dest="max_batch_wait_ms", type=int)
    parser.add_argument(
        "--quiet", action="store_const", const=True, default=None, help="do not print every verdict"
    )
    parser.add_argument("--config", help="TOML file with settings")
    parser.set_defaults(func=run)


def say(text: str = "") -> None:
    print(text, flush=True)


# -- the detector ------------------------------------------------------------------------


def demo_detector(settings: DemoSettings) -> Path:
    """Reuse the cached synthetic detector, or train one (about a minute on 2 cores)."""
    path = settings.workdir / "detector"
    if not settings.retrain:
        try:
            manifest = read_manifest(path)
            say(f"      loaded cached detector {manifest.version} from {path}")
            return path
        except CheckpointError:
            pass
    say("      training clipguard-tiny on the synthetic generator zoo (about a minute)...")
    trained = train_synthetic(path, seed=0)
    test = trained.manifest.metrics.get("test", {})
    say(
        f"      trained in {trained.seconds:.0f}s: held-out accuracy "
        f"{test.get('accuracy', 0):.3f}, source accuracy {test.get('source_accuracy') or 0:.3f}"
    )
    return path


# -- the stream --------------------------------------------------------------------------


def _encode(image: Image.Image, rng: random.Random) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    fmt = "JPEG" if rng.random() < 0.3 else "PNG"
    image.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue(), fmt


def bad_events() -> list[tuple[str | None, bytes, str]]:
    """(key, value, what) for uploads that must become dead letters, not crashes."""
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(png, format="PNG")
    truncated = png.getvalue()[: len(png.getvalue()) // 2]
    return [
        (None, b"{this is not json", "malformed JSON, no id"),
        ("bad-truncated", upload_event(truncated, "bad-truncated"), "truncated PNG"),
        (
            "bad-base64",
            json.dumps({"event_id": "bad-base64", "image_b64": "%%%"}).encode(),
            "invalid base64",
        ),
        ("bad-noimage", json.dumps({"event_id": "bad-noimage"}).encode(), "no image field"),
        ("bad-text", upload_event(b"GIF89a but not really" * 4, "bad-text"), "not an image"),
        ("bad-raw", b"\x00\x01raw bytes that are no image", "raw bytes, not an image"),
    ]


@dataclass
class Sent:
    truth: dict[str, str] = field(default_factory=dict)  # event_id -> source
    offsets: set[tuple[int, int]] = field(default_factory=set)  # (partition, offset)
    sent_at: dict[str, float] = field(default_factory=dict)
    started: float = 0.0


def produce(bootstrap: str, count: int, seed: int) -> Sent:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    rng = random.Random(seed)
    sent = Sent(started=time.time())
    futures = []
    samples = zoo.generate(count, size=64, seed=seed)
    bad = bad_events()
    bad_at = {rng.randrange(count + len(bad)) for _ in range(len(bad))}
    bad_iter = iter(bad)
    for index, sample in enumerate(samples):
        if index in bad_at:
            key, value, _ = next(bad_iter, (None, b"", ""))
            if value:
                futures.append(producer.send(INPUT, key=key and key.encode(), value=value))
        event_id = f"demo-{index:05d}"
        data, fmt = _encode(sample.image, rng)
        sent.truth[event_id] = sample.source
        sent.sent_at[event_id] = time.time()
        value = upload_event(data, event_id, {"format": fmt})
        futures.append(producer.send(INPUT, key=event_id.encode(), value=value))
    for key, value, _ in bad_iter:
        futures.append(producer.send(INPUT, key=key and key.encode(), value=value))
    producer.flush()
    for future in futures:
        meta = future.get(timeout=30)
        sent.offsets.add((meta.partition, meta.offset))
    producer.close()
    return sent


@dataclass
class Collected:
    verdicts: list[Verdict] = field(default_factory=list)
    dead_letters: list[dict[str, str]] = field(default_factory=list)
    covered: set[tuple[int, int]] = field(default_factory=set)
    received_at: dict[str, float] = field(default_factory=dict)


def collect(
    bootstrap: str, sent: Sent, timeout_s: float, quiet: bool, alive: Callable[[], bool]
) -> Collected:
    """Read verdicts and dead letters until every input offset is accounted for."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    partitions = [
        TopicPartition(topic, p)
        for topic in (OUTPUT, DLQ)
        for p in sorted(consumer.partitions_for_topic(topic) or {0})
    ]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    got = Collected()
    deadline = time.monotonic() + timeout_s
    while not sent.offsets <= got.covered and time.monotonic() < deadline and alive():
        for tp, records in consumer.poll(timeout_ms=200).items():
            for record in records:
                if tp.topic == OUTPUT:
                    verdict = Verdict.model_validate_json(record.value)
                    got.verdicts.append(verdict)
                    got.covered.add((verdict.input.partition, verdict.input.offset))
                    got.received_at[verdict.event_id] = time.time()
                    if not quiet:
                        say(_verdict_line(verdict, sent.truth.get(verdict.event_id)))
                else:
                    headers = {k: v.decode() for k, v in record.headers}
                    got.dead_letters.append(headers)
                    got.covered.add(
                        (
                            int(headers["clipguard.original.partition"]),
                            int(headers["clipguard.original.offset"]),
                        )
                    )
                    if not quiet:
                        say(
                            f"      DEAD LETTER  {headers['clipguard.error.stage']}/"
                            f"{headers['clipguard.error.reason']}: "
                            f"{headers['clipguard.error.message'][:70]}"
                        )
    consumer.close()
    return got


def _verdict_line(verdict: Verdict, truth: str | None) -> str:
    if verdict.error is not None:
        return f"      {verdict.event_id:<14} REVIEW (error {verdict.error.reason})"
    mark = ""
    if truth is not None:
        right = (verdict.label == "ai_generated") == (truth != "real")
        mark = f"  truth={truth}  {'ok' if right else 'MISS'}"
    score = verdict.ai_score or 0.0
    source = f"  source={verdict.source}" if verdict.source else ""
    return (
        f"      {verdict.event_id:<14} {verdict.label:<12} score={score:.3f} "
        f"{verdict.decision:<6}{source}{mark}"
    )


# -- the summary ---------------------------------------------------------------------------


def summarize(sent: Sent, got: Collected, metrics_text: str) -> dict[str, Any]:
    judged = [v for v in got.verdicts if v.error is None and v.event_id in sent.truth]
    correct = sum((v.label == "ai_generated") == (sent.truth[v.event_id] != "real") for v in judged)
    fakes = [v for v in judged if sent.truth[v.event_id] != "real" and v.source is not None]
    source_correct = sum(v.source == sent.truth[v.event_id] for v in fakes)
    latencies = sorted(
        got.received_at[e] - sent.sent_at[e] for e in sent.truth if e in got.received_at
    )
    elapsed = max(got.received_at.values(), default=time.time()) - sent.started
    missing = sent.offsets - got.covered
    return {
        "events": len(sent.offsets),
        "verdicts": len(got.verdicts),
        "error_verdicts": sum(v.error is not None for v in got.verdicts),
        "dead_letters": len(got.dead_letters),
        "missing": len(missing),
        "accuracy": correct / len(judged) if judged else 0.0,
        "source_accuracy": source_correct / len(fakes) if fakes else 0.0,
        "decisions": {
            d: sum(v.decision == d for v in got.verdicts) for d in ("allow", "review", "block")
        },
        "events_per_s": len(sent.offsets) / elapsed if elapsed > 0 else 0.0,
        "latency_p50_ms": 1000 * statistics.median(latencies) if latencies else None,
        "latency_p99_ms": (
            1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
            if latencies
            else None
        ),
        "metrics_lines": [
            line
            for line in metrics_text.splitlines()
            if line.startswith(("clipguard_verdicts_total", "clipguard_dead_letters_total"))
        ],
    }


def print_summary(summary: dict[str, Any]) -> None:
    say("      ------------------------------------------------------------")
    say(f"      events        {summary['events']}")
    say(f"      verdicts      {summary['verdicts']} ({summary['error_verdicts']} for bad input)")
    say(f"      dead letters  {summary['dead_letters']}")
    say(f"      missing       {summary['missing']}")
    say(f"      decisions     {summary['decisions']}")
    say(f"      accuracy      {summary['accuracy']:.3f} (real vs AI, against known labels)")
    say(f"      source acc.   {summary['source_accuracy']:.3f} (which generator, flagged fakes)")
    say(f"      throughput    {summary['events_per_s']:.1f} events/s")
    if summary["latency_p50_ms"] is not None:
        say(
            f"      latency       p50 {summary['latency_p50_ms']:.0f} ms, "
            f"p99 {summary['latency_p99_ms']:.0f} ms (produce -> verdict read back)"
        )
    say("      from /metrics:")
    for line in summary["metrics_lines"]:
        say(f"        {line}")
    say(f"      NOTE: the detector is {SYNTHETIC_NOTICE}.")


def run(args: argparse.Namespace) -> int:
    settings = DemoSettings.load(args.config, **flag_values(args))
    say("clipguard demo: everything runs on this machine; nothing is downloaded.")
    say(f"NOTE: the demo detector is {SYNTHETIC_NOTICE}.")
    say("[1/5] starting the embedded Kafka broker (Tansu)...")
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        create_topics(bootstrap, {INPUT: 3, OUTPUT: 3, DLQ: 1})
        say(f"      broker on {bootstrap}; topics {INPUT} (3 partitions), {OUTPUT}, {DLQ}")
        say("[2/5] detector")
        checkpoint = demo_detector(settings)
        worker_settings = WorkerSettings(
            checkpoint=checkpoint,
            bootstrap_servers=bootstrap,
            input_topic=INPUT,
            output_topic=OUTPUT,
            dlq_topic=DLQ,
            group_id="clipguard-demo",
            metrics_host="127.0.0.1",
            metrics_port=settings.metrics_port,
            max_batch_size=settings.max_batch_size,
            max_batch_wait_ms=settings.max_batch_wait_ms,
            # Tansu holds a new group's first join for max(3 s, rebalance timeout / 2).
            max_poll_interval_ms=10_000,
            session_timeout_ms=6_000,
            heartbeat_interval_ms=1_000,
        )
        worker = Worker(worker_settings, engine_from_settings(worker_settings))
        server = worker.start_metrics()
        metrics_url = f"http://127.0.0.1:{server.port}" if server else None
        running = RunningWorker(worker).start()
        errors: list[BaseException] = []
        say("[3/5] worker starting (the broker's first group join takes a few seconds)...")
        try:
            running.wait_ready(60)
        except Exception as exc:  # noqa: BLE001 - reported below; the demo must not hang
            errors.append(exc)
        say(f"      worker ready; metrics on {metrics_url}/metrics, /livez, /readyz")
        say(f"[4/5] streaming {settings.events} uploads (+{len(bad_events())} bad ones)...")
        sent = produce(bootstrap, settings.events, settings.seed)
        got = collect(bootstrap, sent, settings.timeout_s, settings.quiet, running.alive)
        metrics_text = ""
        if metrics_url:
            with urllib.request.urlopen(metrics_url + "/metrics", timeout=5) as response:
                metrics_text = response.read().decode()
        try:
            running.stop(60)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        say("[5/5] summary")
        summary = summarize(sent, got, metrics_text)
        print_summary(summary)
    if errors:
        say(f"worker failed: {type(errors[0]).__name__}: {errors[0]}")
        return EXIT_FAILURE
    return EXIT_OK if summary["missing"] == 0 else EXIT_FAILURE
