"""Calibration on the validation set: temperature scaling and a threshold for a target FPR.

The temperature ``T`` minimises the binary NLL of ``sigmoid(logit / T)`` on validation
logits (a 1-D golden-section search over log T: convex, no tuning). The threshold is the
lowest score at which at most ``target_fpr`` of the validation *reals* would be flagged.
The served policy follows: ``review_at`` is that threshold, ``block_at`` the threshold for a
ten times smaller false-positive rate, so the worker's review/block default from the
checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from clipguard.detector.checkpoint import Calibration
from clipguard.detector.policy import Policy
from clipguard.training.metrics import threshold_for_fpr

LOG_T_RANGE = (math.log(0.05), math.log(20.0))
BLOCK_FPR_FACTOR = 0.1


def nll(logits: torch.Tensor, is_fake: torch.Tensor, temperature: float) -> float:
    return float(
        torch.nn.functional.binary_cross_entropy_with_logits(
            logits.double() / temperature, is_fake.double()
        )
    )


def fit_temperature(logits: torch.Tensor, is_fake: torch.Tensor, iterations: int = 60) -> float:
    """The NLL-minimising temperature (1.0 when there is nothing to fit)."""
    if logits.numel() == 0 or bool(is_fake.all()) or not bool(is_fake.any()):
        return 1.0
    lo, hi = LOG_T_RANGE
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logits, is_fake, math.exp(a)), nll(logits, is_fake, math.exp(b))
    for _ in range(iterations):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logits, is_fake, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logits, is_fake, math.exp(b))
    return round(math.exp((lo + hi) / 2), 6)


def served_scores(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Exactly the engine's arithmetic: float32 logit / python-float T, then sigmoid."""
    return torch.sigmoid(logits.float() / temperature)


@dataclass
class CalibrationResult:
    calibration: Calibration
    policy: Policy
    info: dict[str, Any]


def calibrate(
    logits: torch.Tensor, is_fake: torch.Tensor, target_fpr: float | None
) -> CalibrationResult:
    """Temperature always (when both classes are present); threshold only for a target."""
    is_fake = is_fake.bool()
    temperature = fit_temperature(logits, is_fake)
    info: dict[str, Any] = {
        "n_val": int(logits.numel()),
        "nll_before": nll(logits, is_fake, 1.0) if logits.numel() else None,
        "nll_after": nll(logits, is_fake, temperature) if logits.numel() else None,
    }
    scores = served_scores(logits, temperature)
    reals = scores[~is_fake]
    if target_fpr is None or reals.numel() == 0:
        if target_fpr is not None:
            info["warning"] = "no real validation images: threshold left at 0.5"
        return CalibrationResult(Calibration(temperature=temperature), Policy(), info)
    threshold = threshold_for_fpr(reals.numpy(), target_fpr)
    block = max(threshold, threshold_for_fpr(reals.numpy(), target_fpr * BLOCK_FPR_FACTOR))
    info.update(
        {
            "val_fpr": float((reals >= threshold).float().mean()),
            "val_tpr": (
                float((scores[is_fake] >= threshold).float().mean()) if is_fake.any() else None
            ),
            "block_fpr": float((reals >= block).float().mean()),
            "min_resolvable_fpr": 1.0 / reals.numel(),
        }
    )
    return CalibrationResult(
        Calibration(temperature=temperature, threshold=threshold, target_fpr=target_fpr),
        Policy(review_at=threshold, block_at=block),
        info,
    )
