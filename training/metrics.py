"""Ranking and classification metrics in numpy: AP, ROC, AUC, confusion matrices.

Scikit-learn is not a dependency; these follow its definitions (``average_precision_score``
without interpolation, ``roc_auc_score`` with ties counted as half), which is what
CNNDetection and UniversalFakeDetect report.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


def _as_arrays(labels: Sequence[float] | npt.ArrayLike, scores: npt.ArrayLike):
    y = np.asarray(labels, dtype=bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    return y, s


def _distinct_thresholds(y: np.ndarray, s: np.ndarray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Cumulative true and false positives at each distinct score, highest score first."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tps = np.cumsum(y)[last_of_run].astype(np.float64)
    fps = (last_of_run + 1 - tps).astype(np.float64)
    return tps, fps, s[last_of_run]


def average_precision(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float | None:
    """Area under the precision-recall curve as a step sum; ``None`` without positives."""
    y, s = _as_arrays(labels, scores)
    if not y.any():
        return None
    tps, fps, _ = _distinct_thresholds(y, s)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_curve(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """(false positive rates, true positive rates), starting at (0, 0), ending at (1, 1)."""
    y, s = _as_arrays(labels, scores)
    if y.all() or not y.any():
        raise ValueError("a ROC curve needs both positive and negative samples")
    tps, fps, _ = _distinct_thresholds(y, s)
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def roc_auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float | None:
    """Area under the ROC curve (trapezoids: ties count half); ``None`` for one class."""
    y, _ = _as_arrays(labels, scores)
    if y.all() or not y.any():
        return None
    fpr, tpr = roc_curve(labels, scores)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def confusion_matrix(truth: npt.ArrayLike, predicted: npt.ArrayLike, n_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    t = np.asarray(truth, dtype=np.int64).ravel()
    p = np.asarray(predicted, dtype=np.int64).ravel()
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (t, p), 1)
    return matrix


def threshold_for_fpr(negative_scores: npt.ArrayLike, target_fpr: float) -> float:
    """The lowest threshold (``score >= t`` flags) keeping the false-positive rate <= target.

    At most ``floor(target_fpr * n)`` negatives score at or above the returned value; it lies
    halfway between the last allowed negative and the first refused one, so small score
    jitter does not move the achieved rate.
    """
    s = np.sort(np.asarray(negative_scores, dtype=np.float64).ravel())[::-1]
    if s.size == 0:
        raise ValueError("choosing a threshold for a false-positive rate needs real samples")
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr}")
    allowed = int(np.floor(target_fpr * s.size + 1e-9))
    refused = s[allowed]  # the highest-scoring negative that must stay below the threshold
    # Ties with the refused score cannot be allowed through either: step back past them.
    above = s[:allowed][s[:allowed] > refused]
    upper = float(above[-1]) if above.size else min(1.0, refused + 2e-6)
    threshold = (refused + upper) / 2.0
    if threshold <= refused:  # scores saturated at 1.0: nothing can separate them
        threshold = float(np.nextafter(refused, np.inf))
    return float(min(threshold, 1.0))


def tpr_at_fpr(labels: npt.ArrayLike, scores: npt.ArrayLike, target_fpr: float) -> float | None:
    """The highest true-positive rate of any threshold whose false-positive rate <= target.

    With fewer than ``1 / target_fpr`` negatives this is the rate at FPR 0 (the target is
    not resolvable; reports carry ``min_resolvable_fpr`` beside it). ``None`` for one class.
    """
    y, s = _as_arrays(labels, scores)
    if y.all() or not y.any():
        return None
    tps, fps, _ = _distinct_thresholds(y, s)
    allowed = fps / fps[-1] <= target_fpr + 1e-12
    return float(np.max(np.r_[0.0, tps[allowed] / tps[-1]]))


def reliability(
    labels: npt.ArrayLike, scores: npt.ArrayLike, bins: int = 10
) -> tuple[float | None, list[dict[str, float | int]]]:
    """Expected calibration error of P(AI) and its reliability diagram (equal-width bins).

    ECE = sum over bins of (bin share) x |mean score - fraction AI|: 0 when ``ai_score``
    means what it says. Empty bins are left out of the diagram.
    """
    y, s = _as_arrays(labels, scores)
    if y.size == 0:
        return None, []
    index = np.minimum((s * bins).astype(np.int64), bins - 1)
    diagram: list[dict[str, float | int]] = []
    ece = 0.0
    for b in range(bins):
        mask = index == b
        if not mask.any():
            continue
        confidence, observed = float(s[mask].mean()), float(y[mask].mean())
        ece += mask.mean() * abs(confidence - observed)
        diagram.append(
            {
                "lo": b / bins,
                "hi": (b + 1) / bins,
                "n": int(mask.sum()),
                "mean_score": round(confidence, 6),
                "fraction_ai": round(observed, 6),
            }
        )
    return float(ece), diagram


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial rate (sound at rates near 0, unlike Wald)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))
