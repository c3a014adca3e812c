"""RINE's multi-layer head (Koutlis & Papadopoulos, ECCV 2024): every block's CLS token.

A frozen CLIP encoder's last block is tuned to semantics; the low-level traces a generator
leaves are clearer in the intermediate blocks. RINE reads the CLS token after every
transformer block, projects each one with a small MLP shared across blocks (``Q1``), mixes
the blocks with a learned importance per block and feature channel (softmax over blocks,
the "Trainable Importance Estimator"), and passes the mix through a second small MLP
(``Q2``) to the heads. Only the head trains, so the per-block tokens are computed once and
cached (:func:`block_cls_tokens` is the frozen part, :class:`MultilayerHead` the trained one).

Every block's token goes through the tower's ``ln_post`` (the final LayerNorm, which the
last block's token meets in the tower's own forward): the residual stream's scale grows
with depth, and one fixed normalisation makes the blocks comparable. The tower's ``proj``
is not applied: it was trained for the last block only, and ``Q1`` is a learned linear map
of its own.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class MultilayerSpec(BaseModel):
    """The head's shape, stored in the manifest so a checkpoint rebuilds it exactly."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Transformer blocks of the encoder (one CLS token each).
    blocks: int = Field(ge=1)
    #: The encoder's token width.
    width: int = Field(ge=1)
    #: Width of the projection and of the features the heads see.
    proj_dim: int = Field(default=128, ge=1)
    #: Linear+ReLU layers in each of the two projections (RINE's ``q``).
    proj_layers: int = Field(default=1, ge=1, le=4)


def _blocks(encoder: nn.Module) -> tuple[nn.ModuleList, bool]:
    transformer = getattr(encoder, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if not isinstance(blocks, nn.ModuleList) or not hasattr(encoder, "_embeds"):
        raise ValueError(
            "the multilayer head needs an open_clip VisionTransformer "
            "(transformer.resblocks and _embeds); this encoder has neither"
        )
    return blocks, bool(getattr(transformer, "batch_first", True))


def spec_for(encoder: nn.Module, proj_dim: int = 128, proj_layers: int = 1) -> MultilayerSpec:
    """The head's shape for ``encoder``: its block count and token width."""
    blocks, _ = _blocks(encoder)
    width = int(getattr(encoder.transformer, "width", 0)) or int(
        encoder.class_embedding.shape[-1]  # type: ignore[union-attr]
    )
    return MultilayerSpec(
        blocks=len(blocks), width=width, proj_dim=proj_dim, proj_layers=proj_layers
    )


def block_cls_tokens(encoder: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(N,3,S,S) pixels -> (N, blocks, width): ``ln_post`` of each block's CLS token.

    Runs the tower's own stem (``_embeds``: patches, class token, positions, ``ln_pre``)
    and then its blocks one by one, so the graph is plain (traceable for ONNX, no hooks).
    open_clip runs the blocks sequence-first when ``batch_first`` is off; the CLS token is
    token 0 either way.
    """
    blocks, batch_first = _blocks(encoder)
    x = encoder._embeds(pixels)  # (N, L, W)
    if not batch_first:
        x = x.transpose(0, 1)
    tokens = []
    for block in blocks:
        x = block(x)
        tokens.append(x[:, 0] if batch_first else x[0])
    return encoder.ln_post(torch.stack(tokens, dim=1))


def _mlp(width_in: int, width: int, layers: int) -> nn.Sequential:
    parts: list[nn.Module] = []
    for index in range(layers):
        parts += [nn.Linear(width_in if index == 0 else width, width), nn.ReLU()]
    return nn.Sequential(*parts)


class MultilayerHead(nn.Module):
    """Per-block CLS tokens (N, blocks, width) -> features (N, proj_dim) for the heads."""

    def __init__(self, spec: MultilayerSpec) -> None:
        super().__init__()
        self.spec = spec
        self.q1 = _mlp(spec.width, spec.proj_dim, spec.proj_layers)
        #: RINE's importance estimator: zeros = every block weighted equally at the start.
        self.importance = nn.Parameter(torch.zeros(spec.blocks, spec.proj_dim))
        self.q2 = _mlp(spec.proj_dim, spec.proj_dim, spec.proj_layers)

    def block_weights(self) -> torch.Tensor:
        """(blocks, proj_dim): each feature channel's softmax over the blocks."""
        return torch.softmax(self.importance, dim=0)

    def block_importance(self) -> list[float]:
        """Mean weight of each block over the channels: which depths the head relies on."""
        return [round(float(w), 4) for w in self.block_weights().detach().mean(dim=1)]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        projected = self.q1(tokens)  # (N, blocks, proj_dim)
        mixed = (projected * self.block_weights()).sum(dim=1)
        return self.q2(mixed)
