"""More synthetic generator families, so that "a generator the detector never saw" is a test.

The original zoo (:mod:`clipguard.training.zoo`) has four generators that all upsample x2
from half resolution: a detector trained on three of them may catch the fourth only because
they share one trait. Here are five more *families*; members of a family share their
construction and differ in a detail, families differ in kind:

==========  ==========================  ===================================================
family      generators                  shared trait / what differs
==========  ==========================  ===================================================
zoo         the original four           x2 upsampling from half resolution
deconv      ``deconv4_s2``,             transposed convolutions (zero-insert + fixed kernel);
            ``deconv3_x4``              4x4 kernel at x2 vs two stacked 3x3 stages (x4)
denoise     ``ddpm_linear``,            full-resolution iterative denoising (noise added and
            ``ddim_cosine``             smoothed away step by step): linear vs cosine noise
                                        schedule and denoiser kernel, so the residue differs
vae         ``vae_f4``,                 a 1/4-resolution latent decoded by nearest x2 + 3x3
            ``vae_f4_sharp``            conv twice (smooth, checkerboard bias); the second
                                        sharpens (halos) and has another bias pattern
jpeg        ``jpeg_before_up``,         JPEG inside the pipeline: compressed at half size then
            ``jpeg_after_up``           bicubic x2 (16-px blocks, smoothed) vs bilinear x2
                                        then compressed (8-px blocks on top)
spectral    ``peak_p3``,                full resolution plus a faint fixed periodic pattern:
            ``peak_grid8``              a period-3 vertical wave vs a period-8 2-D grid
==========  ==========================  ===================================================

``real`` here is the zoo's camera followed, for a quarter of the images, by a camera-style
JPEG (quality 70-95): the jpeg family must not be caught by "is it a JPEG" alone. A selection
of only the original zoo's generators keeps the zoo's camera as it was (PNG only). Every
image of every source comes from the zoo's one scene renderer, so only the last steps
differ. Fingerprint constants are fixed (drawn from a fixed seed), like a decoder's weights;
generation is deterministic per seed and costs a few milliseconds per 64-px image (numpy +
Pillow, no torch). Sizes are any multiple of 8 from 32 up (the x4 latent and JPEG blocks).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from clipguard.training import zoo
from clipguard.training.zoo import REAL, ZooSample

Array = zoo.Array

FAMILIES: Mapping[str, tuple[str, ...]] = {
    "zoo": zoo.GENERATORS,
    "deconv": ("deconv4_s2", "deconv3_x4"),
    "denoise": ("ddpm_linear", "ddim_cosine"),
    "vae": ("vae_f4", "vae_f4_sharp"),
    "jpeg": ("jpeg_before_up", "jpeg_after_up"),
    "spectral": ("peak_p3", "peak_grid8"),
}
"""Family name -> its generators. ``zoo`` is the original module's four."""

NEW_FAMILIES: tuple[str, ...] = tuple(f for f in FAMILIES if f != "zoo")
GENERATORS: tuple[str, ...] = tuple(g for members in FAMILIES.values() for g in members)
NEW_GENERATORS: tuple[str, ...] = tuple(g for f in NEW_FAMILIES for g in FAMILIES[f])
ALL_SOURCES: tuple[str, ...] = (REAL, *GENERATORS)
"""Every source name known here; index 0 is ``real`` (the checkpoint contract)."""

REAL_JPEG_PROB = 0.25
MIN_SIZE = 32
_FORMATS = {"png": ("PNG", ".png"), "jpeg": ("JPEG", ".jpg"), "webp": ("WEBP", ".webp")}


def family_of(generator: str) -> str:
    """The family a generator belongs to."""
    for family, members in FAMILIES.items():
        if generator in members:
            return family
    raise ValueError(f"unknown generator {generator!r}; known generators are {list(GENERATORS)}")


def expand(names: Sequence[str]) -> tuple[str, ...]:
    """Source and family names (``all``, ``new``, a family, a generator) -> source names.

    ``real`` is kept if named; order follows :data:`ALL_SOURCES`. Unknown names raise
    ``ValueError`` listing what is known.
    """
    if isinstance(names, str):
        raise ValueError(f"expected a sequence of names, not the string {names!r}")
    chosen: set[str] = set()
    unknown = []
    for name in names:
        if name == "all":
            chosen.update(ALL_SOURCES)
        elif name == "new":
            chosen.update(NEW_GENERATORS)
        elif name in FAMILIES:
            chosen.update(FAMILIES[name])
        elif name in ALL_SOURCES:
            chosen.add(name)
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(
            f"unknown source(s) {unknown}; known sources are {list(ALL_SOURCES)}, "
            f"families {list(FAMILIES)}, or 'all' / 'new'"
        )
    return tuple(s for s in ALL_SOURCES if s in chosen)


# ------------------------------------------------------------------------------ primitives


def _to_uint8(img: Array) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _jpeg(img: Array, quality: int) -> Array:
    """Encode and decode once with Pillow's JPEG (4:2:0), back to float pixels."""
    buffer = io.BytesIO()
    Image.fromarray(_to_uint8(img)).save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), np.float32)


def _transposed_conv(low: Array, kernel: Array, stride: int = 2) -> Array:
    """Zero-insert ``stride``-fold and correlate with a (k, k, 3) kernel (edge padded)."""
    h, w, _ = low.shape
    k = kernel.shape[0]
    pad = (k + stride - 1) // stride
    padded = np.pad(low, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    grid = np.zeros((stride * padded.shape[0], stride * padded.shape[1], 3), np.float32)
    grid[::stride, ::stride] = padded
    out = np.zeros((stride * h, stride * w, 3), np.float32)
    off = stride * pad - k // 2
    for dy in range(k):
        for dx in range(k):
            y0, x0 = off + dy, off + dx
            out += kernel[dy, dx] * grid[y0 : y0 + stride * h, x0 : x0 + stride * w]
    return out


def _kernel(taps: Sequence[float], error: float, name: str) -> Array:
    """Separable interpolating kernel + a fixed per-generator error (per channel)."""
    base = np.outer(taps, taps)
    rng = zoo._fixed_rng(name)
    parity = np.indices(base.shape).sum(axis=0) % 2
    checker = np.where(parity == 0, 1.0, -1.0) * error
    return np.stack(
        [base + checker * g + rng.normal(0, abs(error) / 4, base.shape) for g in (1.0, 0.8, 0.6)],
        axis=-1,
    ).astype(np.float32)


def _nearest2(img: Array) -> Array:
    return np.repeat(np.repeat(img, 2, axis=0), 2, axis=1)


def _conv3(img: Array, kernel: Array) -> Array:
    """3x3 per-channel correlation, edge padded."""
    padded = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w, _ = img.shape
    out = np.zeros_like(img)
    for dy in range(3):
        for dx in range(3):
            out += kernel[dy, dx] * padded[dy : dy + h, dx : dx + w]
    return out


def _phase_bias(size: int, period: int, pattern: Array) -> Array:
    """Tile a (period, period, 3) bias over the image."""
    reps = size // period
    return np.tile(pattern, (reps, reps, 1))


# ------------------------------------------------------------------------------ renderers
# Fixed constants per generator (like a decoder's weights), drawn from fixed seeds.

_DECONV4 = _kernel([0.25, 0.75, 0.75, 0.25], 0.007, "deconv4_s2")
_DECONV3_STAGES = (
    _kernel([0.5, 1.0, 0.5], 0.012, "deconv3_x4/1"),
    _kernel([0.5, 1.0, 0.5], -0.009, "deconv3_x4/2"),
)
_VAE_CONV = {
    name: (np.outer([0.25, 0.5, 0.25], [0.25, 0.5, 0.25])[..., None] * np.ones(3))
    + zoo._fixed_rng(name).normal(0, 0.01, (3, 3, 3))
    for name in ("vae_f4", "vae_f4_sharp")
}
_VAE_BIAS = {
    "vae_f4": zoo._fixed_rng("vae_f4/bias").normal(0, 3.5, (4, 4, 3)).astype(np.float32),
    "vae_f4_sharp": zoo._fixed_rng("vae_f4_sharp/bias")
    .normal(0, 3.5, (4, 4, 3))
    .astype(np.float32),
}


def _camera(scene: zoo._Scene, rng: np.random.Generator, size: int, jpeg_prob: float) -> Array:
    """The zoo's camera; a share of the photos then saved as JPEG (quality 70-95)."""
    img = zoo._real(scene, rng, size)
    if rng.random() < jpeg_prob:
        img = _jpeg(img, int(rng.integers(70, 96)))
    return img


def _deconv4_s2(scene: zoo._Scene, rng: np.random.Generator, size: int) -> Array:
    """x2 transposed convolution with a 4x4 kernel (stride divides kernel: mild phases)."""
    low = zoo._latent(scene, rng, size, (1.0, 3.0))
    return _transposed_conv(low, _DECONV4)


def _deconv3_x4(scene: zoo._Scene, rng: np.random.Generator, size: int) -> Array:
    """Two stacked x2 3x3 transposed convolutions from a quarter-size render: period 4."""
    low = scene.rasterise(size // 4)
    low = low + rng.normal(0.0, rng.uniform(0.5, 2.0), low.shape).astype(np.float32)
    return _transposed_conv(_transposed_conv(low, _DECONV3_STAGES[0]), _DECONV3_STAGES[1])


def _denoise(
    scene: zoo._Scene,
    rng: np.random.Generator,
    size: int,
    sigmas: Sequence[float],
    taps: Sequence[float],
) -> Array:
    """Add noise at each schedule level and smooth it away with the fixed denoiser kernel.

    Early (large) noise is smoothed many times and survives as low-frequency blotches, late
    noise as finer grain: the residue's spectrum is set by the schedule and the kernel.
    """
    img = scene.rasterise(size)
    for sigma in sigmas:
        img = img + rng.normal(0.0, sigma, img.shape).astype(np.float32)
        img = zoo._blur(img, taps)
    return img


_LINEAR_SIGMAS = tuple(np.linspace(9.0, 3.0, 5))
_COSINE_SIGMAS = tuple(3.0 + 6.0 * np.cos(np.pi / 2 * np.asarray([0.15, 0.5, 0.85])))


def _ddpm_linear(scene: zoo._Scene, rng: np.random.Generator, size: int) -> Array:
    """Five steps, linear schedule, a plain 3-tap smoothing denoiser."""
    return _denoise(scene, rng, size, _LINEAR_SIGMAS, (0.2, 0.6, 0.2))


def _ddim_cosine(scene: zoo._Scene, rng: np.random.Generator, size: int) -> Array:
    """Three steps, cosine schedule, a 5-tap denoiser that lifts the middle band."""
    return _denoise(scene, rng, size, _COSINE_SIGMAS, (-0.06, 0.3, 0.52, 0.3, -0.06))


def _vae_decode(scene: zoo._Scene, rng: np.random.Generator, size: int, name: str) -> Array:
    """Quarter-size latent; (nearest x2, fixed 3x3 conv) twice; a fixed period-4 bias."""
    img = scene.rasterise(size // 4)
    img = img + rng.normal(0.0, rng.uniform(1.0, 2.5), img.shape).astype(np.float32)
    for _ in range(2):
        img = _conv3(_nearest2(img), _VAE_CONV[name])
    return img + _phase_bias(size, 4, _VAE_BIAS[name])


def _vae_f4(scene: zoo._Scene, rng: np.random.Generator, size: int) -> Array:
    """The plain decoder: over-smooth, with its bias pattern."""
    return _vae_decode(scene, rng, size, "vae_f4")


def _vae_f4_sharp(scene: zoo._Scene, rng: np.random.Generator, size: int) -> Array:
    """The same decoder then an unsharp mask (halos at edges), another bias pattern."""
    img = _vae_decode(scene, rng, size, "vae_f4_sharp")
    return img + 0.7 * (img - zoo._blur(img, zoo._gauss_taps(1.0)))


def _jpeg_before_up(scene: zoo._Scene, rng: np.random.Generator, size: int) -> Array:
    """Half-size render saved as JPEG (quality 60-80), then bicubic x2: 16-px blocks."""
    low = zoo._latent(scene, rng, size, (0.5, 1.5))
    low = _jpeg(low, int(rng.integers(60, 81)))
    return zoo._upsample(low, zoo._BICUBIC)


def _jpeg_after_up(scene: zoo._Scene, rng: np.random.Generator, size: int) -> Array:
    """Bilinear x2, then JPEG (quality 75-90): 8-px blocks over an over-smooth image."""
    low = zoo._latent(scene, rng, size, (0.5, 1.5))
    up = zoo._upsample(low, zoo._BILINEAR)
    return _jpeg(up, int(rng.integers(75, 91)))


def _periodic(size: int, period_x: float, period_y: float | None, amplitude: Array) -> Array:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    wave = np.cos(2 * np.pi * x / period_x + 0.4)
    if period_y is not None:
        wave = 0.5 * (wave + np.cos(2 * np.pi * y / period_y + 1.1))
    return (wave[..., None] * amplitude).astype(np.float32)


def _clean_full(scene: zoo._Scene, rng: np.random.Generator, size: int) -> Array:
    """Full resolution, slightly smooth, faint noise: a generator with no upsampling."""
    img = zoo._blur(scene.rasterise(size), (0.15, 0.7, 0.15))
    return img + rng.normal(0.0, rng.uniform(0.5, 1.5), img.shape).astype(np.float32)


def _peak_p3(scene: zoo._Scene, rng: np.random.Generator, size: int) -> Array:
    """A fixed vertical wave of period 3 px (a peak at a third of the sampling rate)."""
    amplitude = np.asarray([6.0, 6.8, 5.2], np.float32)
    return _clean_full(scene, rng, size) + _periodic(size, 3.0, None, amplitude)


def _peak_grid8(scene: zoo._Scene, rng: np.random.Generator, size: int) -> Array:
    """A fixed 2-D grid of period 8 px (tiled decoding seams)."""
    amplitude = np.asarray([6.4, 5.6, 6.8], np.float32)
    return _clean_full(scene, rng, size) + _periodic(size, 8.0, 8.0, amplitude)


_RENDERERS: dict[str, Callable[[zoo._Scene, np.random.Generator, int], Array]] = {
    "deconv4_s2": _deconv4_s2,
    "deconv3_x4": _deconv3_x4,
    "ddpm_linear": _ddpm_linear,
    "ddim_cosine": _ddim_cosine,
    "vae_f4": _vae_f4,
    "vae_f4_sharp": _vae_f4_sharp,
    "jpeg_before_up": _jpeg_before_up,
    "jpeg_after_up": _jpeg_after_up,
    "peak_p3": _peak_p3,
    "peak_grid8": _peak_grid8,
}
assert tuple(_RENDERERS) == NEW_GENERATORS


# ------------------------------------------------------------------------------ public API


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise ValueError(f"size must be a multiple of 8 >= {MIN_SIZE}, got {size!r}")
    if size < MIN_SIZE or size % 8:
        raise ValueError(f"size must be a multiple of 8 >= {MIN_SIZE}, got {size!r}")
    return int(size)


def render(
    source: str, rng: np.random.Generator, size: int = 64, *, real_jpeg: float = REAL_JPEG_PROB
) -> Image.Image:
    """One RGB image of any source in :data:`ALL_SOURCES` (scene drawn from ``rng`` first).

    ``real_jpeg``: the share of ``real`` photos saved as JPEG (0 is the zoo's own camera).
    """
    if source not in ALL_SOURCES:
        raise ValueError(f"unknown source {source!r}; known sources are {list(ALL_SOURCES)}")
    size = _check_size(size)
    if source in zoo.GENERATORS:
        return zoo.render(source, rng, size)
    scene = zoo._sample_scene(rng)
    if source == REAL:
        img = _camera(scene, rng, size, real_jpeg)
    else:
        img = _RENDERERS[source](scene, rng, size)
    return Image.fromarray(_to_uint8(img))


def real_jpeg_for(sources: Sequence[str]) -> float:
    """Camera JPEG only next to the new families; the original zoo alone keeps PNG reals."""
    return REAL_JPEG_PROB if any(s in NEW_GENERATORS for s in sources) else 0.0


def generate(
    n: int,
    *,
    size: int = 64,
    seed: int = 0,
    sources: Sequence[str] = ALL_SOURCES,
    real_fraction: float = 0.5,
) -> list[ZooSample]:
    """``n`` shuffled samples over ``sources``, deterministic for a seed (as ``zoo.generate``).

    ``real_fraction`` of them are real when ``real`` is among ``sources``; the rest are spread
    evenly over the named generators. Image ``i`` draws from its own stream ``(seed, i)``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    names = expand(list(sources))
    if not names:
        raise ValueError("sources must name at least one source")
    size = _check_size(size)
    plan = zoo._source_plan(n, names, real_fraction)
    np.random.default_rng(seed).shuffle(plan)
    jpeg = real_jpeg_for(names)
    return [
        ZooSample(render(src, np.random.default_rng([seed, i]), size, real_jpeg=jpeg), src)
        for i, src in enumerate(plan)
    ]


def write_tree(
    root: Path,
    n_per_source: int,
    *,
    size: int = 64,
    seed: int = 0,
    splits: Mapping[str, float] = zoo.DEFAULT_SPLITS,
    fmt: str = "png",
    sources: Sequence[str] = ALL_SOURCES,
) -> Path:
    """An ImageFolder tree ``root/<split>/<source>/<i>.<ext>`` with ``zoo.json`` (class order).

    As :func:`clipguard.training.zoo.write_tree`, for every source known here; ``fmt`` is
    ``png``, ``jpeg`` (quality 95) or ``webp`` (lossless). No scene repeats across splits.
    """
    root = Path(root)
    if fmt.lower() not in _FORMATS:
        raise ValueError(f"fmt must be one of {sorted(_FORMATS)}, got {fmt!r}")
    names = expand(list(sources))
    size = _check_size(size)
    counts = zoo._split_counts(n_per_source, splits)
    pil_format, ext = _FORMATS[fmt.lower()]
    options = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(pil_format, {})
    jpeg = real_jpeg_for(names)
    for src in names:
        index = 0
        for split, count in counts.items():
            folder = root / split / src
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(count):
                rng = np.random.default_rng([seed, ALL_SOURCES.index(src), index, 2])
                image = render(src, rng, size, real_jpeg=jpeg)
                image.save(folder / f"{j:05d}{ext}", pil_format, **options)
                index += 1
    manifest = {"sources": list(names), "size": size, "seed": seed, "format": pil_format.lower()}
    (root / "zoo.json").write_text(json.dumps({**manifest, "splits": counts}, indent=2) + "\n")
    return root
