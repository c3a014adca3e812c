"""Generic ImageFolder layout: ``<root>/<split>/<source>/<image>``.

``real``, ``0_real``, ``nature`` and ``REAL`` mean real; every other folder is a generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from clipguard.training.data import LabelledImage

REAL_NAMES = frozenset({"real", "0_real", "nature", "REAL"})
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


@dataclass
class FolderDataset:
    """Items per split, the class list (``real`` first), and what was skipped."""

    classes: list[str]
    splits: dict[str, list[LabelledImage]] = field(default_factory=dict)
    skipped: list[Path] = field(default_factory=list)


def _source_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir())


def read_image_folder(
    root: Path, splits: Sequence[str] = ("train", "val", "test")
) -> FolderDataset:
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory not found: {root}")
    present = [s for s in splits if (root / s).is_dir()]
    if not present:
        raise ValueError(f"{root} has none of the split folders {', '.join(splits)}")
    generators = sorted(
        {d.name for s in present for d in _source_dirs(root / s) if d.name not in REAL_NAMES}
    )
    if not generators:
        raise ValueError(f"{root} has no generator folders besides the real ones")
    classes = ["real", *generators]
    dataset = FolderDataset(classes)
    for split in present:
        items: list[LabelledImage] = []
        for source_dir in _source_dirs(root / split):
            index = 0 if source_dir.name in REAL_NAMES else classes.index(source_dir.name)
            for path in sorted(source_dir.rglob("*")):
                if not path.is_file():
                    continue
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    items.append(LabelledImage(source=index, path=path))
                else:
                    dataset.skipped.append(path)
        dataset.splits[split] = items
    return dataset
