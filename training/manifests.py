"""CSV and JSONL manifests: ``path,label[,source][,split]``, one image per row.

``path`` is relative to the manifest's folder (or absolute). ``label`` is ``0``/``1``,
``real``/``fake`` or a synonym (``nature``, ``ai``, ``ai_generated``, ``generated``,
``synthetic``, ``true``/``false``). ``source`` names the generator of a fake (ignored for
reals; a fake without one has an unknown source and trains the binary head only).
``split`` is ``train``, ``val`` or ``test``; rows without one form the pool ``all``, cut into
splits when training. Rows that cannot be used (missing file, unknown label) are counted and
reported, never fatal.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from clipguard.training.folders import (
    IMAGE_SUFFIXES,
    SPLIT_NAMES,
    DatasetError,
    FolderDataset,
    RawItem,
    assemble,
    canonical_split,
)

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = frozenset({".csv", ".jsonl", ".ndjson"})
REAL_LABELS = frozenset({"0", "real", "nature", "false", "no", "authentic", "0_real"})
FAKE_LABELS = frozenset(
    {"1", "fake", "ai", "ai_generated", "generated", "synthetic", "true", "yes", "1_fake"}
)


class ManifestError(DatasetError):
    """The manifest file itself is unusable (no path/label columns, unreadable)."""


def parse_label(value: Any) -> bool:
    """True for generated, False for real; ValueError for anything else."""
    text = str(value).strip().lower()
    if text in FAKE_LABELS:
        return True
    if text in REAL_LABELS:
        return False
    raise ValueError(f"unknown label {value!r}")


def _rows(path: Path) -> Iterator[tuple[int, Mapping[str, Any] | None]]:
    with path.open(encoding="utf-8", newline="") as handle:
        if path.suffix == ".csv":
            reader = csv.DictReader(handle)
            fields = {f.strip().lower() for f in reader.fieldnames or []}
            if not {"path", "label"} <= fields:
                raise ManifestError(f"{path}: the CSV header must name 'path' and 'label'")
            for number, row in enumerate(reader, start=2):
                yield number, {k.strip().lower(): v for k, v in row.items() if k}
            return
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                yield number, None
                continue
            yield number, row if isinstance(row, dict) else None


def read_manifest_file(path: str | Path) -> FolderDataset:
    path = Path(path)
    base = path.parent
    records: list[RawItem] = []
    skipped: list[Path] = []
    bad_rows = 0
    try:
        rows = list(_rows(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc}") from exc
    for number, row in rows:
        try:
            if row is None:
                raise ValueError("not a JSON object")
            image = Path(str(row["path"]).strip())
            image = image if image.is_absolute() else base / image
            fake = parse_label(row["label"])
            split = canonical_split(str(row.get("split") or "all").strip())
            if split not in (*SPLIT_NAMES, "all"):
                raise ValueError(f"unknown split {row.get('split')!r}")
            source = str(row.get("source") or "").strip() or None
        except (KeyError, ValueError) as exc:
            bad_rows += 1
            log.warning("%s line %d skipped: %s", path, number, exc)
            continue
        if not image.is_file() or image.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(image)
            continue
        generator = source if fake and source and source.lower() != "real" else None
        records.append(RawItem(split, image, fake, generator, None))
    dataset = assemble(records, layout="manifest", root=path, skipped=skipped)
    if bad_rows:
        dataset.notes.append(f"{bad_rows} manifest rows could not be parsed and were skipped")
    return dataset
