"""A second synthetic benchmark whose fingerprints live at the pixel level, unlike the zoo's.

Used to choose the default preprocessing on data the detector was not designed around
(docs/training.md "Choosing the preprocessing") and by the test that holds the default to
it. The zoo makes square 64-pixel images whose generators all upsample x2; here images have
varied, non-square sizes (80-160 pixels a side, like a benchmark of small crops) and the
generators leave traces of other periods:

- ``real``: full-resolution render, slight optical blur, white sensor noise;
- ``x4_decoder``: a quarter-resolution latent upsampled x4 (bilinear) plus a fixed 4x4 tile,
  as a VAE decoder leaves (period 4, phase fixed to the image origin);
- ``nyquist_noise``: full resolution, its noise modulated by a checkerboard (all energy at
  the highest frequency: period 2, as a transposed convolution's aliasing);
- ``block8_vae``: too clean (no sensor noise) with a faint fixed 8x8 tile, as an x8
  latent decoder leaves (period 8, like JPEG's blocks).

Every trace is a few grey levels (standard deviation 4 of 255), so a resize that shrinks the
image by 1.25-2.5x (what the tiny backbone's 64-pixel input does to these images) averages it
away; a native crop keeps it. Same scene renderer for every source, PNG for every source (no
format shortcut).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from clipguard.training.zoo import Array, _blur, _gauss_taps, _sample_scene

SOURCES: tuple[str, ...] = ("real", "x4_decoder", "nyquist_noise", "block8_vae")
SPLITS = {"train": 0.7, "val": 0.1, "test": 0.2}


def _fixed(shape: tuple[int, ...], name: str, amplitude: float) -> Array:
    rng = np.random.default_rng(sum(map(ord, name)))
    pattern = rng.normal(0.0, 1.0, shape).astype(np.float32)
    return (pattern - pattern.mean()) * (amplitude / (pattern.std() + 1e-6))


def _tile(pattern: Array, height: int, width: int) -> Array:
    period = pattern.shape[0]
    reps = (height // period + 1, width // period + 1, 1)
    return np.tile(pattern, reps)[:height, :width]


def _render(source: str, rng: np.random.Generator, height: int, width: int) -> Array:
    scene = _sample_scene(rng)
    side = max(height, width)
    if source == "x4_decoder":
        low = scene.rasterise(side // 4)
        low = low + rng.normal(0.0, 1.5, low.shape).astype(np.float32)
        up = np.asarray(
            Image.fromarray(np.clip(low, 0, 255).astype(np.uint8)).resize(
                (side, side), Image.Resampling.BILINEAR
            ),
            dtype=np.float32,
        )[:height, :width]
        return up + _tile(_fixed((4, 4, 3), source, 4.0), height, width)
    img = scene.rasterise(side)[:height, :width]
    if source == "real":
        img = _blur(img, _gauss_taps(rng.uniform(0.3, 0.7)))
        return img + rng.normal(0.0, rng.uniform(2.0, 4.0), img.shape).astype(np.float32)
    if source == "nyquist_noise":
        y, x = np.mgrid[0:height, 0:width]
        checker = np.where((x + y) % 2 == 0, 1.0, -1.0).astype(np.float32)[..., None]
        noise = np.abs(rng.normal(0.0, 5.0, img.shape)).astype(np.float32)
        return img + checker * noise
    if source == "block8_vae":
        return _blur(img, _gauss_taps(0.6)) + _tile(_fixed((8, 8, 3), source, 4.0), height, width)
    raise ValueError(f"unknown source {source!r}; known: {list(SOURCES)}")


def render(source: str, rng: np.random.Generator, min_side: int = 80, max_side: int = 160):
    """One RGB image of ``source``; its size is drawn from ``rng`` (multiples of 4)."""
    height, width = (4 * int(rng.integers(min_side // 4, max_side // 4 + 1)) for _ in range(2))
    img = _render(source, rng, height, width)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))


def write_tree(
    root: Path,
    n_per_source: int,
    *,
    seed: int = 0,
    min_side: int = 80,
    max_side: int = 160,
    real_fmt: str = "PNG",
    fake_fmt: str = "PNG",
) -> Path:
    """An ImageFolder tree ``root/{train,val,test}/<source>/*``; fresh scenes per split.

    ``n_per_source`` images per generator and as many reals as all generators together
    (balanced classes).

    ``real_fmt``/``fake_fmt`` (``PNG`` or ``JPEG``) plant a format shortcut when they differ
    (the ``eval --align`` test).
    """
    root = Path(root)
    for index, source in enumerate(SOURCES):
        fmt = real_fmt if source == "real" else fake_fmt
        ext = ".png" if fmt == "PNG" else ".jpg"
        serial = 0
        count = n_per_source * (len(SOURCES) - 1 if source == "real" else 1)
        for split, fraction in SPLITS.items():
            folder = root / split / source
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(max(1, round(count * fraction))):
                rng = np.random.default_rng([seed, index, serial, 7])
                serial += 1
                image = render(source, rng, min_side, max_side)
                image.save(
                    folder / f"{j:05d}{ext}", fmt, **({"quality": 90} if ext == ".jpg" else {})
                )
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description="write the pixel-fingerprint benchmark")
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-source", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_tree(args.out, args.per_source, seed=args.seed)


if __name__ == "__main__":
    main()
