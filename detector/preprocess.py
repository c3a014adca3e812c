"""The one preprocessing path shared by training, evaluation and serving.

The checkpoint stores a :class:`PreprocessConfig`; the worker and the trainer both call
:func:`preprocess` with it, so a served model sees exactly the pixels it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class PreprocessConfig(BaseModel):
    """Input contract of a detector: geometry and normalisation of its pixels.

    ``resize`` is CLIP's default (shortest side to ``image_size``, centre crop);
    ``crop`` takes a centre crop without resizing (UniversalFakeDetect), which keeps
    the high-frequency generator fingerprints a resize would blur away.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int = Field(gt=0, le=4096)
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    policy: Literal["resize", "crop"] = "resize"
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"


def _center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    left = (image.width - width) // 2
    top = (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def fit(image: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """Geometric step: bring an RGB image to ``image_size`` square per the policy.

    ``resize`` equals "shortest side to size, then centre crop", done as centre square
    first so a 1 x 40M-pixel strip never becomes a giant intermediate image. ``crop``
    never downsizes; an image smaller than the crop is scaled up to fit.
    """
    size = cfg.image_size
    short = min(image.size)
    if cfg.policy == "crop" and short >= size:
        return _center_crop(image, size, size)
    if image.width != image.height:
        image = _center_crop(image, short, short)
    if short != size:
        image = image.resize((size, size), _RESAMPLE[cfg.interpolation])
    return image


def to_tensor(image: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """Normalise a fitted RGB image into a float32 CHW tensor."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(cfg.mean, dtype=np.float32)) / np.asarray(cfg.std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def preprocess(image: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """RGB PIL image -> model input tensor (3, image_size, image_size)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return to_tensor(fit(image, cfg), cfg)


def preprocess_batch(images: Sequence[Image.Image], cfg: PreprocessConfig) -> torch.Tensor:
    """Stack preprocessed images into one (N, 3, S, S) batch."""
    if not images:
        return torch.empty((0, 3, cfg.image_size, cfg.image_size))
    return torch.stack([preprocess(image, cfg) for image in images])
