"""The detector: an image encoder with a binary real/AI head and a generation-source head."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import nn

from clipguard.detector.multilayer import MultilayerHead, MultilayerSpec, block_cls_tokens


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

    ``multilayer`` swaps the encoder's final features for RINE's head over every block's
    CLS token (:mod:`clipguard.detector.multilayer`); the heads then read its projection.
    :meth:`encode` is what a frozen encoder gives (cacheable), :meth:`embed` the rest.
    """

    def __init__(
        self,
        encoder: nn.Module,
        feature_dim: int,
        num_sources: int,
        feature_norm: FeatureNorm = "none",
        multilayer: MultilayerSpec | None = None,
    ) -> None:
        super().__init__()
        if num_sources < 2:
            raise ValueError("a detector needs at least two sources: 'real' and one generator")
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(f"unknown feature_norm {feature_norm!r}; choose none or l2")
        self.encoder = encoder
        self.feature_norm: FeatureNorm = feature_norm
        self.block_head = MultilayerHead(multilayer) if multilayer is not None else None
        head_dim = multilayer.proj_dim if multilayer is not None else feature_dim
        self.binary_head = nn.Linear(head_dim, 1)
        self.source_head = nn.Linear(head_dim, num_sources)

    def attach_multilayer(self, spec: MultilayerSpec) -> None:
        """Put RINE's head between the encoder and fresh heads (``--mode multilayer``)."""
        self.block_head = MultilayerHead(spec)
        self.binary_head = nn.Linear(spec.proj_dim, 1)
        self.source_head = nn.Linear(spec.proj_dim, self.source_head.out_features)

    @property
    def multilayer(self) -> MultilayerSpec | None:
        return self.block_head.spec if self.block_head is not None else None

    def encoded_shape(self) -> tuple[int, ...]:
        """Per-image shape of :meth:`encode`: (feature_dim,) or (blocks, width)."""
        spec = self.multilayer
        return (spec.blocks, spec.width) if spec is not None else (self.binary_head.in_features,)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The encoder's part: final features, or every block's CLS token (multilayer)."""
        if self.block_head is not None:
            return block_cls_tokens(self.encoder, pixels)
        return self.encoder(pixels)

    def embed(self, encoded: torch.Tensor) -> torch.Tensor:
        """Encoder output -> the features the heads read (multilayer head, L2 norm)."""
        features = self.block_head(encoded) if self.block_head is not None else encoded
        if self.feature_norm == "l2":
            features = nn.functional.normalize(features, dim=-1)
        return features

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embed(self.encode(pixels))

    def classify(self, features: torch.Tensor) -> DetectorOutput:
        """Heads alone: lets linear probing train on cached features."""
        return DetectorOutput(self.binary_head(features).squeeze(-1), self.source_head(features))

    def forward(self, pixels: torch.Tensor) -> DetectorOutput:
        return self.classify(self.features(pixels))
