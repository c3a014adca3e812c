"""Evaluation through the serving engine, so reported numbers are what the worker delivers.

Images are decoded by the serving decoder, preprocessed by the checkpoint's own
preprocessing and scored by :class:`~clipguard.detector.engine.InferenceEngine`; only then
are metrics computed: accuracy at the stored threshold, AP and ROC-AUC, real and fake
accuracy separately, the same per generator, and source attribution with its confusion
matrix.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from clipguard.detector.engine import InferenceEngine
from clipguard.detector.preprocess import PreprocessConfig, decode_min_side, preprocess_views
from clipguard.training.data import UNKNOWN_SOURCE, LabelledImage, load_or_none
from clipguard.training.metrics import (
    average_precision,
    confusion_matrix,
    reliability,
    roc_auc,
    tpr_at_fpr,
)

Transform = Callable[[Image.Image], Image.Image]
DECODE_THREADS = min(8, os.cpu_count() or 1)


@dataclass
class Scored:
    """Engine outputs for the decodable items, aligned with ``items``."""

    items: list[LabelledImage]
    ai_scores: torch.Tensor  # (N,) calibrated P(AI)
    source_probs: torch.Tensor  # (N, C)
    skipped: int = 0

    @property
    def is_fake(self) -> np.ndarray:
        return np.asarray([item.is_fake for item in self.items], dtype=bool)

    @property
    def sources(self) -> np.ndarray:
        return np.asarray([item.source for item in self.items], dtype=np.int64)


def _prepare(
    item: LabelledImage, cfg: PreprocessConfig, transform: Transform | None
) -> torch.Tensor | None:
    min_side = decode_min_side(cfg)  # the engine's decode: DCT-scaled where it serves so
    image = load_or_none(item, lambda it: it.load(min_side))
    if image is None:
        return None
    if transform is not None:
        image = transform(image)
    return preprocess_views(image, cfg)


def _pixels(
    items: Sequence[LabelledImage], engine: InferenceEngine, transform: Transform | None
) -> tuple[list[LabelledImage], list[torch.Tensor]]:
    """Decode and cut every image into its views (the engine's contract, overrides included)
    in a thread pool (Pillow releases the GIL), order kept."""
    cfg = engine.preprocess
    with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
        prepared = list(pool.map(lambda item: _prepare(item, cfg, transform), items))
    kept = [item for item, t in zip(items, prepared, strict=True) if t is not None]
    return kept, [t for t in prepared if t is not None]


def score_items(
    engine: InferenceEngine,
    items: Sequence[LabelledImage],
    *,
    batch_size: int = 64,
    transform: Transform | None = None,
    progress: bool = False,
    desc: str = "scoring",
) -> Scored:
    """Decode, (perturb), preprocess and score every item; undecodable ones are counted."""
    kept: list[LabelledImage] = []
    ai_parts, source_parts = [], []
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False, file=sys.stderr):
        chunk_items, tensors = _pixels(items[start : start + batch_size], engine, transform)
        if not tensors:
            continue
        ai, sources = engine.scores(tensors)
        kept += chunk_items
        ai_parts.append(ai)
        source_parts.append(sources)
    if not ai_parts:
        return Scored([], torch.empty(0), torch.empty(0, len(engine.classes)), len(items))
    return Scored(kept, torch.cat(ai_parts), torch.cat(source_parts), len(items) - len(kept))


def engine_logits(
    engine: InferenceEngine, items: Sequence[LabelledImage], batch_size: int = 64
) -> tuple[torch.Tensor, list[LabelledImage]]:
    """Raw binary logits, views aggregated, exactly as the engine computes them (calibration)."""
    logits, kept = [], []
    for start in range(0, len(items), batch_size):
        chunk_items, tensors = _pixels(items[start : start + batch_size], engine, None)
        if not tensors:
            continue
        logits.append(engine.logits(tensors)[0])
        kept += chunk_items
    return (torch.cat(logits) if logits else torch.empty(0)), kept


def _rate(mask: np.ndarray) -> float | None:
    return float(mask.mean()) if mask.size else None


def binary_metrics(is_fake: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Accuracy at the stored threshold always next to the ranking metrics (AUC, AP): a
    detector with AUC 1.0 whose threshold does not transfer still fails every upload."""
    predicted = scores >= threshold
    real_acc = _rate(~predicted[~is_fake])
    fake_acc = _rate(predicted[is_fake])
    n_real = int((~is_fake).sum())
    ece, _ = reliability(is_fake, scores)
    return {
        "n": int(is_fake.size),
        "n_real": n_real,
        "n_fake": int(is_fake.sum()),
        "accuracy": _rate(predicted == is_fake),
        "balanced_accuracy": (
            (real_acc + fake_acc) / 2 if real_acc is not None and fake_acc is not None else None
        ),
        "real_accuracy": real_acc,
        "fake_accuracy": fake_acc,
        "tpr_at_1pct_fpr": tpr_at_fpr(is_fake, scores, 0.01),
        "tpr_at_0.1pct_fpr": tpr_at_fpr(is_fake, scores, 0.001),
        "min_resolvable_fpr": 1.0 / n_real if n_real else None,
        "ap": average_precision(is_fake, scores),
        "auc": roc_auc(is_fake, scores),
        "ece": ece,
    }


def _generator_pick(source_probs: torch.Tensor) -> np.ndarray:
    """Attribution among generators only: "which generator", given it is generated."""
    if source_probs.shape[1] < 2:
        return np.zeros(source_probs.shape[0], dtype=np.int64)
    return (source_probs[:, 1:].argmax(-1) + 1).numpy()


def _attribution(picks: np.ndarray, sources: np.ndarray, fake: np.ndarray) -> float | None:
    known = fake & (sources != UNKNOWN_SOURCE)
    return float((picks[known] == sources[known]).mean()) if known.any() else None


def group_of(item: LabelledImage, classes: Sequence[str]) -> str | None:
    if item.group is not None:
        return item.group
    if item.is_fake and 0 < item.source < len(classes):
        return classes[item.source]
    return None


def per_generator(
    scored: Scored, classes: Sequence[str], threshold: float
) -> dict[str, dict[str, Any]]:
    """Each generator's fakes against its paired reals (same group), else all reals."""
    fake, sources = scored.is_fake, scored.sources
    scores = scored.ai_scores.numpy()
    picks = _generator_pick(scored.source_probs)
    groups = np.asarray([group_of(item, classes) for item in scored.items], dtype=object)
    pooled_reals = ~fake & (groups == None)  # noqa: E711 - elementwise on an object array
    result: dict[str, dict[str, Any]] = {}
    for name in sorted({g for g, f in zip(groups, fake, strict=True) if f and g is not None}):
        fakes = fake & (groups == name)
        reals = ~fake & (groups == name)
        if not reals.any():
            reals = pooled_reals if pooled_reals.any() else ~fake
        mask = fakes | reals
        metrics = binary_metrics(fake[mask], scores[mask], threshold)
        metrics["source_accuracy"] = _attribution(picks[fakes], sources[fakes], fake[fakes])
        result[name] = metrics
    return result


def summarize(scored: Scored, classes: Sequence[str], threshold: float) -> dict[str, Any]:
    """Every metric of one scored set (JSON-ready)."""
    fake, sources = scored.is_fake, scored.sources
    scores = scored.ai_scores.numpy()
    report = binary_metrics(fake, scores, threshold)
    report["threshold"] = threshold
    report["reliability"] = reliability(fake, scores)[1]
    report["skipped_images"] = scored.skipped
    report["source_accuracy"] = _attribution(_generator_pick(scored.source_probs), sources, fake)
    known = sources != UNKNOWN_SOURCE
    predicted = scored.source_probs.argmax(-1).numpy()
    report["per_source"] = {
        name: {
            "n": int((sources == index).sum()),
            "accuracy": _rate((scores[sources == index] >= threshold) == fake[sources == index]),
        }
        for index, name in enumerate(classes)
        if (sources == index).any()
    }
    report["per_generator"] = per_generator(scored, classes, threshold)
    report["source_confusion"] = {
        "classes": list(classes),
        "rows": "true source",
        "columns": "predicted source (argmax over all classes)",
        "matrix": confusion_matrix(sources[known], predicted[known], len(classes)).tolist(),
        "accuracy": _rate(predicted[known] == sources[known]),
    }
    return report


def remap_sources(
    items: Sequence[LabelledImage], from_classes: Sequence[str], to_classes: Sequence[str]
) -> list[LabelledImage]:
    """Re-index a dataset's items onto a checkpoint's classes, by name.

    A generator the checkpoint does not know keeps its name as the group (it still counts
    per generator) but has an unknown source for attribution.
    """
    if list(from_classes) == list(to_classes):
        return list(items)
    out = []
    for item in items:
        source = item.source
        if source > 0:
            name = from_classes[source]
            source = to_classes.index(name) if name in to_classes else UNKNOWN_SOURCE
            group = item.group or name
        else:
            group = item.group
        out.append(LabelledImage(source=source, image=item.image, path=item.path, group=group))
    return out


def evaluate(
    engine: InferenceEngine,
    items: Sequence[LabelledImage],
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, Any]:
    scored = score_items(engine, items, batch_size=batch_size, progress=progress)
    return summarize(scored, engine.classes, engine.threshold)


#: Per-generator fields kept in the seen/unseen report; each is also averaged per status.
SEEN_UNSEEN_FIELDS = (
    "accuracy",
    "balanced_accuracy",
    "fake_accuracy",
    "real_accuracy",
    "auc",
    "ap",
)


def seen_unseen(
    per_generator_metrics: dict[str, dict[str, Any]], unseen: Sequence[str]
) -> dict[str, Any]:
    """Tag each generator's row seen or unseen; average each field over each group of rows.

    A row is that generator's fakes against the reals (``per_generator``): accuracy at the
    stored threshold, balanced accuracy, AUC and AP of that generator vs real.
    """
    held = set(unseen)
    rows = [
        {
            "generator": name,
            "status": "unseen" if name in held else "seen",
            "n_real": metrics.get("n_real"),
            "n_fake": metrics.get("n_fake"),
            **{field: metrics.get(field) for field in SEEN_UNSEEN_FIELDS},
        }
        for name, metrics in sorted(per_generator_metrics.items())
    ]
    report: dict[str, Any] = {"rows": rows}
    for status in ("seen", "unseen"):
        mine = [r for r in rows if r["status"] == status]
        summary: dict[str, Any] = {"n_generators": len(mine)}
        for field in SEEN_UNSEEN_FIELDS:
            values = [r[field] for r in mine if r[field] is not None]
            summary[f"mean_{field}"] = float(np.mean(values)) if values else None
        report[status] = summary
    return report
