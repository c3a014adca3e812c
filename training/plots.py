"""PNG plots of an evaluation: ROC curves, source confusion matrix, robustness curves.

matplotlib is optional (the ``plots`` extra); it is imported lazily with the Agg backend, and
its absence is a clear :class:`PlotsUnavailable`, never an import error at start-up.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipguard.detector.errors import ClipguardError
from clipguard.training.evaluate import Scored, group_of
from clipguard.training.metrics import roc_curve


class PlotsUnavailable(ClipguardError):
    stage = "plots"
    reason = "matplotlib_missing"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotsUnavailable(
            "plots need matplotlib: pip install 'clipguard[plots]' (or drop --plots)"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_plot(scored: Scored, classes: Sequence[str], path: Path) -> Path | None:
    plt = _pyplot()
    fake = scored.is_fake
    scores = scored.ai_scores.numpy()
    if fake.all() or not fake.any():
        return None
    fig, ax = plt.subplots(figsize=(5.5, 5))
    fpr, tpr = roc_curve(fake, scores)
    ax.plot(fpr, tpr, lw=2.2, color="black", label="all generators")
    groups = np.asarray([group_of(item, classes) for item in scored.items], dtype=object)
    pooled = ~fake & (groups == None)  # noqa: E711 - elementwise on an object array
    for name in sorted({g for g, f in zip(groups, fake, strict=True) if f and g is not None}):
        reals = ~fake & (groups == name)
        if not reals.any():
            reals = pooled if pooled.any() else ~fake
        mask = (fake & (groups == name)) | reals
        gf, gt = roc_curve(fake[mask], scores[mask])
        ax.plot(gf, gt, lw=1.2, label=str(name))
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set(xlabel="false positive rate (reals flagged)", ylabel="true positive rate")
    ax.set_title("ROC")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def confusion_plot(report: dict[str, Any], path: Path) -> Path | None:
    plt = _pyplot()
    confusion = report.get("source_confusion") or {}
    matrix = np.asarray(confusion.get("matrix") or [], dtype=float)
    if matrix.size == 0 or matrix.sum() == 0:
        return None
    classes = confusion["classes"]
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = 1.2 + 0.6 * len(classes)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            colour = "white" if rows[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(count)}", ha="center", va="center", fontsize=7, color=colour)
    ax.set(xlabel="predicted source", ylabel="true source", title="source attribution")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of row")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def robustness_plot(robustness: dict[str, dict[str, Any]], path: Path) -> Path | None:
    plt = _pyplot()
    families: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for row in robustness.values():
        if row["family"] != "clean":
            families.setdefault(row["family"], []).append((row["severity"], row))
    if not families:
        return None
    clean = robustness.get("clean", {})
    fig, axes = plt.subplots(1, len(families), figsize=(3.2 * len(families), 3.2), squeeze=False)
    for ax, (family, rows) in zip(axes[0], sorted(families.items()), strict=True):
        rows.sort(key=lambda r: r[0], reverse=family in {"jpeg", "downscale", "thumbnail"})
        positions = list(range(len(rows)))
        for metric, style in (("accuracy", "-o"), ("ap", "-s"), ("auc", "-^")):
            values = [r.get(metric) for _, r in rows]
            ax.plot(positions, [np.nan if v is None else v for v in values], style, label=metric)
            if clean.get(metric) is not None:
                ax.axhline(clean[metric], ls=":", lw=0.8, color=ax.lines[-1].get_color())
        ax.set_xticks(positions, [f"{s:g}" for s, _ in rows])
        ax.set_ylim(0, 1.02)
        ax.set_title(family)
        ax.set_xlabel({"jpeg": "quality", "blur": "sigma", "downscale": "factor"}.get(family, ""))
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("robustness (dotted: clean)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def reliability_plot(report: dict[str, Any], path: Path) -> Path | None:
    """Reliability diagram of ``ai_score``: mean score against the fraction really AI, per
    bin; on the diagonal when the calibrated score means what it says (ECE in the title)."""
    plt = _pyplot()
    bins = report.get("reliability") or []
    if not bins:
        return None
    fig, ax = plt.subplots(figsize=(5, 5))
    centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
    ax.bar(centres, [b["fraction_ai"] for b in bins], width=0.09, alpha=0.6, label="fraction AI")
    ax.plot([b["mean_score"] for b in bins], [b["fraction_ai"] for b in bins], "o-", color="C1")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfect calibration")
    for centre, b in zip(centres, bins, strict=True):
        ax.text(centre, 0.02, str(b["n"]), ha="center", fontsize=6, rotation=90)
    ece = report.get("ece")
    ax.set(xlabel="ai_score", ylabel="fraction AI-generated", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title(f"reliability (ECE {ece:.4f})" if ece is not None else "reliability")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(
    directory: Path,
    scored: Scored,
    classes: Sequence[str],
    report: dict[str, Any],
    robustness: dict[str, dict[str, Any]] | None,
) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = [
        roc_plot(scored, classes, directory / "roc.png"),
        confusion_plot(report, directory / "confusion.png"),
        reliability_plot(report, directory / "reliability.png"),
    ]
    if robustness:
        written.append(robustness_plot(robustness, directory / "robustness.png"))
    return [p for p in written if p is not None]
