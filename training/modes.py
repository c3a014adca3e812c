"""Which weights train: ``full`` (the paper), ``linear`` (frozen encoder, UniversalFakeDetect),
``lora`` (low-rank adapters on attention, C2P-CLIP / DeeCLIP), ``last-n`` (the last N
transformer blocks plus the final norm and projection), ``layernorm`` (every LayerNorm's
scale and shift, features L2-normalised before the heads: GenD, 2025), ``multilayer`` (a frozen
encoder, RINE's head over every block's CLS token: Koutlis & Papadopoulos, ECCV 2024) and
``svd`` (the residual singular directions of every attention projection: Effort, Yan et al.,
ICML 2025). Both heads always train.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from clipguard.detector.heads import Detector, FeatureNorm
from clipguard.detector.multilayer import spec_for
from clipguard.training.lora import add_lora, has_lora, merge_lora
from clipguard.training.svd import (
    SVDResidual,
    add_svd_residual,
    has_svd_residual,
    merge_svd,
    residual_parameters,
)

Mode = Literal["full", "linear", "lora", "last-n", "layernorm", "multilayer", "svd"]
MODES: tuple[str, ...] = ("full", "linear", "lora", "last-n", "layernorm", "multilayer", "svd")
#: Modes whose encoder is frozen: its outputs are computed once and cached.
CACHED_MODES: tuple[str, ...] = ("linear", "multilayer")


class ModeError(ValueError):
    """A mode's setting does not fit the encoder (an SVD rank, a block count)."""


def feature_norm(mode: str) -> FeatureNorm:
    """GenD trains LayerNorms against unit-norm features; every other mode uses raw ones."""
    return "l2" if mode == "layernorm" else "none"


def _heads(detector: Detector) -> list[nn.Parameter]:
    block_head = list(detector.block_head.parameters()) if detector.block_head else []
    return [*block_head, *detector.binary_head.parameters(), *detector.source_head.parameters()]


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
    detector: Detector,
    mode: str,
    *,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    last_n: int = 2,
    svd_rank: int | None = None,
) -> None:
    """Set ``requires_grad`` (and add adapters or the multi-layer head) for ``mode``;
    idempotent for LoRA, SVD and the multi-layer head."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "multilayer" and detector.block_head is None:
        detector.attach_multilayer(spec_for(detector.encoder))
    detector.requires_grad_(mode == "full")
    try:
        if mode == "lora" and not has_lora(detector.encoder):
            add_lora(detector.encoder, rank=lora_rank, alpha=lora_alpha)
        elif mode == "svd":
            if not has_svd_residual(detector.encoder):
                add_svd_residual(detector.encoder, rank=svd_rank)
            for parameter in residual_parameters(detector.encoder):
                parameter.requires_grad_(True)
        elif mode == "last-n":
            _unfreeze_last_blocks(detector.encoder, last_n)
        elif mode == "layernorm":
            _unfreeze_layernorms(detector.encoder)
    except ValueError as exc:
        raise ModeError(str(exc)) from None
    detector.feature_norm = feature_norm(mode)
    for parameter in _heads(detector):
        parameter.requires_grad_(True)


def finalize(detector: Detector) -> int:
    """Make the detector plain again for saving and serving: merge adapters and SVD
    residuals into ordinary weights. Returns the number of merged weights."""
    return merge_lora(detector.encoder) + merge_svd(detector.encoder)


def mode_info(detector: Detector) -> dict[str, Any]:
    """What a trained run's manifest records about its mode's extra structure."""
    info: dict[str, Any] = {}
    if detector.block_head is not None:
        info["block_importance"] = detector.block_head.block_importance()
    residuals = [m for m in detector.encoder.modules() if isinstance(m, SVDResidual)]
    if residuals:
        info["svd"] = {
            "weights": len(residuals),
            "frozen_rank": sorted({m.rank for m in residuals}),
            "residual_rank": sorted({int(m.s.numel()) for m in residuals}),
        }
    return info


def trainable_summary(detector: Detector) -> dict[str, Any]:
    total = sum(p.numel() for p in detector.parameters())
    trainable = sum(p.numel() for p in detector.parameters() if p.requires_grad)
    return {"parameters": total, "trainable_parameters": trainable}
