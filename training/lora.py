"""Low-rank adapters on the encoder's attention projections (C2P-CLIP, DeeCLIP style).

Each wrapped weight ``W`` becomes ``W + (alpha / r) * B @ A`` through a
``torch.nn.utils.parametrize`` parametrization, so open_clip's attention code (torch's
``nn.MultiheadAttention`` or open_clip's own ``Attention``, both reading ``in_proj_weight``
and ``out_proj``) runs unchanged. ``B`` starts at zero: training starts from the pretrained
model exactly. :func:`merge_lora` folds the adapters into plain weights, so a saved
checkpoint has the ordinary layout and loads through the unchanged rebuild path.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from clipguard.training.attention import attention_projections


class LoRADelta(nn.Module):
    """Parametrization ``W -> W + scale * B @ A`` for a (out, in) weight."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = (self.lora_b @ self.lora_a) * self.scale
        return weight + delta.to(weight.dtype)


def add_lora(encoder: nn.Module, rank: int = 8, alpha: float = 16.0) -> list[nn.Parameter]:
    """Freeze the encoder, adapt its attention projections; returns the trainable params."""
    encoder.requires_grad_(False)
    trainable: list[nn.Parameter] = []
    for module, name in attention_projections(encoder, "lora"):
        weight = getattr(module, name)
        delta = LoRADelta(weight.shape[0], weight.shape[1], rank, alpha).to(
            device=weight.device, dtype=weight.dtype
        )
        parametrize.register_parametrization(module, name, delta)
        trainable += [delta.lora_a, delta.lora_b]
    return trainable


def has_lora(module: nn.Module) -> bool:
    return any(isinstance(m, LoRADelta) for m in module.modules())


@torch.no_grad()
def merge_lora(encoder: nn.Module) -> int:
    """Fold every adapter into its weight and drop the parametrization; returns the count."""
    merged = 0
    for module in list(encoder.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations.keys()):
            if any(isinstance(p, LoRADelta) for p in module.parametrizations[name]):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                merged += 1
    return merged
