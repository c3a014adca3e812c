"""Safe decoding: typed errors for hostile bytes, RGB for every accepted mode."""

from __future__ import annotations

import io

import pytest
from conftest import image_bytes
from PIL import Image

from clipguard.detector.decode import DecodeLimits, decode_image
from clipguard.detector.errors import (
    CorruptImageError,
    DecompressionBombError,
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedFormatError,
)


def _save(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_plain_png_and_jpeg_decode_to_rgb() -> None:
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"):
        image = decode_image(image_bytes(fmt=fmt))
        assert image.mode == "RGB" and image.size == (80, 64), fmt


def test_empty_and_oversized_bytes() -> None:
    with pytest.raises(EmptyImageError):
        decode_image(b"")
    with pytest.raises(ImageTooLargeError):
        decode_image(image_bytes(), DecodeLimits(max_bytes=10))


def test_pixel_limit_is_checked_from_the_header() -> None:
    bomb = _save(Image.new("1", (12_000, 12_000)), "PNG")  # 144 MP, a few KB on disk
    assert len(bomb) < 100_000
    with pytest.raises(DecompressionBombError, match="pixels"):
        decode_image(bomb)
    with pytest.raises(DecompressionBombError):
        decode_image(image_bytes(), DecodeLimits(max_pixels=100))


def test_format_allow_list() -> None:
    pcx = _save(Image.new("RGB", (8, 8)), "PCX")
    with pytest.raises(UnsupportedFormatError):
        decode_image(pcx)
    assert decode_image(pcx, DecodeLimits(formats=("PCX",))).size == (8, 8)
    with pytest.raises(UnsupportedFormatError):
        decode_image(b"plain text, not an image at all")
    with pytest.raises(ValueError, match="unknown image formats"):
        DecodeLimits(formats=("NOPE",))


def test_truncated_image_is_corrupt() -> None:
    data = image_bytes(size=(256, 256), fmt="JPEG")
    with pytest.raises(CorruptImageError):
        decode_image(data[: len(data) // 3])


def test_every_error_is_an_image_error_with_a_reason() -> None:
    for bad in (b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"GIF89a" + b"\xff" * 30):
        with pytest.raises(ImageError) as info:
            decode_image(bad)
        assert info.value.stage == "decode" and info.value.reason


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    decoded = decode_image(_save(image, "JPEG", exif=exif))
    assert decoded.size == (20, 40)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "I", "F", "1", "YCbCr"])
def test_odd_modes_become_rgb(mode: str) -> None:
    image = Image.new(mode, (16, 12))
    fmt = "TIFF" if mode in ("I;16", "I", "F", "CMYK", "YCbCr") else "PNG"
    if mode == "YCbCr":
        fmt = "JPEG"
    decoded = decode_image(_save(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (16, 12)


def test_transparency_is_flattened_on_white() -> None:
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert decode_image(_save(clear, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_animation_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(data).getpixel((5, 5)) == (255, 0, 0)
