"""Augmentations applied identically to real and generated images.

Format-bias guard: :func:`augment` never sees the label. Every training image, real or
fake, PNG or JPEG, is decoded by the serving decoder and then goes through this same path
(blur, JPEG re-encode, crop, flip) with the same probabilities, so a container format or a
compression history that happens to correlate with the label is blurred by re-encoding both
classes alike (``jpeg_prob=1`` re-encodes every image). Blur and JPEG follow CNNDetection
(Wang et al. 2020): sigma in [0, 3], quality in [30, 100].
"""

from __future__ import annotations

import io
import random

from PIL import Image, ImageFilter
from pydantic import BaseModel, ConfigDict, Field

from clipguard.detector.preprocess import PreprocessConfig


class AugmentConfig(BaseModel):
    """Per-image probabilities and ranges of each augmentation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    flip_prob: float = Field(default=0.5, ge=0.0, le=1.0)
    blur_prob: float = Field(default=0.0, ge=0.0, le=1.0)
    blur_sigma: tuple[float, float] = (0.0, 3.0)
    jpeg_prob: float = Field(default=0.0, ge=0.0, le=1.0)
    jpeg_quality: tuple[int, int] = (30, 100)
    #: Random crop: a native ``image_size`` window under ``crop`` (and half the time under
    #: ``both``); under ``resize`` a square of ``crop_scale`` x the short side, then resized.
    crop_prob: float = Field(default=0.0, ge=0.0, le=1.0)
    crop_scale: tuple[float, float] = (0.6, 1.0)
    #: Keep crop offsets even: fingerprints on the 2x2 pixel grid (the synthetic zoo's
    #: upsamplers, real x2 decoders) keep their phase.
    crop_even: bool = False

    @property
    def active(self) -> bool:
        return any(p > 0 for p in (self.flip_prob, self.blur_prob, self.jpeg_prob, self.crop_prob))


NO_AUGMENT = AugmentConfig(flip_prob=0.0)


def jpeg_roundtrip(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as reopened:
        return reopened.convert("RGB")


def gaussian_blur(image: Image.Image, sigma: float) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius=sigma)) if sigma > 0 else image


def _offset(rng: random.Random, room: int, grid: int) -> int:
    """A random offset in ``[0, room]`` on multiples of ``grid`` (pixel-grid phase kept)."""
    if room <= 0:
        return 0
    return grid * rng.randint(0, room // grid)


def random_crop(
    image: Image.Image, rng: random.Random, cfg: AugmentConfig, preprocess: PreprocessConfig
) -> Image.Image:
    """The training view: what the policy scores, sampled at a random place.

    ``crop``: a native ``image_size`` window (never resized), offsets on the contract's
    ``grid``; ``both``: that or the whole image (resized by preprocessing), half and half;
    ``resize``: a ``crop_scale`` square of the short side, resized by preprocessing.
    """
    short = min(image.size)
    grid = max(preprocess.grid, 2 if cfg.crop_even else 1)
    if preprocess.policy in ("crop", "both"):
        side = preprocess.image_size
        if short <= side or (preprocess.policy == "both" and rng.random() < 0.5):
            return image
    else:
        side = round(short * rng.uniform(*cfg.crop_scale))
        if cfg.crop_even:
            side -= side % 2
        side = max(1, min(short, side))
    left = _offset(rng, image.width - side, grid)
    top = _offset(rng, image.height - side, grid)
    return image.crop((left, top, left + side, top + side))


def augment(
    image: Image.Image,
    rng: random.Random,
    cfg: AugmentConfig,
    preprocess: PreprocessConfig | None = None,
) -> Image.Image:
    """One augmented copy; deterministic for a given ``rng`` state. Label-blind by design."""
    if rng.random() < cfg.blur_prob:
        image = gaussian_blur(image, rng.uniform(*cfg.blur_sigma))
    if rng.random() < cfg.jpeg_prob:
        image = jpeg_roundtrip(image, rng.randint(*cfg.jpeg_quality))
    if preprocess is not None and rng.random() < cfg.crop_prob:
        image = random_crop(image, rng, cfg, preprocess)
    if rng.random() < cfg.flip_prob:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image
