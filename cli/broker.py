"""``clipguard broker``: the embedded development broker, until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import threading

from clipguard.cli.common import EXIT_OK
from clipguard.devbroker.broker import EmbeddedBroker, create_topics


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "broker",
        help="run the embedded Kafka-compatible broker (Tansu) on 127.0.0.1",
        description="For development and demos: memory storage, loopback only.",
    )
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument(
        "--topics",
        default="uploads:3,verdicts:3,uploads.dlq:1",
        help="topics to create, NAME:PARTITIONS comma-separated ('' for none)",
    )
    parser.set_defaults(func=run)


def _parse_topics(spec: str) -> dict[str, int]:
    topics: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition(":")
        topics[name] = int(count or 1)
    return topics


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with EmbeddedBroker(port=args.port) as broker:
        topics = _parse_topics(args.topics)
        if topics:
            create_topics(broker.bootstrap_servers, topics)
        print(broker.bootstrap_servers, flush=True)
        stop.wait()
    return EXIT_OK
