"""How far an exported graph is from the torch model, and whether a batch changes a score.

The tolerances are the contract of ``clipguard export`` (docs/onnx.md): an fp32 export that
misses :data:`FP32_MAX_DELTA`, or an int8 one that misses the int8 bars, is not written.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from clipguard.detector.checkpoint import Manifest
from clipguard.detector.errors import ClipguardError
from clipguard.detector.heads import Detector
from clipguard.detector.onnx_export import scoring_graph
from clipguard.detector.onnx_runtime import run

#: fp32 ONNX vs torch: largest |delta| of P(AI) and of any source probability.
FP32_MAX_DELTA = 1e-4
#: int8 vs torch fp32 (the bar the issue sets for bf16): decisions identical on this share of
#: the held-out images, and p99 |delta P(AI)| at most this.
INT8_MIN_SAME_DECISIONS = 0.995
INT8_P99_DELTA = 0.01
#: An image scored alone vs inside a batch of other images: largest |delta P(AI)|.
BATCH_MAX_DELTA = 1e-4
BATCH_GROUP = 16


class ParityError(ClipguardError):
    """The exported graph disagrees with the torch model beyond the stated tolerance."""

    stage = "export"
    reason = "parity"

    def __init__(self, message: str, record: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        #: The measured figures, so the command can print what was missed.
        self.record = record or {}


def torch_scores(
    detector: Detector, manifest: Manifest, pixels: np.ndarray, chunk: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """The reference: the fp32 torch model's calibrated P(AI) and source probabilities."""
    graph = scoring_graph(detector, manifest)
    ai, source = [], []
    with torch.inference_mode():
        for start in range(0, len(pixels), chunk):
            out = graph(torch.from_numpy(np.ascontiguousarray(pixels[start : start + chunk])))
            ai.append(out[0].numpy())
            source.append(out[1].numpy())
    return np.concatenate(ai), np.concatenate(source)


def onnx_scores(session: Any, pixels: np.ndarray, chunk: int = 32) -> tuple[np.ndarray, ...]:
    outs = [run(session, pixels[i : i + chunk]) for i in range(0, len(pixels), chunk)]
    return tuple(np.concatenate([o[k] for o in outs]) for k in ("ai_score", "source_probs"))


def agreement(
    reference: tuple[np.ndarray, np.ndarray],
    candidate: tuple[np.ndarray, np.ndarray],
    manifest: Manifest,
) -> dict[str, Any]:
    """Score deltas and the share of identical label and policy decisions."""
    ref_ai, ref_src = reference
    ai, src = candidate
    delta = np.abs(ai - ref_ai)
    threshold, policy = manifest.calibration.threshold, manifest.policy
    same_label = (ai >= threshold) == (ref_ai >= threshold)
    same_policy = np.array(
        [
            policy.decide(float(a)) == policy.decide(float(r))
            for a, r in zip(ai, ref_ai, strict=True)
        ]
    )
    flipped = ~(same_label & same_policy)
    cuts = np.array([threshold, policy.review_at, policy.block_at])
    margin = np.abs(ref_ai[flipped, None] - cuts[None, :]).min(axis=1) if flipped.any() else None
    return {
        "images": len(ai),
        "max_abs_delta_ai_score": float(delta.max()),
        "p99_abs_delta_ai_score": float(np.quantile(delta, 0.99)),
        "max_abs_delta_source_prob": float(np.abs(src - ref_src).max()),
        "same_labels": float(same_label.mean()),
        #: Label and allow/review/block both unchanged.
        "same_decisions": float((same_label & same_policy).mean()),
        #: How far from a threshold the flipped images' torch scores were (None: no flips).
        "flip_max_margin": None if margin is None else float(margin.max()),
        "reference_ai_score_range": [float(ref_ai.min()), float(ref_ai.max())],
    }


def batch_independence(session: Any, pixels: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Each image alone vs inside a shuffled batch of :data:`BATCH_GROUP` other images."""
    alone = np.concatenate(
        [run(session, pixels[i : i + 1])["ai_score"] for i in range(len(pixels))]
    )
    order = np.random.default_rng(seed).permutation(len(pixels))
    grouped = np.empty_like(alone)
    for start in range(0, len(pixels), BATCH_GROUP):
        index = order[start : start + BATCH_GROUP]
        grouped[index] = run(session, pixels[index])["ai_score"]
    delta = np.abs(alone - grouped)
    return {
        "images": len(pixels),
        "batch": BATCH_GROUP,
        "max_abs_delta_ai_score": float(delta.max()),
        "tolerance": BATCH_MAX_DELTA,
        "ok": bool(delta.max() <= BATCH_MAX_DELTA),
    }


def check(quantize: str, parity: dict[str, Any], batch: dict[str, Any]) -> list[str]:
    """The tolerances this export misses (empty: it passes)."""
    problems = []
    if quantize == "none":
        worst = max(parity["max_abs_delta_ai_score"], parity["max_abs_delta_source_prob"])
        if worst > FP32_MAX_DELTA:
            problems.append(f"fp32 max |delta| {worst:.2e} > {FP32_MAX_DELTA:g}")
    else:
        if parity["same_decisions"] < INT8_MIN_SAME_DECISIONS:
            problems.append(
                f"int8 decisions identical on {parity['same_decisions']:.1%} "
                f"< {INT8_MIN_SAME_DECISIONS:.1%}"
            )
        if parity["p99_abs_delta_ai_score"] > INT8_P99_DELTA:
            problems.append(
                f"int8 p99 |delta ai_score| {parity['p99_abs_delta_ai_score']:.4f} "
                f"> {INT8_P99_DELTA:g}"
            )
    if not batch["ok"]:
        problems.append(
            f"scores depend on the batch: max |delta| {batch['max_abs_delta_ai_score']:.2e} "
            f"> {BATCH_MAX_DELTA:g}"
        )
    return problems
