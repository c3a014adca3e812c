"""Re-calibration on a platform's own images (``clipguard calibrate``): same weights, new
calibration and policy, with a record of where they came from.

A threshold fitted on a public validation set does not transfer to a platform's traffic.
With labelled images (both classes) temperature and bias are refitted (class-balanced
Platt scaling) and the threshold set for the target false-positive rate on the reals; with
reals only (uploads from before generators existed: the common case) the threshold alone is
set so the reals meet the target, and the report gives the expected flag rate on uploads
like them with a 95% interval. Ranking (AUC) cannot change: the weights are not touched.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipguard.detector.checkpoint import Calibration, Manifest, Recalibration
from clipguard.detector.engine import InferenceEngine
from clipguard.detector.policy import Policy
from clipguard.training.calibrate import BLOCK_FPR_FACTOR, fit_platt, nll, served_scores
from clipguard.training.data import LabelledImage
from clipguard.training.evaluate import engine_logits
from clipguard.training.metrics import (
    reliability,
    roc_auc,
    threshold_for_fpr,
    tpr_at_fpr,
    wilson_interval,
)

#: Never fewer reals than this, whatever the target.
MIN_REAL_FLOOR = 100
#: Expected false positives at the target the threshold must rest on: n_real >= this / F.
MIN_EXPECTED_FALSE_POSITIVES = 5


class CalibrationDataError(ValueError):
    """The calibration data cannot support the requested threshold."""


def min_real_images(target_fpr: float) -> int:
    """Reals needed for ``target_fpr``: at least five false positives expected at the target
    (fewer and the threshold is set by one or two images), and never under 100."""
    return max(MIN_REAL_FLOOR, math.ceil(MIN_EXPECTED_FALSE_POSITIVES / target_fpr - 1e-9))


def data_summary(items: Sequence[LabelledImage], classes: Sequence[str], root: Path) -> dict:
    """Counts per class and a digest of the file list: what the threshold was fitted on."""
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda i: str(i.path)):
        if item.path is not None:
            digest.update(
                f"{item.path.relative_to(root) if root.is_dir() else item.path}\n".encode()
            )
    per_source: dict[str, int] = {}
    for item in items:
        name = classes[item.source] if 0 <= item.source < len(classes) else "unknown_generator"
        per_source[name] = per_source.get(name, 0) + 1
    return {
        "root": str(root),
        "n_images": len(items),
        "n_real": sum(1 for i in items if not i.is_fake),
        "n_fake": sum(1 for i in items if i.is_fake),
        "per_source": per_source,
        "files_sha256": digest.hexdigest(),
    }


def _side(
    logits: torch.Tensor, fake: np.ndarray, cal: Calibration, threshold: float
) -> dict[str, Any]:
    """One column of the before/after report: the data scored under one calibration."""
    scores = served_scores(logits, cal.temperature, cal.bias).numpy()
    flagged = scores >= threshold
    reals = ~fake
    k, n = int(flagged[reals].sum()), int(reals.sum())
    side: dict[str, Any] = {
        "temperature": cal.temperature,
        "bias": cal.bias,
        "threshold": threshold,
        "n_real": n,
        "fpr": k / n if n else None,
        "fpr_95ci": list(wilson_interval(k, n)) if n else None,
    }
    if fake.any() and reals.any():
        tpr = float(flagged[fake].mean())
        side.update(
            {
                "n_fake": int(fake.sum()),
                "accuracy": float((flagged == fake).mean()),
                "balanced_accuracy": (tpr + 1 - k / n) / 2,
                "tpr": tpr,
                "auc": roc_auc(fake, scores),
                "ece": reliability(fake, scores)[0],
                "nll": nll(logits / cal.temperature + cal.bias, torch.from_numpy(fake), 1.0),
            }
        )
    return side


def recalibrate(
    engine: InferenceEngine,
    items: Sequence[LabelledImage],
    target_fpr: float,
    data: dict[str, Any],
    *,
    min_real: int | None = None,
    version: str | None = None,
    now: datetime | None = None,
) -> tuple[Manifest, dict[str, Any]]:
    """The new manifest (same weights) and the before/after report."""
    needed = min_real_images(target_fpr) if min_real is None else min_real
    n_real = sum(1 for item in items if not item.is_fake)
    if n_real < needed:
        raise CalibrationDataError(
            f"{n_real} real images given, {needed} needed for a false-positive rate of "
            f"{target_fpr:g} (at least {MIN_EXPECTED_FALSE_POSITIVES} expected false "
            "positives to set the threshold on)"
        )
    logits, kept = engine_logits(engine, items)
    fake = np.asarray([item.is_fake for item in kept], dtype=bool)
    if int((~fake).sum()) < needed:
        raise CalibrationDataError(
            f"only {int((~fake).sum())} real images could be decoded, {needed} needed"
        )
    parent = engine.manifest
    labelled = bool(fake.any())
    if labelled:
        temperature, bias = fit_platt(logits, torch.from_numpy(fake))
    else:
        temperature, bias = parent.calibration.temperature, parent.calibration.bias
    reals = served_scores(logits[torch.from_numpy(~fake)], temperature, bias).numpy()
    threshold = threshold_for_fpr(reals, target_fpr)
    block = max(threshold, threshold_for_fpr(reals, target_fpr * BLOCK_FPR_FACTOR))
    calibration = Calibration(
        temperature=temperature, bias=bias, threshold=threshold, target_fpr=target_fpr
    )
    before = _side(logits, fake, parent.calibration, parent.calibration.threshold)
    after = _side(logits, fake, calibration, threshold)
    report: dict[str, Any] = {
        "method": "labelled" if labelled else "real-only",
        "target_fpr": target_fpr,
        "n_scored": len(kept),
        "skipped_images": len(items) - len(kept),
        "before": before,
        "after": after,
        "fpr_at_old_threshold": before["fpr"],
        "block_at": block,
    }
    if labelled:
        ranked = served_scores(logits, temperature, bias).numpy()
        report["tpr_at_target_fpr"] = tpr_at_fpr(fake, ranked, target_fpr)
    else:
        report["expected_flag_rate"] = {
            "on": "uploads like these reals (no generated images among them)",
            "rate": after["fpr"],
            "95ci": after["fpr_95ci"],
        }
    stamp = (now or datetime.now(timezone.utc)).replace(microsecond=0)
    record = Recalibration(
        parent_version=parent.version,
        parent_sha256=parent.sha256,
        calibrated_at=stamp.isoformat(),
        method=report["method"],
        target_fpr=target_fpr,
        data=data,
        report=report,
    )
    manifest = parent.model_copy(
        update={
            "version": version or f"{parent.version}+cal{stamp.strftime('%Y%m%dT%H%M%SZ')}",
            "calibration": calibration,
            "policy": Policy(review_at=threshold, block_at=block),
            "recalibrations": [*parent.recalibrations, record],
            "created_at": stamp.isoformat(),
        }
    )
    return manifest, report
