"""The new zoo families: deterministic per seed, fast, and each generator its own fingerprint.

Fingerprints are checked on the pixels with plain numpy: the power spectrum of the high-pass
residual (what an upsampler, a JPEG grid or a periodic pattern leaves) and the residual's
energy per pixel phase on a 16-px grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipguard.training import zoo, zoo_families
from clipguard.training.zoo_families import FAMILIES, NEW_GENERATORS, REAL

SOURCES = (REAL, *NEW_GENERATORS)
HIGH_PASS = (0.25, 0.5, 0.25)


def _images(source: str, seeds: range, size: int = 64) -> list[np.ndarray]:
    return [
        np.asarray(zoo_families.render(source, np.random.default_rng([7, s]), size), np.float32)
        for s in seeds
    ]


def _residual(image: np.ndarray) -> np.ndarray:
    return (image - zoo._blur(image, HIGH_PASS)).mean(-1)


def _power(images: list[np.ndarray]) -> np.ndarray:
    """Mean normalised power spectrum of the high-pass residual (index [fy, fx])."""
    spectra = []
    for image in images:
        p = np.abs(np.fft.fft2(_residual(image))) ** 2
        spectra.append(p / p.sum())
    return np.mean(spectra, axis=0)


def _high_band(power: np.ndarray) -> float:
    return float(power[16:49, 16:49].sum())


@pytest.fixture(scope="module")
def spectra() -> dict[str, np.ndarray]:
    return {source: _power(_images(source, range(16))) for source in SOURCES}


def test_families_cover_the_new_generators_once() -> None:
    members = [g for family in zoo_families.NEW_FAMILIES for g in FAMILIES[family]]
    assert sorted(members) == sorted(NEW_GENERATORS)
    assert len(set(members)) == len(members) >= 10
    assert all(len(FAMILIES[f]) >= 2 for f in zoo_families.NEW_FAMILIES)
    assert FAMILIES["zoo"] == zoo.GENERATORS
    assert zoo_families.ALL_SOURCES[0] == REAL


def test_expand_names_families_and_refuses_unknown() -> None:
    assert zoo_families.expand(["vae", "real"]) == (REAL, "vae_f4", "vae_f4_sharp")
    assert zoo_families.expand(["new"]) == NEW_GENERATORS
    assert zoo_families.expand(["all"]) == zoo_families.ALL_SOURCES
    with pytest.raises(ValueError, match=r"unknown source.*'nope'.*families"):
        zoo_families.expand(["vae", "nope"])


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("size", [32, 64, 96])
def test_every_source_renders_rgb_at_any_multiple_of_8(source: str, size: int) -> None:
    image = zoo_families.render(source, np.random.default_rng(0), size)
    assert image.mode == "RGB" and image.size == (size, size)


def test_bad_sizes_are_refused() -> None:
    for size in (60, 16, 64.0):
        with pytest.raises(ValueError, match="multiple of 8"):
            zoo_families.render("vae_f4", np.random.default_rng(0), size)  # type: ignore[arg-type]


def test_generation_is_deterministic_by_seed() -> None:
    first = zoo_families.generate(24, seed=3, sources=["real", "new"])
    again = zoo_families.generate(24, seed=3, sources=["real", "new"])
    other = zoo_families.generate(24, seed=4, sources=["real", "new"])
    assert [s.source for s in first] == [s.source for s in again]
    assert [np.asarray(s.image).tobytes() for s in first] == [
        np.asarray(s.image).tobytes() for s in again
    ]
    assert [np.asarray(s.image).tobytes() for s in first] != [
        np.asarray(s.image).tobytes() for s in other
    ]
    assert sum(s.source == REAL for s in first) == 12
    assert {s.source for s in first} - {REAL} == set(NEW_GENERATORS)


def test_same_rng_state_paints_the_same_scene() -> None:
    """Content is shared with ``real``; only the last steps (the fingerprint) differ."""

    def coarse(image: Image.Image) -> np.ndarray:
        return np.asarray(image, np.float32).reshape(8, 8, 8, 8, 3).mean(axis=(1, 3))

    real = coarse(zoo_families.render(REAL, np.random.default_rng(5), 64))
    other_scene = coarse(zoo_families.render(REAL, np.random.default_rng(6), 64))
    for source in NEW_GENERATORS:
        fake = coarse(zoo_families.render(source, np.random.default_rng(5), 64))
        assert np.abs(fake - real).mean() < np.abs(other_scene - real).mean() / 3, source


def test_each_family_leaves_its_designed_trace(spectra: dict[str, np.ndarray]) -> None:
    """Shared within a family, different between siblings, measured against real."""
    p, real = spectra, spectra[REAL]

    def vs_real(source: str, *bins: tuple[int, int]) -> float:
        return sum(p[source][b] for b in bins) / sum(real[b] for b in bins)

    # deconv: the transposed-conv checkerboard at Nyquist; only the x4 stack has period 4
    assert vs_real("deconv4_s2", (32, 32)) > 100 and vs_real("deconv3_x4", (32, 32)) > 100
    assert vs_real("deconv3_x4", (16, 16)) > 20 > 2 > vs_real("deconv4_s2", (16, 16))
    # vae: the period-4 decoder bias; the sharpened one has far less Nyquist checkerboard
    assert vs_real("vae_f4", (16, 16)) > 20 and vs_real("vae_f4_sharp", (16, 16)) > 20
    assert p["vae_f4"][32, 32] > 5 * p["vae_f4_sharp"][32, 32]
    # denoise: the residue is smoothed away (little high band); the schedules differ by 2x
    assert _high_band(p["ddpm_linear"]) < 0.3 * _high_band(real)
    assert _high_band(p["ddim_cosine"]) < 0.3 * _high_band(real)
    assert _high_band(p["ddpm_linear"]) > 1.5 * _high_band(p["ddim_cosine"])
    # jpeg: over-smooth upsampled images; only "JPEG after" keeps the 8-px grid's x harmonic
    assert _high_band(p["jpeg_before_up"]) < 0.5 * _high_band(real)
    assert p["jpeg_after_up"][0, 32] > 20 * p["jpeg_before_up"][0, 32]
    # spectral: a peak near a third of the sampling rate vs an 8-px grid
    assert vs_real("peak_p3", (0, 21)) > 50 > 2 > vs_real("peak_grid8", (0, 21))
    assert vs_real("peak_grid8", (0, 8), (8, 0)) > 4


def _fingerprint(images: list[np.ndarray]) -> np.ndarray:
    """Residual energy per pixel phase (16-px grid), low/high band shares, residual level."""
    energy = [np.abs(_residual(image)) for image in images]
    phase = np.mean(energy, axis=0).reshape(4, 16, 4, 16).mean(axis=(0, 2))
    power = _power(images)
    low = power[:8, :8].sum() + power[-8:, :8].sum() + power[:8, -8:].sum()
    low += power[-8:, -8:].sum()
    bands = np.log10([low, _high_band(power), float(np.mean(energy))])
    return np.concatenate([(phase / phase.mean()).ravel(), bands])


def test_every_source_is_identified_by_its_fingerprint() -> None:
    """Fingerprints from 16 fresh images are nearest to their own source's, for every source."""
    reference = {s: _fingerprint(_images(s, range(16))) for s in SOURCES}
    for source in SOURCES:
        probe = _fingerprint(_images(source, range(100, 116)))
        distances = {s: float(np.abs(probe - ref).max()) for s, ref in reference.items()}
        assert min(distances, key=distances.__getitem__) == source, distances


def test_write_tree_lists_sources_and_formats(tmp_path: Path) -> None:
    root = zoo_families.write_tree(
        tmp_path / "z", 4, size=32, sources=["real", "spectral"], fmt="webp"
    )
    meta = json.loads((root / "zoo.json").read_text())
    assert meta["sources"] == [REAL, "peak_p3", "peak_grid8"]
    files = sorted(root.rglob("*.webp"))
    assert len(files) == 12
    with Image.open(files[0]) as image:
        assert image.format == "WEBP" and image.size == (32, 32)


def test_the_original_zoo_alone_is_generated_as_before() -> None:
    """No camera JPEG without the new families: zoo-only selections equal ``zoo.generate``."""
    ours = zoo_families.generate(10, seed=2, sources=["real", "zoo"])
    theirs = zoo.generate(10, seed=2)
    assert [s.source for s in ours] == [s.source for s in theirs]
    assert all(
        np.array_equal(np.asarray(a.image), np.asarray(b.image))
        for a, b in zip(ours, theirs, strict=True)
    )
