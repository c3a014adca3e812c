"""The detector: an image encoder with a binary real/AI head and a generation-source head."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import nn


class DetectorOutput(NamedTuple):
    """Raw logits; calibration and thresholds are applied by the engine, not the model."""

    binary_logit: torch.Tensor  # (N,) positive = AI-generated
    source_logits: torch.Tensor  # (N, num_sources), class 0 = real


FeatureNorm = Literal["none", "l2"]
FEATURE_NORMS: tuple[str, ...] = ("none", "l2")


class Detector(nn.Module):
    """Encoder features feed two linear heads trained together (arXiv 2404.08788).

    ``feature_norm`` ``l2`` puts the features on the unit sphere before the heads (GenD's
    LayerNorm tuning); it is part of the model, so the manifest records it and serving,
    export and training all apply it through :meth:`features`.
    """

    def __init__(
        self,
        encoder: nn.Module,
        feature_dim: int,
        num_sources: int,
        feature_norm: FeatureNorm = "none",
    ) -> None:
        super().__init__()
        if num_sources < 2:
            raise ValueError("a detector needs at least two sources: 'real' and one generator")
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(f"unknown feature_norm {feature_norm!r}; choose none or l2")
        self.encoder = encoder
        self.feature_norm: FeatureNorm = feature_norm
        self.binary_head = nn.Linear(feature_dim, 1)
        self.source_head = nn.Linear(feature_dim, num_sources)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.encoder(pixels)
        if self.feature_norm == "l2":
            features = nn.functional.normalize(features, dim=-1)
        return features

    def classify(self, features: torch.Tensor) -> DetectorOutput:
        """Heads alone: lets linear probing train on cached features."""
        return DetectorOutput(self.binary_head(features).squeeze(-1), self.source_head(features))

    def forward(self, pixels: torch.Tensor) -> DetectorOutput:
        return self.classify(self.features(pixels))
