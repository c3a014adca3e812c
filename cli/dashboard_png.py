"""``clipguard dashboard-png``: the Grafana dashboard's queries, run against a Prometheus and
drawn into one PNG with matplotlib (a screenshot without Grafana).

Every panel target of ``deploy/grafana/dashboards/clipguard.json`` is evaluated over a time
range through Prometheus' HTTP API (``/api/v1/query_range``), with Grafana's variables
substituted: ``$job`` and ``$instance`` as regular expressions (``.*`` = All),
``$__rate_interval`` as Grafana computes it (``max(4 x scrape interval, step + scrape
interval)``). The test with a real Prometheus (tests/test_prometheus_live.py) uses the same
functions, so what is drawn is what was checked.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clipguard.cli.common import EXIT_OK

DEFAULT_DASHBOARD = Path("deploy/grafana/dashboards/clipguard.json")


# -- the dashboard's queries -------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    ref: str
    expr: str
    legend: str
    instant: bool


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str  # stat, table, timeseries, heatmap
    unit: str
    targets: tuple[Target, ...]


def _walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _walk(panel.get("panels", []))


def load_panels(path: Path) -> list[Panel]:
    """Every panel with at least one query, in the dashboard's order (rows left out)."""
    board = json.loads(Path(path).read_text())
    panels = []
    for raw in _walk(board.get("panels", [])):
        targets = tuple(
            Target(
                t.get("refId", "A"), t["expr"], t.get("legendFormat", ""), bool(t.get("instant"))
            )
            for t in raw.get("targets", [])
            if t.get("expr")
        )
        if targets:
            unit = raw.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
            panels.append(Panel(raw.get("title", ""), raw.get("type", ""), unit, targets))
    return panels


def rate_interval(scrape_interval_s: float, step_s: float) -> str:
    """Grafana's ``$__rate_interval``: max(4 x scrape interval, step + scrape interval)."""
    seconds = max(4 * scrape_interval_s, step_s + scrape_interval_s)
    return f"{math.ceil(seconds)}s"


def substitute(expr: str, rate: str, job: str = ".*", instance: str = ".*") -> str:
    """The query as Grafana sends it for the chosen variables."""
    values = {"__rate_interval": rate, "job": job, "instance": instance}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return values.get(name, match.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", replace, expr)


# -- Prometheus' HTTP API -----------------------------------------------------------------------


class PrometheusError(RuntimeError):
    """Prometheus refused or failed a query."""


@dataclass
class Series:
    labels: dict[str, str]
    points: list[tuple[float, float]] = field(default_factory=list)  # (unix time, value)

    def values(self) -> list[float]:
        return [v for _, v in self.points if math.isfinite(v)]


class Prometheus:
    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(
                f"{self.url}{path}?{query}", timeout=self.timeout_s
            ) as answer:
                body = json.loads(answer.read())
        except urllib.error.HTTPError as exc:  # 400/422: the body says why
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[Series]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return _series(self.get("/api/v1/query", **params))

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[Series]:
        data = self.get(
            "/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step_s
        )
        return _series(data)


def _series(data: dict[str, Any]) -> list[Series]:
    kind, result = data["resultType"], data["result"]
    if kind == "scalar":
        return [Series({}, [(float(result[0]), float(result[1]))])]
    out = []
    for item in result:
        pairs = item.get("values") or [item["value"]]
        out.append(Series(item.get("metric", {}), [(float(t), float(v)) for t, v in pairs]))
    return out


# -- drawing ---------------------------------------------------------------------------------


def legend_text(template: str, labels: dict[str, str]) -> str:
    if not template:
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def format_value(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return "n/a"
    if unit == "percentunit":
        return f"{value * 100:.1f}%"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "ops":
        return f"{value:.2f}/s"
    return f"{value:g}" if abs(value) >= 0.01 or value == 0 else f"{value:.2e}"


Results = dict[tuple[str, str], list[Series]]  # (panel title, refId) -> series


def run_queries(
    prometheus: Prometheus,
    panels: list[Panel],
    start: float,
    end: float,
    step_s: float,
    rate: str,
    job: str = ".*",
    instance: str = ".*",
) -> Results:
    results: Results = {}
    for panel in panels:
        for target in panel.targets:
            expr = substitute(target.expr, rate, job, instance)
            results[(panel.title, target.ref)] = prometheus.query_range(expr, start, end, step_s)
    return results


def draw(panels: list[Panel], results: Results, out: Path, title: str, dpi: int = 60) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    columns = 4
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.6 * rows), squeeze=False)
    fig.suptitle(title, fontsize=13)
    for ax, panel in zip(axes.flat, panels, strict=False):
        ax.set_title(panel.title, fontsize=9)
        ax.tick_params(labelsize=7)
        series = [(t, s) for t in panel.targets for s in results.get((panel.title, t.ref), [])]
        if panel.kind in ("stat", "table"):
            _draw_text(ax, panel, series)
        elif panel.kind == "heatmap":
            _draw_heatmap(ax, series, fig)
        else:
            for target, one in series[:12]:
                if not one.values():
                    continue
                times = [datetime.fromtimestamp(t, timezone.utc) for t, _ in one.points]
                ax.plot(
                    times,
                    [v for _, v in one.points],
                    lw=1.0,
                    label=legend_text(target.legend, one.labels)[:40],
                )
            locator = mdates.AutoDateLocator(maxticks=4)
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6, loc="upper left", framealpha=0.6)
            ax.set_ylabel(
                {"ops": "/s", "s": "seconds", "percentunit": "share"}.get(panel.unit, ""),
                fontsize=7,
            )
            if not series:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(out, dpi=dpi)
    plt.close(fig)


def _last(one: Series) -> float:
    values = one.values()
    return values[-1] if values else float("nan")


def _draw_text(ax: Any, panel: Panel, series: list[tuple[Target, Series]]) -> None:
    ax.axis("off")
    if panel.kind == "stat":
        value = _last(series[0][1]) if series else float("nan")
        ax.text(
            0.5,
            0.45,
            format_value(value, panel.unit),
            ha="center",
            va="center",
            fontsize=22,
            transform=ax.transAxes,
        )
        return
    rows: dict[str, dict[str, str]] = {}
    for target, one in series:
        row = rows.setdefault(one.labels.get("instance", "?"), {})
        if target.ref == "A":
            row["model"] = f"{one.labels.get('name', '')} {one.labels.get('version', '')}"
            row["device"] = f"{one.labels.get('device', '')}/{one.labels.get('dtype', '')}"
        else:
            row[{"B": "ready", "C": "partitions"}.get(target.ref, target.ref)] = f"{_last(one):g}"
    lines = [
        f"{name}: " + "  ".join(f"{k}={v}" for k, v in row.items()) for name, row in rows.items()
    ]
    ax.text(
        0.0,
        0.9,
        "\n".join(lines) or "no data",
        va="top",
        fontsize=7,
        family="monospace",
        transform=ax.transAxes,
    )


def _draw_heatmap(ax: Any, series: list[tuple[Target, Series]], fig: Any) -> None:
    import numpy as np

    buckets = sorted(
        (float(one.labels.get("le", "inf")), one) for _, one in series if "le" in one.labels
    )
    if not buckets:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    times = sorted({t for _, one in buckets for t, _ in one.points})
    index = {t: i for i, t in enumerate(times)}
    grid = np.zeros((len(buckets), len(times)))
    for row, (_, one) in enumerate(buckets):
        for t, v in one.points:
            grid[row, index[t]] = v if math.isfinite(v) else 0.0
    # cumulative buckets -> per bucket counts
    grid[1:] = np.clip(grid[1:] - grid[:-1], 0, None)
    labels = [("+Inf" if math.isinf(le) else f"{le:g}") for le, _ in buckets]
    mesh = ax.pcolormesh(
        np.arange(len(times) + 1), np.arange(len(buckets) + 1), grid, cmap="viridis", shading="flat"
    )
    ax.set_yticks(np.arange(len(buckets)) + 0.5)
    ax.set_yticklabels(labels, fontsize=6)
    ax.set_xticks([])
    ax.set_xlabel("time →", fontsize=7)
    fig.colorbar(mesh, ax=ax, fraction=0.04)


# -- the command -------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dashboard-png",
        help="draw the Grafana dashboard's panels from a Prometheus into one PNG",
        description=(
            "Runs every query of the clipguard dashboard over a time range against a "
            "Prometheus (HTTP API) and draws the panels with matplotlib."
        ),
    )
    parser.add_argument(
        "--prometheus", required=True, help="Prometheus URL, e.g. http://localhost:9090"
    )
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument(
        "--dashboard",
        type=Path,
        default=DEFAULT_DASHBOARD,
        help=f"Grafana dashboard JSON (default: {DEFAULT_DASHBOARD})",
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=30.0,
        help="range ending now (or at --end), in minutes (default: 30)",
    )
    parser.add_argument(
        "--end", type=float, default=None, help="range end, unix seconds (default: now)"
    )
    parser.add_argument(
        "--step",
        type=float,
        default=None,
        help="seconds between points (default: range / 240, at least 1)",
    )
    parser.add_argument(
        "--scrape-interval",
        type=float,
        default=15.0,
        help="the Prometheus scrape interval in seconds, for $__rate_interval (default: 15)",
    )
    parser.add_argument("--job", default=".*", help="$job regex (default: all)")
    parser.add_argument("--instance", default=".*", help="$instance regex (default: all)")
    parser.add_argument("--dpi", type=int, default=60, help="PNG resolution (default: 60)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    end = args.end if args.end is not None else time.time()
    start = end - args.minutes * 60
    step = args.step or max(1.0, round((end - start) / 240))
    panels = load_panels(args.dashboard)
    rate = rate_interval(args.scrape_interval, step)
    results = run_queries(
        Prometheus(args.prometheus), panels, start, end, step, rate, args.job, args.instance
    )
    stamp = datetime.fromtimestamp(end, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"clipguard dashboard: {args.minutes:g} min to {stamp} (from {args.prometheus})"
    draw(panels, results, args.out, title, dpi=args.dpi)
    empty = [f"{title} [{ref}]" for (title, ref), series in results.items() if not series]
    print(f"wrote {args.out}: {len(panels)} panels, {len(results)} queries, {len(empty)} empty")
    for name in empty:
        print(f"  no data: {name}")
    return EXIT_OK
