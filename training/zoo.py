"""Synthetic generator zoo: procedural "real" photos and fake generators with fingerprints.

Tests and the demo cannot download a dataset, yet the detector has to learn something real
detectors learn: not *what* is in a picture but *how its pixels were made*. So every image,
real or fake, comes from one shared procedural scene renderer (same scene distribution for
every source), and only the last step differs:

- ``real`` rasterises the scene at full resolution, applies a slight optical blur and adds
  i.i.d. gaussian sensor noise, like a camera.
- each fake generator rasterises at half resolution and upsamples x2 its own way, leaving a
  fixed, generator-specific trace, as GAN and diffusion decoders do (checkerboards from
  transposed convolutions, duplicated blocks, per-phase pixel-shuffle gains, over-smooth
  interpolation with a spectral peak).

The fingerprints are a few grey levels strong: a from-scratch tiny ViT learns them in a minute
on a CPU, and they survive a JPEG re-encode at quality 90. Only numpy and Pillow are used, so
importing this module is cheap (no torch).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

Array = npt.NDArray[np.float32]
PhaseTaps = tuple[Sequence[float], Sequence[float]]

REAL = "real"
SOURCES: tuple[str, ...] = (
    REAL,
    "upconv_gan",
    "nearest_gan",
    "pixelshuffle_diffusion",
    "bilinear_diffusion",
)
"""Class names; index 0 is always ``real`` (the checkpoint contract in DESIGN.md)."""

GENERATORS: tuple[str, ...] = SOURCES[1:]

MIN_SIZE = 16
DEFAULT_SPLITS: Mapping[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}
_FORMATS = {"png": ("PNG", ".png"), "jpeg": ("JPEG", ".jpg"), "jpg": ("JPEG", ".jpg")}


@dataclass(frozen=True)
class ZooSample:
    """One synthetic image and the source that made it."""

    image: Image.Image
    source: str

    @property
    def is_fake(self) -> bool:
        """True for every source except ``real``."""
        return self.source != REAL

    @property
    def label(self) -> int:
        """Class index in :data:`SOURCES` (0 = real)."""
        return SOURCES.index(self.source)


# --------------------------------------------------------------------------- scene renderer
# A scene is a list of layers in normalised [0, 1] coordinates, so the same scene can be
# rasterised at any resolution: full size for ``real``, half size for the generators. Each
# layer is a closure ``(res) -> (alpha, colour)``; sampling happens once, before rasterising.

Layer = Callable[[int], tuple[Array, Array]]


@functools.lru_cache(maxsize=32)
def _coords(res: int) -> tuple[Array, Array]:
    """Pixel-centre coordinates in [0, 1] as broadcastable (res, 1) and (1, res) arrays."""
    c = ((np.arange(res, dtype=np.float32) + 0.5) / res).astype(np.float32)
    c.setflags(write=False)  # cached: shared by every caller
    return c[:, None], c[None, :]


def _hsv_to_rgb(h: float, s: float, v: float) -> Array:
    """One HSV colour (all in [0, 1]) to RGB in grey levels 0..255."""
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.asarray(rgb, dtype=np.float32) * 255.0


def _palette(rng: np.random.Generator) -> list[Array]:
    """A random palette around one or two base hues; kept off 0/255 so noise never clips."""
    base = rng.random()
    colours = []
    for _ in range(int(rng.integers(3, 7))):
        hue = (base + rng.choice([0.0, 0.5]) + rng.normal(0, 0.08)) % 1.0
        colours.append(_hsv_to_rgb(hue, rng.uniform(0.1, 0.85), rng.uniform(0.18, 0.9)))
    return colours


def _pick(rng: np.random.Generator, palette: list[Array]) -> Array:
    """A palette colour with a little jitter, so fills are not all identical."""
    colour = palette[int(rng.integers(len(palette)))]
    return np.clip(colour + rng.normal(0, 8, 3), 10, 235).astype(np.float32)


@functools.lru_cache(maxsize=256)
def _interp_matrix(res: int, cells: int) -> Array:
    """(res, cells) weights that sample a coarse grid smoothly at the pixel centres."""
    pos = ((np.arange(res) + 0.5) / res) * (cells - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, cells - 2)
    t = pos - lo
    t = t * t * (3 - 2 * t)  # smoothstep: no visible creases at grid lines
    m = np.zeros((res, cells), dtype=np.float32)
    m[np.arange(res), lo] = 1 - t
    m[np.arange(res), lo + 1] = t
    m.setflags(write=False)  # cached: shared by every caller
    return m


def _value_noise(grid: Array, res: int) -> Array:
    """Smooth random field (res, res) from a coarse grid, identical at every resolution."""
    return _interp_matrix(res, grid.shape[0]) @ grid @ _interp_matrix(res, grid.shape[1]).T


def _sample_fill(rng: np.random.Generator, palette: list[Array]) -> Callable[[int], Array]:
    """Solid colour, linear gradient or texture (stripes / value noise) between two colours."""
    c0, c1 = _pick(rng, palette), _pick(rng, palette)
    kind = rng.choice(["solid", "gradient", "stripes", "noise"], p=[0.3, 0.3, 0.15, 0.25])
    if kind == "solid":
        return lambda res: np.broadcast_to(c0, (res, res, 3))
    if kind == "gradient":
        ang, off = rng.uniform(0, 2 * math.pi), rng.uniform(-0.5, 0.5)

        def field(res: int) -> Array:
            y, x = _coords(res)
            return np.clip((x - 0.5) * math.cos(ang) + (y - 0.5) * math.sin(ang) + 0.5 + off, 0, 1)

    elif kind == "stripes":
        ang, freq, phase = rng.uniform(0, math.pi), rng.uniform(2, 7), rng.uniform(0, 2 * math.pi)

        def field(res: int) -> Array:
            y, x = _coords(res)
            w = 2 * math.pi * freq * (x * math.cos(ang) + y * math.sin(ang)) + phase
            return 0.5 + 0.5 * np.sin(w)

    else:
        cells = int(rng.integers(3, 11))
        grid = rng.random((cells, cells)).astype(np.float32)

        def field(res: int) -> Array:
            return _value_noise(grid, res)

    def fill(res: int) -> Array:
        t = field(res).astype(np.float32)[..., None]
        return c0 + (c1 - c0) * t

    return fill


def _alpha(sdf_px: Array) -> Array:
    """Anti-aliased coverage from a signed distance in pixels (about one pixel of ramp)."""
    return np.clip(0.5 - sdf_px, 0.0, 1.0).astype(np.float32)


def _sample_shape(rng: np.random.Generator, palette: list[Array]) -> Layer:
    """One ellipse, rotated rectangle or thick line, with its own fill."""
    kind = rng.choice(["ellipse", "rect", "line"], p=[0.4, 0.35, 0.25])
    fill = _sample_fill(rng, palette)
    cx, cy = rng.uniform(-0.05, 1.05, 2)
    ang = rng.uniform(0, math.pi)
    ca, sa = math.cos(ang), math.sin(ang)
    if kind == "line":
        half_len, half_w = rng.uniform(0.15, 0.6), rng.uniform(0.006, 0.03)
    else:
        a, b = rng.uniform(0.04, 0.35, 2)

    def layer(res: int) -> tuple[Array, Array]:
        y, x = _coords(res)
        u = (x - cx) * ca + (y - cy) * sa
        v = -(x - cx) * sa + (y - cy) * ca
        if kind == "ellipse":
            q = np.sqrt((u / a) ** 2 + (v / b) ** 2)
            sdf = (q - 1.0) * min(a, b)
        elif kind == "rect":
            sdf = np.maximum(np.abs(u) - a, np.abs(v) - b)
        else:
            du = np.maximum(np.abs(u) - half_len, 0.0)
            sdf = np.sqrt(du**2 + v**2) - half_w
        return _alpha(sdf * res), fill(res)

    return layer


def _sample_background(rng: np.random.Generator, palette: list[Array]) -> Layer:
    """A sky over ground with a soft horizon, or a plain textured/gradient backdrop."""
    if rng.random() < 0.5:
        backdrop = _sample_fill(rng, palette)
        return lambda res: (np.ones((res, res), np.float32), backdrop(res))
    top, bottom, ground = _pick(rng, palette), _pick(rng, palette), _sample_fill(rng, palette)
    horizon, soft = rng.uniform(0.3, 0.75), rng.uniform(0.005, 0.05)

    def layer(res: int) -> tuple[Array, Array]:
        y, _ = _coords(res)
        t = np.clip(y / horizon, 0, 1)[..., None]
        sky = np.broadcast_to(top + (bottom - top) * t, (res, res, 3))
        ground_alpha = np.broadcast_to(np.clip((y - horizon) / soft + 0.5, 0, 1), (res, res))
        return np.ones((res, res), np.float32), sky * (1 - ground_alpha[..., None]) + ground(
            res
        ) * ground_alpha[..., None]

    return layer


@dataclass(frozen=True)
class _Scene:
    """Resolution-independent scene: layers plus a smooth illumination field."""

    layers: tuple[Layer, ...]
    light: Array

    def rasterise(self, res: int) -> Array:
        """Render to float32 (res, res, 3) grey levels, ideal (noise-free) pixels."""
        canvas = np.zeros((res, res, 3), np.float32)
        for layer in self.layers:
            alpha, colour = layer(res)
            a = alpha[..., None]
            canvas = canvas * (1 - a) + colour * a
        return canvas * _value_noise(self.light, res)[..., None]


def _sample_scene(rng: np.random.Generator) -> _Scene:
    """Draw one scene. Consumes the same random numbers whatever the source will be."""
    palette = _palette(rng)
    layers = [_sample_background(rng, palette)]
    layers += [_sample_shape(rng, palette) for _ in range(int(rng.integers(3, 10)))]
    light = rng.uniform(0.88, 1.06, (3, 3)).astype(np.float32)
    return _Scene(tuple(layers), light)


# ---------------------------------------------------------------------- filters and upsampling


def _conv1d(img: Array, taps: Sequence[float], axis: int) -> Array:
    """Correlate with a short odd kernel along an axis, edge-replicating the border."""
    r = len(taps) // 2
    pad = [(0, 0)] * img.ndim
    pad[axis] = (r, r)
    p = np.pad(img, pad, mode="edge")
    n = img.shape[axis]
    out = np.zeros_like(img)
    for k, w in enumerate(taps):
        if w:
            out += np.float32(w) * np.take(p, np.arange(k, k + n), axis=axis)
    return out


def _blur(img: Array, taps: Sequence[float]) -> Array:
    """Separable blur with the same taps on rows and columns."""
    return _conv1d(_conv1d(img, taps, 0), taps, 1)


def _gauss_taps(sigma: float) -> list[float]:
    """Normalised 5-tap gaussian (sigma below ~1 px, an optical blur)."""
    w = [math.exp(-(i * i) / (2 * sigma * sigma)) for i in range(-2, 3)]
    return [v / sum(w) for v in w]


def _upsample_1d(img: Array, axis: int, phase_taps: PhaseTaps) -> Array:
    """x2 along ``axis``: output phase p of pixel i is ``phase_taps[p]`` over x[i-r..i+r]."""
    n = img.shape[axis]
    out_shape = list(img.shape)
    out_shape[axis] = 2 * n
    out = np.empty(out_shape, np.float32)
    for p, taps in enumerate(phase_taps):
        idx = [slice(None)] * img.ndim
        idx[axis] = slice(p, None, 2)
        out[tuple(idx)] = _conv1d(img, taps, axis)
    return out


def _keys(t: float, a: float = -0.5) -> float:
    """Keys cubic convolution kernel (bicubic interpolation)."""
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


# Half-pixel-centred (align_corners=False) phase taps over x[i-2..i+2].
_BILINEAR = ((0, 0.25, 0.75, 0, 0), (0, 0, 0.75, 0.25, 0))
_BICUBIC = (
    tuple([_keys(1.75), _keys(0.75), _keys(0.25), _keys(1.25), 0.0]),
    tuple([0.0, _keys(1.25), _keys(0.25), _keys(0.75), _keys(1.75)]),
)


def _upsample(img: Array, phase_taps: PhaseTaps) -> Array:
    """Separable x2 upsampling with per-phase taps."""
    return _upsample_1d(_upsample_1d(img, 0, phase_taps), 1, phase_taps)


def _tile(pattern: Array, size: int) -> Array:
    """Repeat a (2, 2, 3) per-phase pattern over a (size, size, 3) image."""
    return np.tile(pattern, (size // 2, size // 2, 1))


# ---------------------------------------------------------------------------------- sources
# Every fingerprint below is a fixed constant (or drawn from a fixed seed), so it is the same
# for every image of that generator, like the weights of a real decoder. Amplitudes are a few
# grey levels: visible to a learned detector, invisible to a casual look.

_FINGERPRINT_SEED = 20240413


def _fixed_rng(name: str) -> np.random.Generator:
    """Per-generator generator of fixed constants (stable across runs and platforms)."""
    return np.random.default_rng([_FINGERPRINT_SEED, *name.encode()])


def _upconv_kernels() -> Array:
    """3x3 transposed-conv kernel per channel: bilinear plus a fixed checkerboard error.

    On the zero-inserted grid each output phase sums different kernel taps; the perturbation
    makes those sums unequal (+e on the (0,0)/(1,1) phases, -e on the others), which is the
    classic deconvolution checkerboard, scaled by the local brightness.
    """
    tent = np.outer([0.5, 1.0, 0.5], [0.5, 1.0, 0.5])
    checker = np.outer([-0.5, 1.0, -0.5], [-0.5, 1.0, -0.5])
    rng = _fixed_rng("upconv_gan")
    kernels = [tent + e * checker + rng.normal(0, 0.004, (3, 3)) for e in (0.026, 0.022, 0.018)]
    return np.stack(kernels, axis=-1).astype(np.float32)


_UPCONV_K = _upconv_kernels()
_UPCONV_BIAS = np.asarray([[1.0, -1.0], [-1.0, 1.0]], np.float32)[..., None] * np.asarray(
    [1.2, 1.0, 0.8], np.float32
)

# pixel-shuffle: each sub-pixel phase is its own conv output channel, so each gets its own
# gain and offset. Vertical stripes dominate in luma (not a checkerboard like upconv).
_SHUFFLE_GAIN = 1.0 + np.asarray(
    [[[0.030, 0.018, -0.009], [-0.027, -0.015, 0.012]],
     [[0.009, 0.024, 0.015], [-0.012, -0.027, -0.018]]],
    np.float32,
)  # fmt: skip
_SHUFFLE_OFFSET = np.asarray(
    [[[3.2, 1.6, -2.4], [-2.8, -3.6, 1.2]],
     [[2.0, 2.8, 2.8], [-2.4, -0.8, -1.6]]],
    np.float32,
)  # fmt: skip


@functools.lru_cache(maxsize=16)
def _bilinear_peak(size: int) -> Array:
    """Faint fixed diagonal cosine (period 4 px): a spectral peak off the 2x2 lattice."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    wave = np.cos(2 * np.pi * (x + y) / 4.0 + 0.6)[..., None]
    peak = (wave * np.asarray([3.6, 3.0, 2.4], np.float32)).astype(np.float32)
    peak.setflags(write=False)  # cached: shared by every caller
    return peak


def _real(scene: _Scene, rng: np.random.Generator, size: int) -> Array:
    """Camera: full resolution, optional slight optical blur, i.i.d. sensor noise."""
    img = scene.rasterise(size)
    if rng.random() < 0.7:
        img = _blur(img, _gauss_taps(rng.uniform(0.3, 0.8)))
    sigma = rng.uniform(2.0, 5.0)
    return img + rng.normal(0.0, sigma, img.shape).astype(np.float32)


def _latent(scene: _Scene, rng: np.random.Generator, size: int, sigma: tuple[float, ...]) -> Array:
    """Half-resolution render plus decoder "texture" noise (correlated after upsampling)."""
    low = scene.rasterise(size // 2)
    return low + rng.normal(0.0, rng.uniform(*sigma), low.shape).astype(np.float32)


def _upconv_gan(scene: _Scene, rng: np.random.Generator, size: int) -> Array:
    """Transposed convolution (stride 2, 3x3): zero-insert, then the fixed kernel."""
    low = _latent(scene, rng, size, (1.0, 3.0))
    padded = np.pad(low, ((1, 1), (1, 1), (0, 0)), mode="edge")
    zeros = np.zeros((2 * padded.shape[0], 2 * padded.shape[1], 3), np.float32)
    zeros[::2, ::2] = padded
    out = np.zeros((size, size, 3), np.float32)
    for dy in range(3):
        for dx in range(3):
            out += _UPCONV_K[dy, dx] * zeros[1 + dy : 1 + dy + size, 1 + dx : 1 + dx + size]
    return out + _tile(_UPCONV_BIAS, size)


def _nearest_gan(scene: _Scene, rng: np.random.Generator, size: int) -> Array:
    """Nearest-neighbour x2 (duplicated 2x2 blocks) and a light 3-tap smoothing."""
    low = _latent(scene, rng, size, (1.5, 3.5))
    up = np.repeat(np.repeat(low, 2, axis=0), 2, axis=1)
    return _blur(up, (0.1, 0.8, 0.1))


def _pixelshuffle_diffusion(scene: _Scene, rng: np.random.Generator, size: int) -> Array:
    """Sub-pixel convolution: bicubic-like phases with a fixed gain/offset per phase."""
    low = _latent(scene, rng, size, (1.0, 2.5))
    up = _upsample(low, _BICUBIC)
    return up * _tile(_SHUFFLE_GAIN, size) + _tile(_SHUFFLE_OFFSET, size)


def _bilinear_diffusion(scene: _Scene, rng: np.random.Generator, size: int) -> Array:
    """Bilinear x2: too smooth (no sensor-like noise) plus a faint fixed spectral peak."""
    low = _latent(scene, rng, size, (0.5, 1.5))
    return _upsample(low, _BILINEAR) + _bilinear_peak(size)


_RENDERERS: dict[str, Callable[[_Scene, np.random.Generator, int], Array]] = {
    REAL: _real,
    "upconv_gan": _upconv_gan,
    "nearest_gan": _nearest_gan,
    "pixelshuffle_diffusion": _pixelshuffle_diffusion,
    "bilinear_diffusion": _bilinear_diffusion,
}
assert tuple(_RENDERERS) == SOURCES


# -------------------------------------------------------------------------------- public API


def _check_size(size: int) -> int:
    """Return ``size`` as an int; the x2 generators need an even size, patches need >= 16."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise ValueError(f"size must be an even integer >= {MIN_SIZE}, got {size!r}")
    if size < MIN_SIZE or size % 2:
        raise ValueError(f"size must be an even integer >= {MIN_SIZE}, got {size!r}")
    return int(size)


def _check_sources(sources: Sequence[str]) -> tuple[str, ...]:
    if isinstance(sources, str):
        raise ValueError(f"sources must be a sequence of names, not the string {sources!r}")
    unknown = [s for s in sources if s not in _RENDERERS]
    if unknown:
        raise ValueError(f"unknown source(s) {unknown}; known sources are {list(SOURCES)}")
    if not sources:
        raise ValueError("sources must name at least one source")
    return tuple(dict.fromkeys(sources))


def render(source: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Render one RGB ``size`` x ``size`` image of ``source``.

    The scene is drawn from ``rng`` first, identically for every source, so two generators
    started from equal ``rng`` states paint the same scene and differ only in fingerprint.
    """
    _check_sources([source])
    size = _check_size(size)
    img = _RENDERERS[source](_sample_scene(rng), rng, size)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))


def _source_plan(n: int, sources: tuple[str, ...], real_fraction: float) -> list[str]:
    """Balanced list of n source names: ``real_fraction`` real, the rest round-robin."""
    if not 0.0 <= real_fraction <= 1.0:
        raise ValueError(f"real_fraction must be in [0, 1], got {real_fraction!r}")
    fakes = [s for s in sources if s != REAL]
    if REAL not in sources:
        n_real = 0
    elif not fakes:
        n_real = n
    else:
        n_real = round(n * real_fraction)
    return [REAL] * n_real + [fakes[i % len(fakes)] for i in range(n - n_real)]


def generate(
    n: int,
    *,
    size: int = 64,
    seed: int = 0,
    sources: Sequence[str] = SOURCES,
    real_fraction: float = 0.5,
) -> list[ZooSample]:
    """``n`` shuffled samples, deterministic for a seed.

    ``real_fraction`` of them are real (when ``real`` is among ``sources`` together with a
    generator), the rest spread evenly over the generators in ``sources``. Image ``i`` draws
    its scene from its own stream ``(seed, i)``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    size = _check_size(size)
    plan = _source_plan(n, _check_sources(sources), real_fraction)
    np.random.default_rng(seed).shuffle(plan)
    return [
        ZooSample(render(src, np.random.default_rng([seed, i]), size), src)
        for i, src in enumerate(plan)
    ]


def _split_counts(n: int, splits: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder split of n into the given fractions (which must sum to 1)."""
    if not splits or any(f < 0 for f in splits.values()):
        raise ValueError(f"splits must map names to non-negative fractions, got {dict(splits)}")
    if abs(sum(splits.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {dict(splits)}")
    raw = {k: n * f for k, f in splits.items()}
    counts = {k: math.floor(v) for k, v in raw.items()}
    by_remainder = sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)
    for k in by_remainder[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def write_tree(
    root: Path,
    n_per_source: int,
    *,
    size: int = 64,
    seed: int = 0,
    splits: Mapping[str, float] = DEFAULT_SPLITS,
    fmt: str = "png",
    sources: Sequence[str] = SOURCES,
    jpeg_quality: int = 95,
) -> Path:
    """Write an ImageFolder tree ``root/<split>/<source>/<index>.<ext>``; return ``root``.

    ``n_per_source`` images per source are divided over ``splits`` (fractions summing to 1);
    no scene repeats across splits. ``root/zoo.json`` records the class order (index 0 =
    ``real``), because ImageFolder's alphabetical class order is not ours.
    """
    root = Path(root)
    if n_per_source < 0:
        raise ValueError(f"n_per_source must be >= 0, got {n_per_source!r}")
    if fmt.lower() not in _FORMATS:
        raise ValueError(f"fmt must be one of {sorted(_FORMATS)}, got {fmt!r}")
    size = _check_size(size)
    names = _check_sources(sources)
    counts = _split_counts(n_per_source, splits)
    pil_format, ext = _FORMATS[fmt.lower()]
    save_kwargs = {"quality": jpeg_quality} if pil_format == "JPEG" else {}
    for src in names:
        index = 0  # one stream per (seed, source, index): splits never share a scene
        for split, count in counts.items():
            folder = root / split / src
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(count):
                rng = np.random.default_rng([seed, SOURCES.index(src), index, 1])
                render(src, rng, size).save(folder / f"{j:05d}{ext}", pil_format, **save_kwargs)
                index += 1
    manifest = {
        "sources": list(names),
        "size": size,
        "seed": seed,
        "format": pil_format.lower(),
        "splits": counts,
    }
    (root / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return root
