"""Safe image decoding: untrusted bytes in, an RGB image or a typed error out.

Limits are checked before the expensive work: bytes before Pillow parses anything, and
the pixel count from the header before a single pixel is decompressed.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from clipguard.detector.errors import (
    CorruptImageError,
    DecompressionBombError,
    EmptyImageError,
    ImageTooLargeError,
    UnsupportedFormatError,
)

# JPEG covers MPO (multi-picture JPEG), which Pillow opens through its JPEG plugin.
DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

Image.init()  # register every plugin, so the allow list can name any format Pillow has


class DecodeLimits(BaseModel):
    """What the decoder accepts; the defaults suit photo uploads."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_pixels: int = Field(default=40_000_000, gt=0)
    formats: tuple[str, ...] = DEFAULT_FORMATS

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, formats: tuple[str, ...]) -> tuple[str, ...]:
        formats = tuple(f.upper() for f in formats)
        unknown = sorted(set(formats) - set(Image.OPEN))
        if unknown:
            raise ValueError(f"unknown image formats {unknown}; Pillow knows {sorted(Image.OPEN)}")
        return formats


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite transparency onto white: what a viewer of the upload would see."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit and float greyscale into 8 bits; Pillow's convert would clip."""
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 3:
        array = array[..., 0]
    finite = np.isfinite(array)
    if not finite.any():
        raise CorruptImageError("image has no finite pixel values")
    low, high = float(array[finite].min()), float(array[finite].max())
    scaled = np.zeros_like(array) if high <= low else (array - low) / (high - low) * 255.0
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    ):
        return _flatten_alpha(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        return _high_depth_to_rgb(image)
    return image.convert("RGB")


#: Formats whose decoder can scale in the DCT domain (1/2, 1/4, 1/8) while decoding.
DRAFT_FORMATS = frozenset({"JPEG", "MPO"})


def decode_image(
    data: bytes, limits: DecodeLimits | None = None, min_side: int | None = None
) -> Image.Image:
    """Decode untrusted bytes into an RGB image, first frame, EXIF orientation applied.

    ``min_side`` (from :func:`~clipguard.detector.preprocess.decode_min_side`): a JPEG whose
    sides are both at least twice this decodes at the largest DCT scale that keeps them at
    least ``min_side`` (libjpeg's draft mode): a 12 MP photo for a 224-pixel model decodes
    at 1/8 in a fraction of the time. Training and serving pass the same value, so the model
    sees the pixels it was trained on. Raises a subclass of
    :class:`~clipguard.detector.errors.ImageError` for every failure.
    """
    limits = limits or DecodeLimits()
    if not data:
        raise EmptyImageError("no image bytes")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"{len(data)} bytes exceeds the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # corrupt metadata warnings are not our business
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(limits.formats))
            width, height = image.size
            if width <= 0 or height <= 0:
                raise EmptyImageError(f"image has no pixels ({width}x{height})")
            if width * height > limits.max_pixels:
                raise DecompressionBombError(
                    f"{width}x{height} = {width * height} pixels exceeds the limit of "
                    f"{limits.max_pixels}"
                )
            image_format = image.format
            image.seek(0)
            if min_side is not None and image_format in DRAFT_FORMATS:
                image.draft("RGB", (min_side, min_side))
            image.load()
            # A broken EXIF block must not cost the image: keep it as stored.
            with contextlib.suppress(Exception):
                image = ImageOps.exif_transpose(image)
            rgb = to_rgb(image)
            rgb.load()
    except (EmptyImageError, DecompressionBombError, CorruptImageError):
        raise
    except UnidentifiedImageError as exc:
        raise UnsupportedFormatError(
            f"not an image in an accepted format ({', '.join(limits.formats)})"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecompressionBombError(str(exc)) from exc
    except MemoryError as exc:
        raise DecompressionBombError("image needs more memory than allowed") from exc
    except Exception as exc:
        raise CorruptImageError(f"{type(exc).__name__}: {exc}") from exc
    rgb.info["clipguard.format"] = image_format
    return rgb
