"""Calibration on the validation set: temperature, bias and a threshold for a target FPR.

``ai_score = sigmoid(logit / T + b)``. ``T`` and ``b`` minimise the class-balanced binary NLL
on validation logits (Platt scaling; each class weighs half, so the score 0.5 sits where the
two classes' likelihoods cross whatever the validation set's real/fake ratio: a stored
threshold that does not depend on the benchmark's class balance). ``fit_temperature`` alone
(bias 0) remains for callers that need it. The threshold is the
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


def balanced_nll(logits: torch.Tensor, is_fake: torch.Tensor, temperature: float, bias: float):
    """Mean of the two classes' mean NLL under ``sigmoid(logit / T + b)``."""
    z = logits.double() / temperature + bias
    y = is_fake.double()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
    fake = is_fake.bool()
    return float((loss[fake].mean() + loss[~fake].mean()) / 2)


def fit_platt(
    logits: torch.Tensor, is_fake: torch.Tensor, iterations: int = 200
) -> tuple[float, float]:
    """Temperature and bias minimising the class-balanced NLL; (1, 0) without both classes.

    Newton steps on ``(a, b)`` of ``sigmoid(a * logit + b)`` (convex in them), damped; the
    temperature is ``1 / a``, kept in the same range as :func:`fit_temperature`.
    """
    fake = is_fake.bool()
    if logits.numel() == 0 or bool(fake.all()) or not bool(fake.any()):
        return 1.0, 0.0
    x, y = logits.double(), fake.double()
    weight = torch.where(fake, 0.5 / fake.sum(), 0.5 / (~fake).sum()).double()
    features = torch.stack([x, torch.ones_like(x)], 1)
    params = torch.tensor([1.0, 0.0], dtype=torch.float64)
    lo, hi = math.exp(-LOG_T_RANGE[1]), math.exp(-LOG_T_RANGE[0])
    for _ in range(iterations):
        p = torch.sigmoid(features @ params)
        grad = features.T @ (weight * (p - y))
        hess = features.T @ (features * (weight * p * (1 - p))[:, None])
        step = torch.linalg.solve(hess + 1e-9 * torch.eye(2, dtype=torch.float64), grad)
        params = params - step
        params[0] = params[0].clamp(lo, hi)
        if float(step.abs().max()) < 1e-10:
            break
    return round(1.0 / float(params[0]), 6), round(float(params[1]), 6)


def served_scores(logits: torch.Tensor, temperature: float, bias: float = 0.0) -> torch.Tensor:
    """Exactly the engine's arithmetic: float32 logit / python-float T + b, then sigmoid."""
    return torch.sigmoid(logits.float() / temperature + bias)


@dataclass
class CalibrationResult:
    calibration: Calibration
    policy: Policy
    info: dict[str, Any]


def calibrate(
    logits: torch.Tensor, is_fake: torch.Tensor, target_fpr: float | None
) -> CalibrationResult:
    """Temperature and bias always (when both classes are present); threshold for a target."""
    is_fake = is_fake.bool()
    temperature, bias = fit_platt(logits, is_fake)
    both = bool(is_fake.any()) and not bool(is_fake.all())
    info: dict[str, Any] = {
        "n_val": int(logits.numel()),
        "n_val_real": int((~is_fake).sum()),
        "n_val_fake": int(is_fake.sum()),
        "method": "platt, class-balanced",
        "nll_before": nll(logits, is_fake, 1.0) if logits.numel() else None,
        "balanced_nll_before": balanced_nll(logits, is_fake, 1.0, 0.0) if both else None,
        "balanced_nll_after": balanced_nll(logits, is_fake, temperature, bias) if both else None,
    }
    scores = served_scores(logits, temperature, bias)
    reals = scores[~is_fake]
    if target_fpr is None or reals.numel() == 0:
        if target_fpr is not None:
            info["warning"] = "no real validation images: threshold left at 0.5"
        return CalibrationResult(Calibration(temperature=temperature, bias=bias), Policy(), info)
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
        Calibration(temperature=temperature, bias=bias, threshold=threshold, target_fpr=target_fpr),
        Policy(review_at=threshold, block_at=block),
        info,
    )
