"""``clipguard serve``: run the worker against a real Kafka until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from types import FrameType

from clipguard.cli.common import EXIT_INTERRUPTED, EXIT_OK, flag_values
from clipguard.cli.settings_flags import add_settings_flags
from clipguard.consumer.config import WorkerSettings
from clipguard.consumer.running import RunningWorker
from clipguard.consumer.worker import Worker, engine_from_settings
from clipguard.provenance import ProvenanceReader

log = logging.getLogger("clipguard.serve")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="consume upload events and publish verdicts",
        description="Every flag can also be set as CLIPGUARD_<FLAG> or in --config (TOML).",
    )
    add_serve_flags(parser)
    parser.set_defaults(func=run)


#: Help for the flags people reach for first; every other setting has its flag too.
SERVE_HELP = {
    "checkpoint": "checkpoint directory or .safetensors",
    "bootstrap_servers": "HOST:PORT[,HOST:PORT...]",
    "group_instance_id": "static membership id (enables cooperative-sticky assignment)",
    "max_batch_size": "events per inference batch",
    "max_batch_wait_ms": "a batch closes this long after its first event",
    "device": "auto, cpu, cuda, cuda:N",
    "decode_workers": "decode threads (default: one per core)",
    "jpeg_decode_device": "cpu, cuda, cuda:N: decode JPEGs in batches on this CUDA device "
    "(untested on a GPU; docs/bench.md)",
    "model_process": "run the model in a process of its own fed through shared memory, "
    "out of the GIL's way (measured neither faster nor slower on 2 cores; docs/bench.md)",
    "fetch_workers": "threads fetching image URLs",
    "fetch_deadline_s": "one event's URL fetch, all retries included",
    "max_inflight": "uncommitted-events cap, at least --max-batch-size; partitions pause above it",
    "exactly_once": "Kafka transactions for outputs and offsets",
    "file_root": "allow file:// image URLs under this directory",
    "fetch_allow_cidrs": "ranges the SSRF guard would refuse that may be fetched, comma-separated",
    "review_at": "override the checkpoint's review threshold",
    "block_at": "override the checkpoint's block threshold",
    "views": "views per image (override the checkpoint's input contract; 1 = one crop)",
    "view_aggregation": "aggregate the views' logits: mean or max (default: the checkpoint's)",
    "broker_retry_timeout_s": "keep retrying an unreachable broker this long, then exit 4",
    "stall_timeout_s": "a worker loop stuck this long fails /livez",
    "assignment_timeout_s": "no partitions and no stable group this long fails /livez",
    "max_output_bytes": "cap on one output record (default: producer and topic limits)",
    "c2pa_trust_anchors": "PEM of C2PA trust anchors; without it no Content Credential is trusted",
    "hash_list": "PDQ hash list (<hex> <ai_generated|real> [generator] per line); SIGHUP reloads",
    "forward_headers": "input headers copied to verdicts and dead letters besides traceparent "
    "and tracestate, comma-separated",
}


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    add_settings_flags(parser, WorkerSettings, SERVE_HELP)
    parser.add_argument("--config", help="TOML file with settings")


def _reload(reader: ProvenanceReader) -> None:
    """SIGHUP: re-read the hash list; a bad file keeps the old list in force."""
    try:
        count = reader.reload()
    except Exception as exc:  # noqa: BLE001 - a bad list must not stop moderation
        log.error("hash list not reloaded, the old one stays in force: %s", exc)
        return
    log.info("hash list reloaded: %s entries", count)


class StopOnSignal:
    """First SIGTERM/SIGINT: drain and stop. Second: exit at once."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.signals = 0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals > 1:
            log.warning("second signal: exiting without draining")
            os._exit(EXIT_INTERRUPTED)
        log.info("signal %s: draining in-flight work, then stopping", signal.Signals(signum).name)
        self.stop.set()

    def install(self) -> StopOnSignal:
        signal.signal(signal.SIGTERM, self)
        signal.signal(signal.SIGINT, self)
        return self


def run(args: argparse.Namespace) -> int:
    settings = WorkerSettings.load(args.config, **flag_values(args))
    engine = engine_from_settings(settings)
    worker = Worker(settings, engine)
    server = worker.start_metrics()
    if server is not None:
        log.info("metrics on http://%s:%d/metrics", server.host, server.port)
    stopper = StopOnSignal().install()
    log.info(
        "serving %s -> %s with %s (%s) on %s",
        settings.input_topic,
        settings.output_topic,
        engine.manifest.model_name,
        engine.manifest.version,
        engine.device,
    )
    reader = worker.judge.provenance
    if reader is not None and hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda signum, frame: _reload(reader))
    running = RunningWorker(worker, stopper.stop).start()
    try:
        while running.alive():  # the main thread stays free for signals
            running.join(0.5)
        running.join()
    finally:
        engine.close()
    log.info("stopped cleanly")
    return EXIT_OK
