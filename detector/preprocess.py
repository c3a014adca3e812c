"""The one preprocessing path shared by training, evaluation and serving.

The checkpoint stores a :class:`PreprocessConfig`; the worker, eval and predict call
:func:`preprocess_views` with it, the trainer :func:`preprocess` (the first view of an image
its augmentation already cropped), so a served model sees exactly the pixels it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from clipguard.detector.views import Box, centre_box, crop_boxes, strip_boxes

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Upper bound on views per image: the engine's work per upload stays bounded.
MAX_VIEWS = 16

Policy = Literal["resize", "crop", "both", "scale_first"]
#: Policies that scale the whole image down (so JPEGs may decode at a DCT scale).
DOWNSIZING: frozenset[str] = frozenset({"resize", "scale_first"})
Aggregate = Literal["mean", "max"]

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class PreprocessConfig(BaseModel):
    """Input contract of a detector: geometry, views and normalisation of its pixels.

    ``resize`` is CLIP's default (shortest side to ``image_size``, centre crop); ``crop``
    takes native-resolution crops (UniversalFakeDetect), which keep the high-frequency
    generator fingerprints a resize would blur away; ``both`` scores the resized whole image
    and native crops together. ``scale_first`` scales the whole image (short side to
    ``image_size``, long side rounded) and then cuts the square: torchvision's Resize +
    CenterCrop order, which published probes were fitted on (``resize`` cuts first, so its
    filter never reads outside the square and its centre may sit up to half a pixel apart).
    ``views`` boxes per image (docs/training.md "Views"), their
    binary logits aggregated by ``aggregate``. Defaults are what checkpoints written before
    views meant: one view, offsets unsnapped (``grid`` 1).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int = Field(gt=0, le=4096)
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    policy: Policy = "resize"
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    views: int = Field(default=1, ge=1, le=MAX_VIEWS)
    aggregate: Aggregate = "mean"
    #: Native crops start on multiples of this many pixels (pixel-grid phase).
    grid: int = Field(default=1, ge=1, le=64)
    #: Decode JPEGs at a DCT scale (1/2..1/8) when ``resize`` downsizes them anyway; off in
    #: checkpoints written before it existed, which were trained on full decodes.
    jpeg_draft: bool = False


def decode_min_side(cfg: PreprocessConfig) -> int | None:
    """The side a JPEG may be DCT-scaled down to for ``cfg``, or None for a full decode.

    Only ``resize`` and ``scale_first`` downsize the whole image; native crops (``crop``,
    ``both``) need the pixels as stored, so their generator fingerprints survive.
    """
    return cfg.image_size if cfg.jpeg_draft and cfg.policy in DOWNSIZING else None


def scaled_size(width: int, height: int, size: int) -> tuple[int, int]:
    """``scale_first``: the whole image with its short side at ``size`` (long side rounded)."""
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def view_boxes(width: int, height: int, cfg: PreprocessConfig) -> list[Box]:
    """The squares an image is scored through, at most ``cfg.views``, first = training's view.

    An image smaller than the crop has one view: its centre square scaled up (as before views).
    For ``scale_first`` the boxes are in the scaled image (:func:`scaled_size`), already
    ``image_size`` square.
    """
    size, short, count = cfg.image_size, min(width, height), cfg.views
    if cfg.policy == "resize":
        return strip_boxes(width, height, count)
    if cfg.policy == "scale_first":
        return strip_boxes(*scaled_size(width, height, size), count)
    crops = crop_boxes(width, height, size, count, cfg.grid) if short >= size else []
    if cfg.policy == "crop":
        return crops or [centre_box(width, height, short)]
    whole = centre_box(width, height, short)
    return [whole, *(box for box in crops if box != whole)][:count]


def _render(image: Image.Image, box: Box, cfg: PreprocessConfig) -> Image.Image:
    """Crop then resize (not ``resize(box=...)``, whose filter reads pixels outside the box),
    or for ``scale_first`` exactly that: the box's pixels of the whole image scaled."""
    size = cfg.image_size
    if cfg.policy == "scale_first":
        return _render_scaled(image, box, cfg)
    if box.side != image.width or box.side != image.height:
        image = image.crop(box.pil())
    if box.side != size:
        image = image.resize((size, size), _RESAMPLE[cfg.interpolation])
    return image


#: ``scale_first`` scales the whole image up to this aspect ratio, as the published pipelines
#: do; longer strips are scaled through the box's source region instead (Pillow's box resize),
#: so a 1 x 40M strip never becomes a giant intermediate (a few grey levels apart there).
SCALE_WHOLE_MAX_ASPECT = 4


def _render_scaled(image: Image.Image, box: Box, cfg: PreprocessConfig) -> Image.Image:
    """A box of the whole image scaled to :func:`scaled_size` (``scale_first``)."""
    scaled_w, scaled_h = scaled_size(image.width, image.height, cfg.image_size)
    resample = _RESAMPLE[cfg.interpolation]
    if max(scaled_w, scaled_h) <= SCALE_WHOLE_MAX_ASPECT * min(scaled_w, scaled_h):
        return image.resize((scaled_w, scaled_h), resample).crop(box.pil())
    sx, sy = image.width / scaled_w, image.height / scaled_h
    source = (box.left * sx, box.top * sy, (box.left + box.side) * sx, (box.top + box.side) * sy)
    return image.resize((box.side, box.side), resample, box=source)


def fit(image: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """Geometric step of the first view: ``image_size`` square per the policy.

    ``resize`` equals "shortest side to size, then centre crop", done as centre square
    first so a 1 x 40M-pixel strip never becomes a giant intermediate image. ``crop``
    never downsizes; an image smaller than the crop is scaled up to fit.
    """
    return _render(image, view_boxes(image.width, image.height, cfg)[0], cfg)


def to_tensor(image: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """Normalise a fitted RGB image into a float32 CHW tensor."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(cfg.mean, dtype=np.float32)) / np.asarray(cfg.std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def preprocess(image: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """RGB PIL image -> the first view (3, image_size, image_size): what training feeds."""
    image = _rgb(image)
    return to_tensor(fit(image, cfg), cfg)


def preprocess_views(image: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """RGB PIL image -> all its views (V, 3, S, S), 1 <= V <= ``cfg.views``: what is scored."""
    image = _rgb(image)
    boxes = view_boxes(image.width, image.height, cfg)
    return torch.stack([to_tensor(_render(image, box, cfg), cfg) for box in boxes])


def preprocess_batch(images: Sequence[Image.Image], cfg: PreprocessConfig) -> torch.Tensor:
    """Stack the first views into one (N, 3, S, S) batch (training and probes)."""
    if not images:
        return torch.empty((0, 3, cfg.image_size, cfg.image_size))
    return torch.stack([preprocess(image, cfg) for image in images])
