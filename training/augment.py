"""Augmentations applied identically to real and generated images.

Every training image goes through the same re-encode path (format-bias guard): a PNG
fake and a JPEG real must not be told apart by their container.
"""

from __future__ import annotations

import io
import random

from PIL import Image, ImageFilter
from pydantic import BaseModel, ConfigDict, Field


class AugmentConfig(BaseModel):
    """CNNDetection-style blur + JPEG, plus flips. Probabilities are per image."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    flip_prob: float = Field(default=0.5, ge=0.0, le=1.0)
    blur_prob: float = Field(default=0.0, ge=0.0, le=1.0)
    blur_sigma: tuple[float, float] = (0.0, 3.0)
    jpeg_prob: float = Field(default=0.0, ge=0.0, le=1.0)
    jpeg_quality: tuple[int, int] = (30, 100)


NO_AUGMENT = AugmentConfig(flip_prob=0.0)


def jpeg_roundtrip(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as reopened:
        return reopened.convert("RGB")


def augment(image: Image.Image, rng: random.Random, cfg: AugmentConfig) -> Image.Image:
    if rng.random() < cfg.flip_prob:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < cfg.blur_prob:
        sigma = rng.uniform(*cfg.blur_sigma)
        if sigma > 0:
            image = image.filter(ImageFilter.GaussianBlur(radius=sigma))
    if rng.random() < cfg.jpeg_prob:
        image = jpeg_roundtrip(image, rng.randint(*cfg.jpeg_quality))
    return image
