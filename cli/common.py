"""Shared plumbing for the subcommands: flags -> settings, errors -> exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

# Exit codes tell a supervisor what happened (documented in README "Serving").
EXIT_OK = 0  # stopped cleanly: everything consumed was judged, published and committed
EXIT_FAILURE = 1  # a runtime failure (broker unreachable, publish not acknowledged, bad model)
EXIT_USAGE = 2  # a setting is wrong: fix the configuration, do not restart blindly
EXIT_DEAD_LETTER_BRAKE = 3  # our own failures in a row (model, outputs): a bad deploy, page a human
EXIT_BROKER_UNAVAILABLE = 4  # the broker stayed away past broker_retry_timeout_s: restart later
EXIT_INTERRUPTED = 130  # a second signal: stopped at once, uncommitted work will be redelivered

IMAGE_SUFFIXES = {
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".gif",
    ".bmp",
    ".tif",
    ".tiff",
    ".mpo",
}


def flag_values(args: argparse.Namespace, *, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The flags the user actually gave (argparse defaults are ``SUPPRESS``)."""
    skip = {"command", "func", "config", "verbose", "log_format", *exclude}
    return {k: v for k, v in vars(args).items() if k not in skip and v is not None}


def add_flag(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """A flag whose absence leaves the setting to the environment, config file or default."""
    parser.add_argument(name, default=None, **kwargs)


def iter_files(paths: Iterable[str | Path], *, all_files: bool = True) -> Iterator[Path]:
    """Files named directly, then every file under named directories (sorted, recursive)."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                if all_files or child.suffix.lower() in IMAGE_SUFFIXES:
                    yield child
        else:
            yield path


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":"), default=str) + "\n")
    sys.stdout.flush()


LOG_FORMATS = ("text", "json")


def setup_logging(verbose: bool = False, log_format: str = "text") -> None:
    """Logs to stderr: text lines, or one JSON object per record (cli/logjson.py)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        from clipguard.cli.logjson import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for noisy in ("kafka", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def read_data(data: Path, layout: Any, train_generator: Any) -> Any:
    """``read_dataset`` for a command's ``--data``; a bad tree is a settings error naming it."""
    from clipguard.consumer.config import SettingsError
    from clipguard.training.folders import DatasetError
    from clipguard.training.layouts import read_dataset

    try:
        return read_dataset(data, layout, train_generator=train_generator)
    except DatasetError as exc:
        raise SettingsError([f"invalid setting data (--data / CLIPGUARD_DATA): {exc}"]) from None
