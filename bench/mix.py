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
    """Distinct image files that events cycle through (``jpegs``: JPEG for the zoo mix; the
    upload mix also has PNG and WebP files), with the kind of each."""

    jpegs: tuple[bytes, ...]
    width: int
    height: int
    quality: int
    kinds: tuple[str, ...] = ()
    name: str = "zoo"

    def kind_of(self, index: int) -> str:
        return self.kinds[index % len(self.kinds)] if self.kinds else "jpeg"

    @property
    def mean_bytes(self) -> float:
        return sum(map(len, self.jpegs)) / len(self.jpegs)

    def describe(self) -> dict[str, float | int]:
        described: dict[str, float | int] = {
            "images": len(self.jpegs),
            "width": self.width,
            "height": self.height,
            "quality": self.quality,
            "mean_jpeg_bytes": round(self.mean_bytes),
        }
        if self.kinds:
            for kind in dict.fromkeys(self.kinds):
                described[f"count_{kind}"] = self.kinds.count(kind)
        return described

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


#: The upload mix: (kind, width, height, format, quality, share of the files). What phones,
#: desktops and avatars send: 12 and 8 megapixel camera JPEGs, PNG screenshots, WebP from
#: apps that re-encode, small avatar JPEGs.
UPLOAD_KINDS = (
    ("phone_12mp_jpeg", 4032, 3024, "JPEG", 90, 3),
    ("phone_8mp_jpeg", 3264, 2448, "JPEG", 88, 2),
    ("screenshot_png", 1170, 2532, "PNG", 0, 2),
    ("app_webp", 1080, 1350, "WEBP", 80, 2),
    ("avatar_jpeg", 256, 256, "JPEG", 85, 3),
)


def _photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A camera-like frame: a zoo scene upscaled, plus sensor-like grain, so the JPEG costs
    what a photo costs to decode (entropy decoding grows with the detail in the file)."""
    scene = zoo.render(zoo.REAL, rng, 256).resize((width, height), Image.Resampling.BILINEAR)
    grain = rng.normal(0, 6, size=(-(-height // 4), -(-width // 4), 3))
    grain = np.kron(grain, np.ones((4, 4, 1)))[:height, :width]
    pixels = np.clip(np.asarray(scene, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _screenshot(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Flat UI blocks and text-like strokes: what PNG screenshots are made of."""
    pixels = np.full((height, width, 3), 245, dtype=np.uint8)
    for _ in range(40):
        x, y = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 20))
        w, h = int(rng.integers(20, width // 2)), int(rng.integers(8, 120))
        pixels[y : y + h, x : x + w] = rng.integers(0, 255, size=3)
    strokes = rng.random((-(-height // 3), -(-width // 3))) < 0.04
    pixels[np.kron(strokes, np.ones((3, 3), dtype=bool))[:height, :width]] = 30
    return Image.fromarray(pixels)


def upload_mix(count: int = 12, seed: int = 0) -> ImageMix:
    """Files like real uploads (:data:`UPLOAD_KINDS`), ``count`` of them in those shares."""
    rng = np.random.default_rng(seed)
    total = sum(kind[-1] for kind in UPLOAD_KINDS)
    plan = [kind for kind in UPLOAD_KINDS for _ in range(max(1, round(count * kind[-1] / total)))]
    files, kinds = [], []
    for name, width, height, fmt, quality, _share in plan[:count] if count >= 5 else plan:
        image = _screenshot(rng, width, height) if fmt == "PNG" else _photo_like(rng, width, height)
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **({"quality": quality} if quality else {}))
        files.append(buffer.getvalue())
        kinds.append(name)
    return ImageMix(tuple(files), 4032, 3024, 90, tuple(kinds), "uploads")


def parse_size(text: str) -> tuple[int, int]:
    """``4000x3000`` -> (4000, 3000)."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    if width < 16 or height < 16:
        raise ValueError(f"image size {text!r} is too small (at least 16x16)")
    return width, height
