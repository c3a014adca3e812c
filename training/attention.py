"""The weights the adapter modes (``lora``, ``svd``) change: every attention projection."""

from __future__ import annotations

import torch
from torch import nn


def attention_projections(encoder: nn.Module, mode: str) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every block's ``in_proj_weight`` and ``out_proj.weight``.

    Both torch's ``nn.MultiheadAttention`` and open_clip's own ``Attention`` keep them under
    these names, so a parametrization on them leaves open_clip's attention code unchanged.
    """
    blocks = getattr(getattr(encoder, "transformer", None), "resblocks", None)
    if blocks is None:
        raise ValueError(
            f"--mode {mode} needs an open_clip VisionTransformer (transformer.resblocks)"
        )
    targets: list[tuple[nn.Module, str]] = []
    for block in blocks:
        attn = getattr(block, "attn", None)
        if isinstance(getattr(attn, "in_proj_weight", None), torch.Tensor):
            targets.append((attn, "in_proj_weight"))
        out_proj = getattr(attn, "out_proj", None)
        if isinstance(getattr(out_proj, "weight", None), torch.Tensor):
            targets.append((out_proj, "weight"))
    if not targets:
        raise ValueError(f"--mode {mode} found no attention projections in the encoder")
    return targets
