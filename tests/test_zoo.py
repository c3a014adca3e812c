"""Synthetic generator zoo: contract, determinism, tree layout and learnability (numpy only)."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipguard.training import zoo


def _pixels(image: Image.Image) -> bytes:
    return np.asarray(image).tobytes()


def test_sources_contract() -> None:
    assert zoo.SOURCES[0] == "real"
    assert len(zoo.SOURCES) >= 5
    assert len(set(zoo.SOURCES)) == len(zoo.SOURCES)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", name) for name in zoo.SOURCES)
    assert zoo.SOURCES[1:] == zoo.GENERATORS


@pytest.mark.parametrize("source", zoo.SOURCES)
@pytest.mark.parametrize("size", [16, 64, 96])
def test_render_every_source(source: str, size: int) -> None:
    image = zoo.render(source, np.random.default_rng(0), size)
    assert image.mode == "RGB"
    assert image.size == (size, size)


def test_same_rng_state_paints_same_scene_for_every_source() -> None:
    """Content is shared; only the fingerprint differs (the classifier cannot use content)."""

    def coarse(image: Image.Image) -> np.ndarray:
        x = np.asarray(image, np.float32)
        return x.reshape(8, 8, 8, 8, 3).mean(axis=(1, 3))

    real = coarse(zoo.render("real", np.random.default_rng(5), 64))
    other_scene = coarse(zoo.render("real", np.random.default_rng(6), 64))
    for source in zoo.GENERATORS:
        fake = coarse(zoo.render(source, np.random.default_rng(5), 64))
        assert np.abs(fake - real).mean() < np.abs(other_scene - real).mean() / 3


def test_generate_is_deterministic_per_seed() -> None:
    first = zoo.generate(12, seed=3)
    again = zoo.generate(12, seed=3)
    other = zoo.generate(12, seed=4)
    assert [s.source for s in first] == [s.source for s in again]
    assert [_pixels(s.image) for s in first] == [_pixels(s.image) for s in again]
    assert [_pixels(s.image) for s in first] != [_pixels(s.image) for s in other]


def test_generate_balance_and_fields() -> None:
    samples = zoo.generate(40, size=32, seed=1)
    counts = {name: sum(s.source == name for s in samples) for name in zoo.SOURCES}
    assert counts["real"] == 20
    assert all(counts[name] == 5 for name in zoo.GENERATORS)
    for sample in samples:
        assert sample.image.size == (32, 32)
        assert sample.is_fake == (sample.source != "real")
        assert zoo.SOURCES[sample.label] == sample.source


def test_generate_subsets_and_fraction() -> None:
    quarter = zoo.generate(40, seed=0, real_fraction=0.25)
    assert sum(not s.is_fake for s in quarter) == 10
    fakes = zoo.generate(9, seed=0, sources=["nearest_gan", "upconv_gan", "bilinear_diffusion"])
    assert {s.source for s in fakes} == {"nearest_gan", "upconv_gan", "bilinear_diffusion"}
    assert all(s.is_fake for s in fakes)
    assert all(not s.is_fake for s in zoo.generate(4, seed=0, sources=["real"]))
    assert zoo.generate(0) == []


@pytest.mark.parametrize("size", [0, 8, 15, 17, 63, -64, 32.0, True])
def test_bad_size_raises(size: object) -> None:
    with pytest.raises(ValueError, match="size"):
        zoo.render("real", np.random.default_rng(0), size)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        zoo.generate(2, size=size)  # type: ignore[arg-type]


def test_unknown_source_and_bad_arguments_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown source"):
        zoo.render("midjourney", np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown source"):
        zoo.generate(4, sources=["real", "midjourney"])
    with pytest.raises(ValueError, match="unknown source"):
        zoo.write_tree(tmp_path, 2, sources=["nope"])
    with pytest.raises(ValueError, match="real_fraction"):
        zoo.generate(4, real_fraction=1.5)
    with pytest.raises(ValueError, match="sum to 1"):
        zoo.write_tree(tmp_path, 2, splits={"train": 0.5, "val": 0.1})
    with pytest.raises(ValueError, match="fmt"):
        zoo.write_tree(tmp_path, 2, fmt="gif")


def test_write_tree_layout(tmp_path: Path) -> None:
    root = zoo.write_tree(tmp_path / "zoo", 10, size=32, seed=2)
    assert root == tmp_path / "zoo"
    manifest = json.loads((root / "zoo.json").read_text())
    assert manifest["sources"] == list(zoo.SOURCES)
    assert manifest["splits"] == {"train": 8, "val": 1, "test": 1}
    digests: set[str] = set()
    for split, count in manifest["splits"].items():
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(zoo.SOURCES)
        for source in zoo.SOURCES:
            files = sorted((root / split / source).glob("*.png"))
            assert len(files) == count
            for path in files:
                with Image.open(path) as image:
                    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
                    digests.add(hashlib.sha256(image.tobytes()).hexdigest())
    assert len(digests) == 10 * len(zoo.SOURCES)  # no image repeats across splits or sources


def test_write_tree_jpeg(tmp_path: Path) -> None:
    root = zoo.write_tree(tmp_path, 2, size=16, fmt="jpeg", splits={"train": 1.0})
    files = sorted((root / "train" / "real").iterdir())
    assert [p.suffix for p in files] == [".jpg", ".jpg"]
    with Image.open(files[0]) as image:
        assert image.format == "JPEG"


# ---------------------------------------------------------------------------- learnability
# If a dozen hand-made residual statistics and a nearest-centroid rule separate the sources,
# the fingerprints are real and consistent, and a small ViT trained briefly can learn them.


def _features(image: Image.Image) -> np.ndarray:
    x = np.asarray(image, np.float32)
    hp = x[1:-1, 1:-1] - 0.25 * (x[:-2, 1:-1] + x[2:, 1:-1] + x[1:-1, :-2] + x[1:-1, 2:])
    phases = [hp[a::2, b::2].mean(axis=(0, 1)) for a in (0, 1) for b in (0, 1)]
    energy = np.log(np.median(np.abs(hp), axis=(0, 1)) + 0.1)
    g = x.mean(axis=2)
    within = np.abs(g[:, 0::2] - g[:, 1::2]).mean(), np.abs(g[0::2] - g[1::2]).mean()
    across = np.abs(g[:, 1:-1:2] - g[:, 2::2]).mean(), np.abs(g[1:-1:2] - g[2::2]).mean()
    h = hp.mean(axis=2)
    h = h - h.mean()
    var = (h * h).mean() + 1e-6
    lags = [(h[:, :-d] * h[:, d:]).mean() / var for d in (1, 2)]
    lags += [(h[:-d] * h[d:]).mean() / var for d in (1, 2)]
    lags += [(h[:-1, :-1] * h[1:, 1:]).mean() / var, (h[:-1, 1:] * h[1:, :-1]).mean() / var]
    return np.concatenate([*phases, energy, np.log(np.divide(within, across)), lags])


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _featurise(
    samples: list[zoo.ZooSample], jpeg_quality: int | None
) -> tuple[np.ndarray, np.ndarray]:
    images = [s.image if jpeg_quality is None else _jpeg(s.image, jpeg_quality) for s in samples]
    return np.stack([_features(im) for im in images]), np.array([s.label for s in samples])


@pytest.mark.parametrize("jpeg_quality", [None, 90])
def test_fingerprints_are_separable_by_nearest_centroid(jpeg_quality: int | None) -> None:
    x_train, y_train = _featurise(zoo.generate(200, seed=100), jpeg_quality)
    x_test, y_test = _featurise(zoo.generate(200, seed=200), jpeg_quality)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    centroids = np.stack([x_train[y_train == k].mean(axis=0) for k in range(len(zoo.SOURCES))])
    predicted = np.argmin(((x_test[:, None] - centroids) ** 2).sum(axis=-1), axis=1)

    binary_accuracy = ((predicted > 0) == (y_test > 0)).mean()
    source_accuracy = (predicted == y_test).mean()
    assert binary_accuracy > 0.9, binary_accuracy
    assert source_accuracy > 0.9, source_accuracy
