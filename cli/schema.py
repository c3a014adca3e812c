"""``clipguard schema event|verdict|dead-letter``: the contract as JSON Schema."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipguard.cli.common import EXIT_OK
from clipguard.consumer.contract import SCHEMAS, schema_text


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "schema",
        help="print the JSON Schema of the upload event, the verdict or the dead-letter headers",
        description=(
            "JSON Schema (draft 2020-12) generated from the pydantic models; the committed "
            "copies are docs/schemas/<name>.schema.json (docs/schemas/README.md has the "
            "versioning rules)."
        ),
    )
    parser.add_argument("name", choices=sorted(SCHEMAS), help="which schema")
    parser.add_argument("--out", type=Path, default=None, help="write to FILE, not stdout")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    text = schema_text(args.name)
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
    return EXIT_OK
