"""Dataset layouts: detection and readers on small generated trees, for every layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from clipguard.detector.preprocess import PreprocessConfig
from clipguard.training import zoo
from clipguard.training.data import UNKNOWN_SOURCE, DetectorDataset, LabelledImage, collate_valid
from clipguard.training.folders import DatasetError, FolderDataset, carve_splits
from clipguard.training.layouts import LayoutError, detect_layout, read_dataset
from clipguard.training.manifests import parse_label


def _img(path: Path, colour: tuple[int, int, int] = (90, 120, 150), fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), colour).save(path, format=fmt)
    return path


def _fill(folder: Path, n: int = 2, suffix: str = ".png") -> None:
    for i in range(n):
        _img(folder / f"{i}{suffix}", fmt="JPEG" if suffix == ".jpg" else "PNG")


def _by_source(items, classes) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        name = classes[item.source] if item.source >= 0 else "?"
        counts[name] = counts.get(name, 0) + 1
    return counts


def test_wang2020_classes_and_test_generators(tmp_path: Path) -> None:
    root = tmp_path / "cnndet"
    for cls in ("airplane", "cat"):
        _fill(root / "train" / cls / "0_real")
        _fill(root / "train" / cls / "1_fake")
    _fill(root / "val" / "airplane" / "0_real")
    _fill(root / "val" / "airplane" / "1_fake")
    _fill(root / "test" / "progan" / "cat" / "0_real")
    _fill(root / "test" / "progan" / "cat" / "1_fake")
    _fill(root / "test" / "stylegan" / "0_real", 3)
    _fill(root / "test" / "stylegan" / "1_fake", 3)
    (root / "train" / "cat" / "1_fake" / "notes.txt").write_text("not an image")
    assert detect_layout(root) == "wang2020"
    ds = read_dataset(root)
    assert ds.layout == "wang2020"
    assert ds.classes == ["real", "progan"]  # classes come from the training splits
    assert _by_source(ds.splits["train"], ds.classes) == {"real": 4, "progan": 4}
    test = ds.splits["test"]
    assert {i.group for i in test} == {"progan", "stylegan"}
    stylegan_fakes = [i for i in test if i.group == "stylegan" and i.is_fake]
    assert len(stylegan_fakes) == 3 and all(i.source == UNKNOWN_SOURCE for i in stylegan_fakes)
    assert [p.name for p in ds.skipped] == ["notes.txt"]
    renamed = read_dataset(root, "wang2020", train_generator="ProGAN")
    assert renamed.classes == ["real", "ProGAN"]


def test_ufd_sets_and_shared_real_pool(tmp_path: Path) -> None:
    root = tmp_path / "ufd"
    _fill(root / "laion" / "0_real", 3)
    _fill(root / "guided" / "1_fake", 2)
    _fill(root / "ldm_200" / "1_fake", 2)
    _fill(root / "progan" / "0_real", 2)
    _fill(root / "progan" / "1_fake", 2)
    assert detect_layout(root) == "ufd"
    ds = read_dataset(root)
    assert ds.classes == ["real", "guided", "ldm_200", "progan"]
    assert list(ds.splits) == ["test"]
    items = ds.splits["test"]
    assert sum(not i.is_fake for i in items) == 5
    laion = [i for i in items if not i.is_fake and i.group is None]
    assert len(laion) == 3  # unpaired reals pool for every generator
    assert {i.group for i in items if not i.is_fake and i.group} == {"progan"}


def test_genimage_generators_and_val_as_test(tmp_path: Path) -> None:
    root = tmp_path / "genimage"
    for gen in ("Midjourney", "stable_diffusion_v_1_4"):
        for split in ("train", "val"):
            _fill(root / gen / f"imagenet_{gen.lower()}" / split / "ai")
            _fill(root / gen / f"imagenet_{gen.lower()}" / split / "nature")
    _fill(root / "ADM" / "train" / "ai")  # without the subset folder
    _fill(root / "ADM" / "train" / "nature")
    assert detect_layout(root) == "genimage"
    ds = read_dataset(root)
    assert ds.classes == ["real", "ADM", "Midjourney", "stable_diffusion_v_1_4"]
    assert set(ds.splits) == {"train", "test"}
    assert _by_source(ds.splits["train"], ds.classes) == {
        "real": 6,
        "ADM": 2,
        "Midjourney": 2,
        "stable_diffusion_v_1_4": 2,
    }
    assert {i.group for i in ds.splits["test"]} == {"Midjourney", "stable_diffusion_v_1_4"}


def test_cifake(tmp_path: Path) -> None:
    root = tmp_path / "cifake"
    for split in ("train", "test"):
        _fill(root / split / "REAL", 3, ".jpg")
        _fill(root / split / "FAKE", 2, ".jpg")
    assert detect_layout(root) == "cifake"
    ds = read_dataset(root)
    assert ds.classes == ["real", "FAKE"]
    assert _by_source(ds.splits["test"], ds.classes) == {"real": 3, "FAKE": 2}


def test_generic_image_folder_and_real_names(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    for real_name in ("real", "nature"):
        _fill(root / "train" / real_name)
    _fill(root / "train" / "dalle")
    _fill(root / "train" / "sdxl")
    _fill(root / "validation" / "0_real")
    _fill(root / "validation" / "dalle")
    assert detect_layout(root) == "imagefolder"
    ds = read_dataset(root)
    assert ds.classes == ["real", "dalle", "sdxl"]
    assert set(ds.splits) == {"train", "val"}
    assert _by_source(ds.splits["train"], ds.classes) == {"real": 4, "dalle": 2, "sdxl": 2}


def test_zoo_tree_keeps_its_class_order(tmp_path: Path) -> None:
    root = zoo.write_tree(tmp_path / "zoo", n_per_source=3, size=32, seed=1)
    assert detect_layout(root) == "zoo"
    ds = read_dataset(root)
    assert ds.classes == list(zoo.SOURCES)
    assert sum(len(v) for v in ds.splits.values()) == 3 * len(zoo.SOURCES)


def test_csv_and_jsonl_manifests(tmp_path: Path) -> None:
    for i in range(4):
        _img(tmp_path / "imgs" / f"r{i}.png")
        _img(tmp_path / "imgs" / f"f{i}.png")
    rows = ["path,label,source,split"]
    rows += [f"imgs/r{i}.png,real,,{'train' if i < 3 else 'test'}" for i in range(4)]
    rows += [f"imgs/f{i}.png,1,{'midjourney' if i % 2 else ''},train" for i in range(3)]
    rows += ["imgs/f3.png,fake,dalle,test", "imgs/missing.png,1,dalle,train", "imgs/r0.png,maybe,,"]
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    assert detect_layout(csv_path) == "manifest"
    ds = read_dataset(csv_path)
    assert ds.classes == ["real", "midjourney"]  # dalle appears in test only
    train = ds.splits["train"]
    assert sorted(i.source for i in train) == [UNKNOWN_SOURCE, UNKNOWN_SOURCE, 0, 0, 0, 1]
    assert len(ds.skipped) == 1 and ds.notes  # the missing file; the unparseable label row
    assert [i.group for i in ds.splits["test"] if i.is_fake] == ["dalle"]

    jsonl = tmp_path / "sub" / "data.jsonl"
    jsonl.parent.mkdir()
    lines = [{"path": str(tmp_path / "imgs" / f"f{i}.png"), "label": "ai"} for i in range(4)]
    lines += [{"path": f"../imgs/r{i}.png", "label": 0} for i in range(4)]
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    assert detect_layout(jsonl.parent) == "manifest"
    ds = read_dataset(jsonl)
    assert ds.classes == ["real", "fake"]  # no generator named: one generic class
    assert list(ds.splits) == ["all"]
    carve_splits(ds, val_fraction=0.25, test_fraction=0.25, seed=0)
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 4, "val": 2, "test": 2}


def test_labels_and_layout_errors(tmp_path: Path) -> None:
    assert parse_label("AI") and parse_label(1) and not parse_label("nature")
    with pytest.raises(ValueError):
        parse_label("perhaps")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError, match="--layout"):
        detect_layout(tmp_path / "empty")
    with pytest.raises(LayoutError, match="unknown layout"):
        read_dataset(tmp_path / "empty", "coco")
    only_real = tmp_path / "reals"
    _fill(only_real / "train" / "real")
    with pytest.raises(DatasetError):
        read_dataset(only_real)


def test_carve_val_from_train_is_stratified_and_deterministic(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    _fill(root / "train" / "real", 10)
    _fill(root / "train" / "gan", 10)
    first = carve_splits(read_dataset(root), val_fraction=0.2, seed=3)
    second = carve_splits(read_dataset(root), val_fraction=0.2, seed=3)
    assert [i.path for i in first.splits["val"]] == [i.path for i in second.splits["val"]]
    assert _by_source(first.splits["val"], first.classes) == {"real": 2, "gan": 2}
    assert len(first.splits["train"]) == 16


def test_carved_val_takes_enough_of_every_source() -> None:
    """10% of a 150-image source is 15: too few to set a threshold on; it takes 30 (a fifth)."""
    items = [LabelledImage(source=s, path=Path(f"{s}-{i}.png")) for s in (0, 1) for i in range(150)]
    items += [LabelledImage(source=2, path=Path(f"2-{i}.png")) for i in range(1000)]
    ds = FolderDataset(classes=["real", "gan", "diffusion"], splits={"train": items})
    carve_splits(ds, val_fraction=0.1, seed=0)
    assert _by_source(ds.splits["val"], ds.classes) == {"real": 30, "gan": 30, "diffusion": 100}
    assert len(ds.splits["train"]) == len(items) - 160


def test_corrupt_images_are_skipped_and_counted(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    _fill(root / "train" / "real", 2)
    _fill(root / "train" / "gan", 2)
    (root / "train" / "gan" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "train" / "real" / "empty.jpg").write_bytes(b"")
    ds = read_dataset(root)
    dataset = DetectorDataset(ds.splits["train"], PreprocessConfig(image_size=16))
    pixels, is_fake, _, dropped = collate_valid([dataset[i] for i in range(len(dataset))])
    assert dropped == 2 and pixels.shape == (4, 3, 16, 16)
    assert sorted(is_fake.tolist()) == [0.0, 0.0, 1.0, 1.0]
