"""Labelled images -> model-ready tensors through the detector's one preprocessing path."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from clipguard.detector.decode import decode_image
from clipguard.detector.preprocess import PreprocessConfig, preprocess
from clipguard.training.augment import NO_AUGMENT, AugmentConfig, augment

UNKNOWN_SOURCE = -1


@dataclass(frozen=True)
class LabelledImage:
    """An image (in memory or on disk) with its source; ``source`` 0 means real."""

    source: int
    image: Image.Image | None = None
    path: Path | None = None

    @property
    def is_fake(self) -> bool:
        return self.source != 0

    def load(self) -> Image.Image:
        if self.image is not None:
            return self.image
        assert self.path is not None
        # The serving decoder, so training sees exactly what the worker will see.
        return decode_image(self.path.read_bytes())


class DetectorDataset(Dataset):
    """(pixels, is_fake, source) triples; augmentation seeded per (epoch, index)."""

    def __init__(
        self,
        items: Sequence[LabelledImage],
        preprocess_cfg: PreprocessConfig,
        augment_cfg: AugmentConfig = NO_AUGMENT,
        seed: int = 0,
        loader: Callable[[LabelledImage], Image.Image] | None = None,
    ) -> None:
        self.items = list(items)
        self.preprocess_cfg = preprocess_cfg
        self.augment_cfg = augment_cfg
        self.seed = seed
        self.epoch = 0
        self.loader = loader or LabelledImage.load

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        item = self.items[index]
        rng = random.Random(hash((self.seed, self.epoch, index)))
        image = augment(self.loader(item), rng, self.augment_cfg)
        return (
            preprocess(image, self.preprocess_cfg),
            torch.tensor(float(item.is_fake)),
            torch.tensor(item.source, dtype=torch.long),
        )
