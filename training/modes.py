"""Which weights train: ``full`` (the paper), ``linear`` (frozen encoder, UniversalFakeDetect),
``lora`` (low-rank adapters on attention, C2P-CLIP / DeeCLIP), ``last-n`` (the last N
transformer blocks plus the final norm and projection) and ``layernorm`` (every LayerNorm's
scale and shift, features L2-normalised before the heads: GenD, 2025). Both heads always train.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from clipguard.detector.heads import Detector, FeatureNorm
from clipguard.training.lora import add_lora, has_lora, merge_lora

Mode = Literal["full", "linear", "lora", "last-n", "layernorm"]
MODES: tuple[str, ...] = ("full", "linear", "lora", "last-n", "layernorm")


def feature_norm(mode: str) -> FeatureNorm:
    """GenD trains LayerNorms against unit-norm features; every other mode uses raw ones."""
    return "l2" if mode == "layernorm" else "none"


def _heads(detector: Detector) -> list[nn.Parameter]:
    return [*detector.binary_head.parameters(), *detector.source_head.parameters()]


def _unfreeze_last_blocks(encoder: nn.Module, n: int) -> None:
    blocks = getattr(getattr(encoder, "transformer", None), "resblocks", None)
    if blocks is None:
        raise ValueError("last-n needs an open_clip VisionTransformer (transformer.resblocks)")
    if not 1 <= n <= len(blocks):
        raise ValueError(f"last-n: N must be between 1 and {len(blocks)} blocks, got {n}")
    for block in list(blocks)[-n:]:
        block.requires_grad_(True)
    for name in ("ln_post", "attn_pool", "attn_pool_contrastive"):
        module = getattr(encoder, name, None)
        if isinstance(module, nn.Module):
            module.requires_grad_(True)
    proj = getattr(encoder, "proj", None)
    if isinstance(proj, nn.Parameter):
        proj.requires_grad_(True)


def _unfreeze_layernorms(encoder: nn.Module) -> None:
    norms = [m for m in encoder.modules() if isinstance(m, nn.LayerNorm)]
    if not norms:
        raise ValueError("layernorm mode needs an encoder with LayerNorm layers")
    for norm in norms:
        norm.requires_grad_(True)


def prepare(
    detector: Detector, mode: str, *, lora_rank: int = 8, lora_alpha: float = 16.0, last_n: int = 2
) -> None:
    """Set ``requires_grad`` (and add adapters) for ``mode``; idempotent for LoRA."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    detector.requires_grad_(mode == "full")
    if mode == "lora" and not has_lora(detector.encoder):
        add_lora(detector.encoder, rank=lora_rank, alpha=lora_alpha)
    elif mode == "last-n":
        _unfreeze_last_blocks(detector.encoder, last_n)
    elif mode == "layernorm":
        _unfreeze_layernorms(detector.encoder)
    detector.feature_norm = feature_norm(mode)
    for parameter in _heads(detector):
        parameter.requires_grad_(True)


def finalize(detector: Detector) -> int:
    """Make the detector plain again for saving and serving: merge adapters. Returns merges."""
    return merge_lora(detector.encoder)


def trainable_summary(detector: Detector) -> dict[str, Any]:
    total = sum(p.numel() for p in detector.parameters())
    trainable = sum(p.numel() for p in detector.parameters() if p.requires_grad)
    return {"parameters": total, "trainable_parameters": trainable}
