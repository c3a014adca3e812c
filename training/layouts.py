"""The public dataset layouts, read natively and detected from the folder tree.

=============  =============================================================================
``wang2020``   CNNDetection: ``{train,val,test}/[<class>/]{0_real,1_fake}``; the test split
               has one folder per generator, ``test/<gen>/[<class>/]{0_real,1_fake}``. The
               training fakes are all ProGAN in the original data (``train_generator``).
``ufd``        UniversalFakeDetect-style: no split folders, one folder per set,
               ``<name>/[<class>/]{0_real,1_fake}``; a set with ``1_fake`` is a generator,
               a set with only ``0_real`` is a pool of reals shared by all generators.
``genimage``   GenImage: ``<Generator>/[<subset>/]{train,val}/{ai,nature}``; GenImage's
               ``val`` is its benchmark test set and is read as ``test``.
``cifake``     CIFAKE: ``{train,test}/{REAL,FAKE}``.
``imagefolder`` ``<split>/<source>/`` with ``real``, ``0_real``, ``nature``, ``REAL`` real.
``zoo``        an ImageFolder tree written by :func:`clipguard.training.zoo.write_tree`.
``manifest``   a CSV or JSONL file: ``path,label[,source][,split]`` (see ``manifests``).
=============  =============================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from clipguard.training.folders import (
    DatasetError,
    FolderDataset,
    RawItem,
    assemble,
    list_images,
    read_image_folder,
    split_dirs,
    subdirs,
)
from clipguard.training.manifests import MANIFEST_SUFFIXES, read_manifest_file

LAYOUTS = ("auto", "wang2020", "ufd", "genimage", "cifake", "imagefolder", "zoo", "manifest")
REAL_DIR, FAKE_DIR = "0_real", "1_fake"
LABEL_DIRS = frozenset({REAL_DIR, FAKE_DIR})
DEFAULT_TRAIN_GENERATOR = "progan"


class LayoutError(DatasetError):
    """The tree matches no supported layout, or not the one asked for."""


def _label_dirs(base: Path, max_depth: int = 2) -> list[Path]:
    """``0_real`` / ``1_fake`` folders at ``base`` or up to ``max_depth`` levels below it."""
    found: list[Path] = []
    frontier = [base]
    for _ in range(max_depth + 1):
        nxt: list[Path] = []
        for folder in frontier:
            for child in subdirs(folder):
                (found if child.name in LABEL_DIRS else nxt).append(child)
        frontier = nxt
    return found


def _records_from_label_dirs(
    base: Path, split: str, generator: str, group: str | None, skipped: list[Path]
) -> list[RawItem]:
    records = []
    for label_dir in _label_dirs(base):
        fake = label_dir.name == FAKE_DIR
        for path in list_images(label_dir, skipped):
            records.append(RawItem(split, path, fake, generator if fake else None, group))
    return records


def read_wang2020(root: Path, *, train_generator: str = DEFAULT_TRAIN_GENERATOR) -> FolderDataset:
    records: list[RawItem] = []
    skipped: list[Path] = []
    for split, split_dir in split_dirs(root).items():
        direct = [d for d in subdirs(split_dir) if d.name in LABEL_DIRS]
        if split != "test" or direct:
            group = train_generator if split == "test" else None
            records += _records_from_label_dirs(split_dir, split, train_generator, group, skipped)
            continue
        for gen_dir in subdirs(split_dir):  # test/<gen>/[<class>/]{0_real,1_fake}
            records += _records_from_label_dirs(gen_dir, split, gen_dir.name, gen_dir.name, skipped)
    return assemble(records, layout="wang2020", root=root, skipped=skipped)


def read_ufd(root: Path) -> FolderDataset:
    records: list[RawItem] = []
    skipped: list[Path] = []
    for set_dir in subdirs(root):
        dirs = _label_dirs(set_dir)
        paired = {d.name for d in dirs} == LABEL_DIRS  # reals of this set go with its fakes
        # A set of reals only (LAION, ImageNet) has no group: its reals pair with every fake.
        records += _records_from_label_dirs(
            set_dir, "test", set_dir.name, set_dir.name if paired else None, skipped
        )
    return assemble(records, layout="ufd", root=root, skipped=skipped)


_GENIMAGE_SPLITS = {"train": "train", "val": "test"}
_GENIMAGE_LABELS = {"ai": True, "nature": False}


def _genimage_split_parents(gen_dir: Path) -> list[Path]:
    """``<Generator>`` itself or its subset folder(s): the ones holding train/val."""
    candidates = [gen_dir, *subdirs(gen_dir)]
    return [c for c in candidates if any(d.name in _GENIMAGE_SPLITS for d in subdirs(c))]


def read_genimage(root: Path) -> FolderDataset:
    records: list[RawItem] = []
    skipped: list[Path] = []
    for gen_dir in subdirs(root):
        for parent in _genimage_split_parents(gen_dir):
            for split_dir in subdirs(parent):
                split = _GENIMAGE_SPLITS.get(split_dir.name)
                if split is None:
                    continue
                for label_dir in subdirs(split_dir):
                    fake = _GENIMAGE_LABELS.get(label_dir.name)
                    if fake is None:
                        continue
                    generator = gen_dir.name if fake else None
                    for path in list_images(label_dir, skipped):
                        records.append(RawItem(split, path, fake, generator, gen_dir.name))
    return assemble(records, layout="genimage", root=root, skipped=skipped)


def read_cifake(root: Path) -> FolderDataset:
    records: list[RawItem] = []
    skipped: list[Path] = []
    for split, split_dir in split_dirs(root).items():
        for label_dir in subdirs(split_dir):
            if label_dir.name not in {"REAL", "FAKE"}:
                continue
            fake = label_dir.name == "FAKE"
            for path in list_images(label_dir, skipped):
                records.append(RawItem(split, path, fake, "FAKE" if fake else None, None))
    return assemble(records, layout="cifake", root=root, skipped=skipped)


def _is_genimage(root: Path) -> bool:
    return any(
        any(
            {d.name for d in subdirs(split_dir)} & set(_GENIMAGE_LABELS)
            for split_dir in subdirs(parent)
            if split_dir.name in _GENIMAGE_SPLITS
        )
        for gen_dir in subdirs(root)
        for parent in _genimage_split_parents(gen_dir)
    )


def _is_cifake(splits: dict[str, Path]) -> bool:
    names = [{d.name for d in subdirs(p)} for p in splits.values()]
    return any(n for n in names) and all(n <= {"REAL", "FAKE"} for n in names)


def _single_manifest(root: Path) -> Path | None:
    try:
        files = [p for p in root.iterdir() if p.is_file() and p.suffix in MANIFEST_SUFFIXES]
    except OSError:
        return None
    return files[0] if len(files) == 1 else None


def detect_layout(root: Path) -> str:
    """Name the layout of ``root`` (a folder, or a CSV/JSONL manifest file)."""
    root = Path(root)
    if root.is_file():
        if root.suffix in MANIFEST_SUFFIXES:
            return "manifest"
        raise LayoutError(f"{root} is a file but not a .csv/.jsonl manifest")
    if not root.is_dir():
        raise LayoutError(f"dataset not found: {root}")
    if (root / "zoo.json").is_file():
        return "zoo"
    splits = split_dirs(root)
    if splits:
        if _is_cifake(splits):
            return "cifake"
        # ``1_fake`` is CNNDetection's alone (ImageFolder trees may use ``0_real`` too).
        if any(d.name == FAKE_DIR for p in splits.values() for d in _label_dirs(p)):
            return "wang2020"
        return "imagefolder"
    if _is_genimage(root):
        return "genimage"
    if any(_label_dirs(d, max_depth=1) for d in subdirs(root)):
        return "ufd"
    if _single_manifest(root) is not None:
        return "manifest"
    raise LayoutError(
        f"cannot tell the layout of {root}: expected split folders (train/val/test), "
        "GenImage generator folders, UniversalFakeDetect 0_real/1_fake sets, or a CSV/JSONL "
        f"manifest; name one with --layout ({', '.join(LAYOUTS[1:])})"
    )


def _manifest(root: Path) -> FolderDataset:
    path = root if root.is_file() else _single_manifest(root)
    if path is None:
        raise LayoutError(f"{root} holds no single .csv/.jsonl manifest")
    return read_manifest_file(path)


_READERS: dict[str, Callable[[Path], FolderDataset]] = {
    "wang2020": read_wang2020,
    "ufd": read_ufd,
    "genimage": read_genimage,
    "cifake": read_cifake,
    "imagefolder": read_image_folder,
    "zoo": read_image_folder,
    "manifest": _manifest,
}


def read_dataset(
    root: str | Path, layout: str = "auto", *, train_generator: str | None = None
) -> FolderDataset:
    """Read any supported layout; ``auto`` detects it."""
    root = Path(root)
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not root.exists():
        raise LayoutError(f"dataset not found: {root}")
    chosen = detect_layout(root) if layout == "auto" else layout
    if chosen == "wang2020" and train_generator:
        return read_wang2020(root, train_generator=train_generator)
    return _READERS[chosen](root)
