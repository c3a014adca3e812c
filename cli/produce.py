"""``clipguard produce``: send image files as upload events (for trials and load tests)."""

from __future__ import annotations

import argparse
import base64
import json
import uuid
from datetime import datetime, timezone
from pathlib import Path

from kafka import KafkaProducer

from clipguard.cli.common import EXIT_OK, add_flag, flag_values, iter_files
from clipguard.consumer.config import KafkaSettings
from clipguard.consumer.schemas import SCHEMA_VERSION


class ProduceSettings(KafkaSettings):
    topic: str = "uploads"
    raw: bool = False


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("produce", help="send image files as upload events")
    add_flag(parser, "--bootstrap-servers", dest="bootstrap_servers", help="HOST:PORT[,...]")
    add_flag(parser, "--topic", help="default: uploads")
    parser.add_argument(
        "--raw",
        action="store_const",
        const=True,
        default=None,
        help="send raw image bytes keyed by event id instead of JSON events",
    )
    parser.add_argument("--config", help="TOML file with settings")
    parser.add_argument("paths", nargs="+", metavar="FILES_OR_DIRS")
    parser.set_defaults(func=run)


def upload_event(image: bytes, event_id: str, metadata: dict | None = None) -> bytes:
    """The JSON upload event of DESIGN.md for inline image bytes."""
    return json.dumps(
        {
            "schema_version": SCHEMA_VERSION,
            "event_id": event_id,
            "image_b64": base64.b64encode(image).decode("ascii"),
            "uploaded_at": datetime.now(timezone.utc).isoformat(),
            "metadata": metadata or {},
        }
    ).encode("utf-8")


def run(args: argparse.Namespace) -> int:
    settings = ProduceSettings.load(args.config, **flag_values(args, exclude={"paths"}))
    producer = KafkaProducer(
        **settings.client_kwargs(), acks="all", max_request_size=64 * 1024 * 1024
    )
    futures = []
    for path in iter_files(args.paths):
        event_id = f"{Path(path).stem}-{uuid.uuid4().hex[:12]}"
        data = path.read_bytes()
        value = data if settings.raw else upload_event(data, event_id, {"file": path.name})
        futures.append(
            (event_id, path, producer.send(settings.topic, key=event_id.encode(), value=value))
        )
    producer.flush()
    for event_id, path, future in futures:
        meta = future.get(timeout=30)
        print(f"{event_id}\t{path}\t{meta.topic}/{meta.partition}@{meta.offset}")
    producer.close()
    print(f"sent {len(futures)} events to {settings.topic}")
    return EXIT_OK
