"""Terminal tables of an evaluation report (for humans; the JSON is the record)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

COLUMNS = ("n_real", "n_fake", "accuracy", "real_accuracy", "fake_accuracy", "ap", "auc")
HEADERS = ("n real", "n fake", "acc", "real acc", "fake acc", "AP", "AUC")


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
    parts = [
        f"threshold {overall['threshold']:.4f} "
        f"(temperature {report.get('calibration', {}).get('temperature', 1.0):g})",
        table(rows, COLUMNS, HEADERS),
    ]
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
