"""The ``clipguard`` command: the composition root that wires detector, training and consumer."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from clipguard.bench import command as bench
from clipguard.cli import (
    broker,
    calibrate,
    dashboard_png,
    demo,
    export,
    import_weights,
    predict,
    produce,
    schema,
    serve,
    train,
)
from clipguard.cli import eval as evaluate
from clipguard.cli.common import (
    EXIT_BROKER_UNAVAILABLE,
    EXIT_DEAD_LETTER_BRAKE,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    LOG_FORMATS,
    setup_logging,
)
from clipguard.consumer.config import SettingsError
from clipguard.consumer.errors import BrokerUnavailableError, DeadLetterRateExceeded
from clipguard.detector.errors import ClipguardError
from clipguard.provenance import ProvenanceConfigError

log = logging.getLogger("clipguard")

COMMANDS = (
    serve,
    demo,
    train,
    evaluate,
    calibrate,
    import_weights,
    predict,
    export,
    broker,
    produce,
    bench,
    schema,
    dashboard_png,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipguard",
        description="Flag AI-generated images in Kafka upload streams with a CLIP detector.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for command in COMMANDS:
        command.register(subparsers)
    # Before or after the command: `clipguard --log-format json serve` = `clipguard serve
    # --log-format json`; the subcommand's default must not mask the top-level flag.
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=None, help=LOG_FORMAT_HELP)
    for sub in subparsers.choices.values():
        sub.add_argument(
            "--log-format",
            choices=LOG_FORMATS,
            default=argparse.SUPPRESS,
            help=LOG_FORMAT_HELP,
        )
    return parser


LOG_FORMAT_HELP = "text (default) or json: one JSON object per log line (also CLIPGUARD_LOG_FORMAT)"


def log_format(args: argparse.Namespace) -> str:
    chosen = args.log_format or os.environ.get("CLIPGUARD_LOG_FORMAT") or "text"
    if chosen not in LOG_FORMATS:
        problem = (
            f"invalid setting log_format (--log-format / CLIPGUARD_LOG_FORMAT): {chosen!r} "
            f"is not one of {', '.join(LOG_FORMATS)}"
        )
        raise SettingsError([problem])
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        setup_logging(args.verbose, log_format(args))
    except SettingsError as exc:
        print(f"clipguard {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        for problem in exc.problems:
            print(f"clipguard {args.command}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except DeadLetterRateExceeded as exc:
        print(f"clipguard {args.command}: {exc}", file=sys.stderr)
        return EXIT_DEAD_LETTER_BRAKE
    except ProvenanceConfigError as exc:
        print(f"clipguard {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokerUnavailableError as exc:
        print(f"clipguard {args.command}: {exc}", file=sys.stderr)
        return EXIT_BROKER_UNAVAILABLE
    except ClipguardError as exc:
        print(f"clipguard {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
