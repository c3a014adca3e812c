"""Labelled images -> model-ready tensors through the detector's one preprocessing path."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from clipguard.detector.decode import decode_image
from clipguard.detector.errors import ImageError
from clipguard.detector.preprocess import PreprocessConfig, decode_min_side, preprocess
from clipguard.training.augment import NO_AUGMENT, AugmentConfig, augment

log = logging.getLogger(__name__)

#: Source index of a generated image whose generator is not known: binary loss only.
UNKNOWN_SOURCE = -1

#: What a corrupt or unreadable file raises while loading: skipped and counted, never fatal.
LOAD_ERRORS = (ImageError, OSError, ValueError)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]


@dataclass(frozen=True)
class LabelledImage:
    """An image (in memory or on disk) with its source.

    ``source`` is a class index: 0 is real, ``UNKNOWN_SOURCE`` a generated image of unknown
    origin. ``group`` names the benchmark subset the image belongs to (a test generator of
    CNNDetection or GenImage, whose reals are paired with its fakes), used for per-generator
    metrics.
    """

    source: int
    image: Image.Image | None = None
    path: Path | None = None
    group: str | None = None

    @property
    def is_fake(self) -> bool:
        return self.source != 0

    def load(self, min_side: int | None = None) -> Image.Image:
        """The image; files through the serving decoder (and its DCT scaling, ``min_side``),
        so training sees exactly what the worker will see."""
        if self.image is not None:
            return self.image
        assert self.path is not None
        return decode_image(self.path.read_bytes(), min_side=min_side)

    def describe(self) -> str:
        return str(self.path) if self.path is not None else f"<in-memory image {id(self):x}>"


def _load(item: LabelledImage, min_side: int | None) -> Image.Image:
    return item.load(min_side)


def load_or_none(item: LabelledImage, loader: Callable[[LabelledImage], Image.Image]):
    try:
        return loader(item)
    except LOAD_ERRORS as exc:
        log.debug("skipping %s: %s", item.describe(), exc)
        return None


class DetectorDataset(Dataset):
    """(pixels, is_fake, source, ok) per item; augmentation seeded per (seed, epoch, index).

    A file that cannot be decoded yields ``ok=False`` (zero pixels) instead of an exception;
    :func:`collate_valid` drops it and counts it, so one corrupt file never stops a run.
    """

    def __init__(
        self,
        items: Sequence[LabelledImage],
        preprocess_cfg: PreprocessConfig,
        augment_cfg: AugmentConfig = NO_AUGMENT,
        seed: int = 0,
        loader: Callable[[LabelledImage], Image.Image] | None = None,
        transform: Callable[[Image.Image], Image.Image] | None = None,
    ) -> None:
        self.items = list(items)
        self.preprocess_cfg = preprocess_cfg
        self.augment_cfg = augment_cfg
        self.seed = seed
        self.epoch = 0
        self.loader = loader or partial(_load, min_side=decode_min_side(preprocess_cfg))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        item = self.items[index]
        is_fake = torch.tensor(float(item.is_fake))
        source = torch.tensor(item.source, dtype=torch.long)
        image = load_or_none(item, self.loader)
        if image is None:
            size = self.preprocess_cfg.image_size
            return torch.zeros(3, size, size), is_fake, source, False
        if self.transform is not None:
            image = self.transform(image)
        rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
        image = augment(image, rng, self.augment_cfg, self.preprocess_cfg)
        return preprocess(image, self.preprocess_cfg), is_fake, source, True


def collate_valid(
    samples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]],
) -> Batch:
    """Stack the decodable samples; the last element counts the dropped ones."""
    good = [s for s in samples if s[3]]
    if not good:
        size = samples[0][0].shape[-1] if samples else 1
        empty = torch.empty(0)
        return torch.empty(0, 3, size, size), empty, empty.long(), len(samples)
    pixels = torch.stack([s[0] for s in good])
    is_fake = torch.stack([s[1] for s in good])
    source = torch.stack([s[2] for s in good])
    return pixels, is_fake, source, len(samples) - len(good)
