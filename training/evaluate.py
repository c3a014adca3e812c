"""Evaluation through the serving engine, so reported numbers are what the worker delivers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from clipguard.detector.engine import InferenceEngine
from clipguard.detector.preprocess import preprocess
from clipguard.training.data import UNKNOWN_SOURCE, LabelledImage


def engine_scores(
    engine: InferenceEngine, items: Sequence[LabelledImage], batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated AI scores and source probabilities for every item, in order."""
    ai_parts, source_parts = [], []
    cfg = engine.manifest.preprocess
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        pixels = torch.stack([preprocess(item.load(), cfg) for item in chunk])
        ai, sources = engine.scores(pixels)
        ai_parts.append(ai)
        source_parts.append(sources)
    if not ai_parts:
        return torch.empty(0), torch.empty(0, len(engine.classes))
    return torch.cat(ai_parts), torch.cat(source_parts)


def summarize(
    ai_scores: torch.Tensor,
    source_probs: torch.Tensor,
    items: Sequence[LabelledImage],
    classes: Sequence[str],
    threshold: float,
) -> dict[str, Any]:
    """Accuracy at the stored threshold, per class of truth, and source attribution."""
    truth = torch.tensor([item.is_fake for item in items], dtype=torch.bool)
    sources = torch.tensor([item.source for item in items], dtype=torch.long)
    predicted = ai_scores >= threshold
    real, fake = ~truth, truth
    # Attribution among generators only: "which generator", given it is generated.
    generator_pick = source_probs[:, 1:].argmax(-1) + 1 if source_probs.shape[1] > 1 else None
    known_fake = fake & (sources != UNKNOWN_SOURCE)
    per_source: dict[str, dict[str, float | int]] = {}
    for index, name in enumerate(classes):
        mask = sources == index
        if mask.any():
            per_source[name] = {
                "n": int(mask.sum()),
                "accuracy": float((predicted[mask] == truth[mask]).float().mean()),
            }
    return {
        "n": len(items),
        "threshold": threshold,
        "accuracy": float((predicted == truth).float().mean()) if len(items) else 0.0,
        "real_accuracy": float((~predicted[real]).float().mean()) if real.any() else None,
        "fake_accuracy": float(predicted[fake].float().mean()) if fake.any() else None,
        "source_accuracy": (
            float((generator_pick[known_fake] == sources[known_fake]).float().mean())
            if generator_pick is not None and known_fake.any()
            else None
        ),
        "per_source": per_source,
    }


def evaluate(engine: InferenceEngine, items: Sequence[LabelledImage]) -> dict[str, Any]:
    ai_scores, source_probs = engine_scores(engine, items)
    return summarize(ai_scores, source_probs, items, engine.classes, engine.threshold)
