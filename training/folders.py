"""Labelled datasets on disk: the shared container and the generic ImageFolder layout.

Every reader (see :mod:`clipguard.training.layouts`) lists :class:`RawItem` records (a file,
real or fake, its generator if known, its split, its benchmark group) and :func:`assemble`
turns them into a :class:`FolderDataset`: class names (``real`` first, then the generators
found in the training splits), :class:`LabelledImage` items per split, and the files that
were skipped. Nothing is decoded here: corrupt images are found, counted and skipped when
they are loaded.

Generic ImageFolder: ``<root>/<split>/<source>/<image>``; ``real``, ``0_real``, ``nature``
and ``REAL`` mean real, every other folder name is a generator.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from clipguard.training.data import UNKNOWN_SOURCE, LabelledImage

log = logging.getLogger(__name__)

REAL_NAMES = frozenset({"real", "0_real", "nature", "REAL"})
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".mpo"}
)
SPLIT_NAMES = ("train", "val", "test")
SPLIT_ALIASES = {"valid": "val", "validation": "val", "eval": "test", "testing": "test"}
#: Class name given to generated images when a dataset names no generator at all.
GENERIC_FAKE = "fake"


#: A carved validation split takes at least this many images of each source (or a fifth of
#: the source, if smaller): a 10% slice of a small source is too few to set a threshold on.
MIN_VAL_PER_SOURCE = 50


class DatasetError(ValueError):
    """A dataset that cannot be read as asked: no images, no generated images, bad layout."""


@dataclass(frozen=True)
class RawItem:
    """One listed file before class indices exist."""

    split: str
    path: Path
    fake: bool
    generator: str | None = None
    group: str | None = None


@dataclass
class FolderDataset:
    """Items per split, the class list (``real`` first), and what was skipped."""

    classes: list[str]
    splits: dict[str, list[LabelledImage]] = field(default_factory=dict)
    skipped: list[Path] = field(default_factory=list)
    layout: str = "imagefolder"
    root: Path | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        return {
            "root": str(self.root) if self.root else None,
            "layout": self.layout,
            "classes": self.classes,
            "splits": {name: len(items) for name, items in self.splits.items()},
            "skipped_files": len(self.skipped),
            "notes": self.notes,
        }


def canonical_split(name: str) -> str:
    lowered = name.lower()
    return SPLIT_ALIASES.get(lowered, lowered)


def split_dirs(root: Path) -> dict[str, Path]:
    """Split folders directly under ``root`` (``train``, ``val``/``validation``, ``test``)."""
    found: dict[str, Path] = {}
    for child in sorted(subdirs(root)):
        split = canonical_split(child.name)
        if split in SPLIT_NAMES and split not in found:
            found[split] = child
    return found


def subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir())
    except OSError as exc:
        log.warning("cannot list %s: %s", path, exc)
        return []


def list_images(folder: Path, skipped: list[Path]) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted); other files go to ``skipped``."""
    images: list[Path] = []
    try:
        paths = sorted(folder.rglob("*"))
    except OSError as exc:
        log.warning("cannot walk %s: %s", folder, exc)
        skipped.append(folder)
        return images
    for path in paths:
        try:
            if not path.is_file():
                continue
        except OSError:
            skipped.append(path)
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            images.append(path)
        elif path.name not in {"zoo.json", ".DS_Store", "Thumbs.db"}:
            skipped.append(path)
    return images


def assemble(
    records: Iterable[RawItem],
    *,
    layout: str,
    root: Path | None = None,
    skipped: Sequence[Path] = (),
    class_order: Sequence[str] | None = None,
) -> FolderDataset:
    """Class names from the generators of the training splits, then indices per item.

    Generators seen only in evaluation splits stay out of the classes (the source head never
    saw them): their images keep ``UNKNOWN_SOURCE`` and their name as the ``group``.
    """
    records = list(records)
    if not records:
        raise DatasetError(f"no images found under {root} (layout {layout})")
    has_train = any(r.split == "train" for r in records)
    training = {"train", "val"} if has_train else {r.split for r in records}
    named = {r.generator for r in records if r.fake and r.generator and r.split in training}
    if class_order is not None:
        generators = [c for c in class_order if c != "real"]
        generators += sorted(named - set(generators))
    else:
        generators = sorted(named)
    unnamed_fallback = not generators
    if unnamed_fallback:
        if not any(r.fake for r in records):
            raise DatasetError(f"{root} holds no generated images (layout {layout})")
        generators = [GENERIC_FAKE]
    classes = ["real", *generators]
    dataset = FolderDataset(classes, layout=layout, root=root, skipped=list(skipped))
    for record in records:
        if not record.fake:
            source = 0
        elif record.generator in generators:
            source = classes.index(record.generator)
        else:
            source = 1 if unnamed_fallback and record.generator is None else UNKNOWN_SOURCE
        group = record.group or (record.generator if record.fake else None)
        item = LabelledImage(source=source, path=record.path, group=group)
        dataset.splits.setdefault(record.split, []).append(item)
    return dataset


def _zoo_class_order(root: Path) -> list[str] | None:
    try:
        return list(json.loads((root / "zoo.json").read_text())["sources"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_image_folder(
    root: Path, splits: Sequence[str] = SPLIT_NAMES, *, layout: str = "imagefolder"
) -> FolderDataset:
    """``<root>/<split>/<source>/<image>``; a ``zoo.json`` beside the splits fixes the order."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset directory not found: {root}")
    present = {s: p for s, p in split_dirs(root).items() if s in splits}
    if not present:
        raise DatasetError(f"{root} has none of the split folders {', '.join(splits)}")
    records: list[RawItem] = []
    skipped: list[Path] = []
    for split, split_dir in present.items():
        for source_dir in subdirs(split_dir):
            real = source_dir.name in REAL_NAMES
            for path in list_images(source_dir, skipped):
                generator = None if real else source_dir.name
                records.append(RawItem(split, path, not real, generator, None))
    if not any(r.fake for r in records):
        raise DatasetError(f"{root} has no generator folders besides the real ones")
    order = _zoo_class_order(root)
    return assemble(
        records,
        layout="zoo" if order and layout == "imagefolder" else layout,
        root=root,
        skipped=skipped,
        class_order=order,
    )


def carve_splits(
    dataset: FolderDataset,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> FolderDataset:
    """Give a dataset the splits training needs, deterministically and per source.

    No ``train`` split (a manifest without a split column, an evaluation-only layout): all
    items are pooled and cut into train/val/test. ``train`` without ``val``: ``val_fraction``
    of train becomes val. Existing splits are never mixed otherwise.
    """
    splits = dict(dataset.splits)
    if "train" not in splits:
        pool = [item for items in splits.values() for item in items]
        train, val, test = _stratified(pool, (val_fraction, test_fraction), seed)
        splits = {"train": train, "val": val, "test": test}
        dataset.notes.append(
            f"no train split: {len(pool)} images cut into train/val/test "
            f"({1 - val_fraction - test_fraction:.2f}/{val_fraction:.2f}/{test_fraction:.2f})"
        )
    elif not splits.get("val") and val_fraction > 0:
        train, val, _ = _stratified(splits["train"], (val_fraction, 0.0), seed)
        splits["train"], splits["val"] = train, val
        dataset.notes.append(f"no val split: {len(val)} train images held out for validation")
    dataset.splits = splits
    return dataset


def _stratified(
    items: Sequence[LabelledImage], fractions: tuple[float, float], seed: int
) -> tuple[list[LabelledImage], list[LabelledImage], list[LabelledImage]]:
    by_source: dict[int, list[LabelledImage]] = {}
    for item in items:
        by_source.setdefault(item.source, []).append(item)
    train: list[LabelledImage] = []
    val: list[LabelledImage] = []
    test: list[LabelledImage] = []
    for source in sorted(by_source):
        group = list(by_source[source])
        random.Random(f"{seed}/{source}").shuffle(group)
        n_val = round(len(group) * fractions[0])
        if fractions[0] > 0:  # enough per source for a threshold that holds (docs/training.md)
            n_val = max(n_val, min(MIN_VAL_PER_SOURCE, len(group) // 5))
        n_test = round(len(group) * fractions[1])
        val += group[:n_val]
        test += group[n_val : n_val + n_test]
        train += group[n_val + n_test :]
    return train, val, test
