"""JPEG DCT scaling (draft mode) in the one decode path: where it applies, what it delivers,
and that training, evaluation and serving see the same pixels."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipguard.detector.backbones import BackboneSpec, build_encoder
from clipguard.detector.decode import decode_image
from clipguard.detector.preprocess import PreprocessConfig, decode_min_side, preprocess
from clipguard.training.data import DetectorDataset, LabelledImage

RESIZE = PreprocessConfig(image_size=224, policy="resize", jpeg_draft=True)


def _photo(width: int, height: int, fmt: str = "JPEG", exif: Image.Exif | None = None) -> bytes:
    """Gradients plus fine noise (Pillow's C code: a 12 MP photo in well under a second), so
    DCT scaling and a full decode followed by a resize give different pixels."""
    size = (width, height)
    ramp = Image.linear_gradient("L")
    red = ramp.rotate(90).resize(size)
    green = ramp.resize(size)
    blue = Image.blend(Image.effect_noise(size, 40), ramp.resize(size), 0.7)
    photo = Image.merge("RGB", (red, green, blue))
    buffer = io.BytesIO()
    extra = {"exif": exif} if exif is not None else {}
    photo.save(buffer, format=fmt, quality=90, **extra)
    return buffer.getvalue()


def test_min_side_only_where_the_preprocessing_downsizes():
    assert decode_min_side(RESIZE) == 224
    assert decode_min_side(RESIZE.model_copy(update={"policy": "crop"})) is None
    assert decode_min_side(RESIZE.model_copy(update={"policy": "both"})) is None
    assert decode_min_side(RESIZE.model_copy(update={"jpeg_draft": False})) is None
    # A checkpoint written before the field existed was trained on full decodes.
    old = PreprocessConfig.model_validate({"image_size": 224, "policy": "resize"})
    assert decode_min_side(old) is None
    # New detectors are built with it (it acts only with the resize policy).
    assert build_encoder(BackboneSpec()).preprocess.jpeg_draft is True


@pytest.mark.parametrize(
    ("size", "expected"),
    [((4000, 3000), (500, 375)), ((2000, 1500), (500, 375)), ((400, 300), (400, 300))],
)
def test_jpegs_decode_at_the_largest_scale_that_keeps_min_side(size, expected):
    image = decode_image(_photo(*size), min_side=224)
    assert image.size == expected
    assert min(image.size) >= 224
    assert decode_image(_photo(*size)).size == size  # without it: as stored


def test_other_formats_decode_in_full():
    assert decode_image(_photo(1200, 900, "PNG"), min_side=224).size == (1200, 900)


def test_exif_orientation_still_applies_after_scaling():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    image = decode_image(_photo(2000, 1000, exif=exif), min_side=224)
    assert image.size == (250, 500)


def test_training_and_serving_see_the_same_pixels(tmp_path: Path):
    data = _photo(2400, 1800)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    dataset = DetectorDataset([LabelledImage(source=0, path=path)], RESIZE)
    trained_on, _, _, ok = dataset[0]
    assert ok
    served = preprocess(decode_image(data, min_side=decode_min_side(RESIZE)), RESIZE)
    assert torch.equal(trained_on, served)
    # The scaling is real: a full decode gives other (close) pixels.
    full = preprocess(decode_image(data), RESIZE)
    assert not torch.equal(served, full)
    assert float((served - full).abs().mean()) < 0.1
