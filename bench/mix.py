"""The bench's inputs: a JPEG image mix, upload events built from it, and large-image bursts.

Everything here is made once, before any timed region: zoo images rendered at an upload-like
size and JPEG-encoded, so the timed stages pay for decoding exactly what the worker decodes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from clipguard.cli.produce import upload_event
from clipguard.training import zoo


@dataclass(frozen=True)
class ImageMix:
    """Distinct JPEG files that events cycle through."""

    jpegs: tuple[bytes, ...]
    width: int
    height: int
    quality: int

    @property
    def mean_bytes(self) -> float:
        return sum(map(len, self.jpegs)) / len(self.jpegs)

    def describe(self) -> dict[str, float | int]:
        return {
            "images": len(self.jpegs),
            "width": self.width,
            "height": self.height,
            "quality": self.quality,
            "mean_jpeg_bytes": round(self.mean_bytes),
        }

    def events(self, prefix: str, count: int) -> list[tuple[bytes, bytes]]:
        """(key, value) upload events, one JPEG of the mix after the other."""
        return [(f"{prefix}-{i:06d}".encode(), self.event(prefix, i)) for i in range(count)]

    def event(self, prefix: str, index: int) -> bytes:
        """One upload event; ``uploaded_at`` is now, so build it when it is sent."""
        event_id = f"{prefix}-{index:06d}"
        return upload_event(self.jpegs[index % len(self.jpegs)], event_id, {"bench": prefix})


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def zoo_mix(count: int, size: int, quality: int = 90, seed: int = 0) -> ImageMix:
    """``count`` zoo images (real and every generator) rendered at ``size`` px, as JPEG."""
    size += size % 2  # the zoo's x2 generators need an even size
    samples = zoo.generate(count, size=size, seed=seed)
    jpegs = tuple(_jpeg(sample.image, quality) for sample in samples)
    return ImageMix(jpegs, size, size, quality)


def large_mix(count: int, width: int, height: int, quality: int = 90, seed: int = 0) -> ImageMix:
    """Photo-sized JPEGs: zoo scenes scaled up to ``width`` x ``height``.

    Rendering the zoo at full size would take seconds per image. The upscaled scenes are
    smooth, so their files are smaller than a camera's (about 0.6 MB at 4000x3000, q90, where
    a photo has 3-5 MB); what drives the worker's memory is the decoded pixels, which are the
    same: width x height x 3 bytes per image being decoded.
    """
    rng = np.random.default_rng(seed)
    jpegs = tuple(
        _jpeg(
            zoo.render(zoo.REAL, rng, 256).resize((width, height), Image.Resampling.BILINEAR),
            quality,
        )
        for _ in range(count)
    )
    return ImageMix(jpegs, width, height, quality)


def parse_size(text: str) -> tuple[int, int]:
    """``4000x3000`` -> (4000, 3000)."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    if width < 16 or height < 16:
        raise ValueError(f"image size {text!r} is too small (at least 16x16)")
    return width, height
