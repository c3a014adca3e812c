"""Terminal tables of an evaluation report (for humans; the JSON is the record)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

COLUMNS = (
    "n_real",
    "n_fake",
    "accuracy",
    "balanced_accuracy",
    "real_accuracy",
    "fake_accuracy",
    "tpr_at_1pct_fpr",
    "tpr_at_0.1pct_fpr",
    "ap",
    "auc",
    "ece",
)
HEADERS = (
    "n real",
    "n fake",
    "acc",
    "bal acc",
    "real acc",
    "fake acc",
    "TPR@1%",
    "TPR@0.1%",
    "AP",
    "AUC",
    "ECE",
)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def table(
    rows: Sequence[tuple[str, dict[str, Any]]], columns: Sequence[str], headers: Sequence[str]
) -> str:
    cells = [["", *headers]] + [[name, *(_cell(r.get(c)) for c in columns)] for name, r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = []
    for index, row in enumerate(cells):
        lines.append(
            "  ".join(
                cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                for i, cell in enumerate(row)
            )
        )
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    """Overall and per-generator metrics, attribution, and the robustness sweep if present."""
    overall = report["overall"]
    rows = [("all", overall)]
    rows += [(f"  {name}", metrics) for name, metrics in overall.get("per_generator", {}).items()]
    calibration = report.get("calibration", {})
    views = report.get("preprocess", {})
    parts = [
        f"threshold {overall['threshold']:.4f} "
        f"(temperature {calibration.get('temperature', 1.0):g}, "
        f"bias {calibration.get('bias', 0.0):g}); accuracy is at this stored threshold"
        + (
            f"; {views.get('policy')} x {views.get('views')} view(s), {views.get('aggregate')}"
            if views
            else ""
        ),
        table(rows, COLUMNS, HEADERS),
    ]
    aligned = report.get("aligned")
    if aligned:
        parts.append(align_table(report))
    if report.get("seen_unseen"):
        parts.append("seen vs unseen generators (each generator's fakes vs the reals)")
        parts.append(seen_unseen_table(report["seen_unseen"]))
    source = overall.get("source_accuracy")
    if source is not None:
        parts.append(f"source attribution accuracy (known generators): {source:.4f}")
    if overall.get("skipped_images"):
        parts.append(f"{overall['skipped_images']} undecodable images skipped")
    robustness = report.get("robustness")
    if robustness:
        parts.append("robustness")
        parts.append(
            table(
                list(robustness.items()),
                ("accuracy", "real_accuracy", "fake_accuracy", "ap", "auc"),
                ("acc", "real acc", "fake acc", "AP", "AUC"),
            )
        )
    return "\n".join(parts)


ALIGN_COLUMNS = ("accuracy", "balanced_accuracy", "tpr_at_1pct_fpr", "ap", "auc")


def align_table(report: dict[str, Any]) -> str:
    """Plain vs aligned (one format, quality and size policy for every image), per row."""
    plain, aligned = report["overall"], report["aligned"]["overall"]
    names = ["all", *plain.get("per_generator", {})]
    rows = []
    for name in names:
        p = plain if name == "all" else plain["per_generator"].get(name, {})
        a = aligned if name == "all" else aligned.get("per_generator", {}).get(name, {})
        row: dict[str, Any] = {}
        for column in ALIGN_COLUMNS:
            row[f"p_{column}"], row[f"a_{column}"] = p.get(column), a.get(column)
        rows.append((name if name == "all" else f"  {name}", row))
    columns = [f"{side}_{c}" for c in ALIGN_COLUMNS for side in ("p", "a")]
    headers = [
        f"{h} {side}"
        for h in ("acc", "bal", "TPR@1%", "AP", "AUC")
        for side in ("plain", "aligned")
    ]
    lines = [f"aligned: {report['aligned']['policy']}", table(rows, columns, headers)]
    lines += [f"WARNING: {w}" for w in report["aligned"].get("warnings", [])]
    return "\n".join(lines)


SEEN_UNSEEN_COLUMNS = ("status", "n_fake", "balanced_accuracy", "fake_accuracy", "auc", "ap")
SEEN_UNSEEN_HEADERS = ("", "n fake", "bal acc", "fake acc", "AUC", "AP")


def seen_unseen_table(report: dict[str, Any]) -> str:
    """One row per generator tagged seen/unseen, then the mean of each group of rows."""
    rows: list[tuple[str, dict[str, Any]]] = [
        (f"  {r['generator']}", r) for r in sorted(report["rows"], key=lambda r: r["status"])
    ]
    for status in ("seen", "unseen"):
        summary = report[status]
        mean = {c: summary.get(f"mean_{c}") for c in SEEN_UNSEEN_COLUMNS}
        mean["status"] = f"{summary['n_generators']} gen"
        rows.append((f"mean {status}", mean))
    return table(rows, SEEN_UNSEEN_COLUMNS, SEEN_UNSEEN_HEADERS)


def leave_one_out_table(summary: dict[str, Any]) -> str:
    """Per held-out group: its unseen generators' mean, next to that run's seen mean."""
    columns = ("u_bal", "u_auc", "u_ap", "s_bal", "s_auc")
    headers = ("unseen bal acc", "unseen AUC", "unseen AP", "seen bal acc", "seen AUC")

    def row(unseen: dict[str, Any], seen: dict[str, Any]) -> dict[str, Any]:
        return {
            "u_bal": unseen.get("mean_balanced_accuracy"),
            "u_auc": unseen.get("mean_auc"),
            "u_ap": unseen.get("mean_ap"),
            "s_bal": seen.get("mean_balanced_accuracy"),
            "s_auc": seen.get("mean_auc"),
        }

    rows = [
        (f"held out {name}", row(group["unseen"], group["seen"]))
        for name, group in summary["groups"].items()
    ]
    rows.append(("mean", row(summary["mean"]["unseen"], summary["mean"]["seen"])))
    return table(rows, columns, headers)
