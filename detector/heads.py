"""The detector: an image encoder with a binary real/AI head and a generation-source head."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class DetectorOutput(NamedTuple):
    """Raw logits; calibration and thresholds are applied by the engine, not the model."""

    binary_logit: torch.Tensor  # (N,) positive = AI-generated
    source_logits: torch.Tensor  # (N, num_sources), class 0 = real


class Detector(nn.Module):
    """Encoder features feed two linear heads trained together (arXiv 2404.08788)."""

    def __init__(self, encoder: nn.Module, feature_dim: int, num_sources: int) -> None:
        super().__init__()
        if num_sources < 2:
            raise ValueError("a detector needs at least two sources: 'real' and one generator")
        self.encoder = encoder
        self.binary_head = nn.Linear(feature_dim, 1)
        self.source_head = nn.Linear(feature_dim, num_sources)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels)

    def classify(self, features: torch.Tensor) -> DetectorOutput:
        """Heads alone: lets linear probing train on cached features."""
        return DetectorOutput(self.binary_head(features).squeeze(-1), self.source_head(features))

    def forward(self, pixels: torch.Tensor) -> DetectorOutput:
        return self.classify(self.features(pixels))
