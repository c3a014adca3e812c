"""``clipguard serve``: run the worker against a real Kafka until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType

from clipguard.cli.common import EXIT_INTERRUPTED, EXIT_OK, add_flag, flag_values
from clipguard.consumer.config import WorkerSettings
from clipguard.consumer.running import RunningWorker
from clipguard.consumer.worker import Worker, engine_from_settings

log = logging.getLogger("clipguard.serve")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="consume upload events and publish verdicts",
        description="Every flag can also be set as CLIPGUARD_<FLAG> or in --config (TOML).",
    )
    add_serve_flags(parser)
    parser.set_defaults(func=run)


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--checkpoint", type=Path, help="checkpoint directory or .safetensors")
    add_flag(parser, "--bootstrap-servers", dest="bootstrap_servers", help="HOST:PORT[,...]")
    add_flag(parser, "--input-topic", dest="input_topic", help="default: uploads")
    add_flag(parser, "--output-topic", dest="output_topic", help="default: verdicts")
    add_flag(parser, "--dlq-topic", dest="dlq_topic", help="default: uploads.dlq")
    add_flag(parser, "--group-id", dest="group_id", help="default: clipguard")
    add_flag(
        parser,
        "--group-instance-id",
        dest="group_instance_id",
        help="static membership id (enables cooperative-sticky assignment)",
    )
    add_flag(parser, "--metrics-port", dest="metrics_port", type=int, help="default: 9400")
    add_flag(parser, "--max-batch-size", dest="max_batch_size", type=int, help="default: 32")
    add_flag(parser, "--max-batch-wait-ms", dest="max_batch_wait_ms", type=int, help="default: 20")
    add_flag(parser, "--max-poll-interval-ms", dest="max_poll_interval_ms", type=int)
    add_flag(parser, "--device", help="auto, cpu, cuda, cuda:N")
    add_flag(
        parser,
        "--decode-workers",
        dest="decode_workers",
        type=int,
        help="decode threads (default: one per core)",
    )
    add_flag(
        parser,
        "--max-inflight",
        dest="max_inflight",
        type=int,
        help="consumed-but-uncommitted cap; partitions pause above it (default 256)",
    )
    parser.add_argument(
        "--exactly-once",
        dest="exactly_once",
        action="store_const",
        const=True,
        default=None,
        help="Kafka transactions for outputs and offsets",
    )
    add_flag(
        parser,
        "--file-root",
        dest="file_root",
        type=Path,
        help="allow file:// image URLs under this directory",
    )
    add_flag(
        parser,
        "--review-at",
        dest="review_at",
        type=float,
        help="override the checkpoint's review threshold",
    )
    add_flag(
        parser,
        "--block-at",
        dest="block_at",
        type=float,
        help="override the checkpoint's block threshold",
    )
    parser.add_argument("--config", help="TOML file with settings")


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
    running = RunningWorker(worker, stopper.stop).start()
    while running.alive():  # the main thread stays free for signals
        running.join(0.5)
    running.join()
    log.info("stopped cleanly")
    return EXIT_OK
