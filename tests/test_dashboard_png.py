"""``clipguard dashboard-png``'s parts that need no Prometheus (the live test runs the rest)."""

from __future__ import annotations

from pathlib import Path

from clipguard.cli.dashboard_png import (
    Panel,
    Series,
    Target,
    draw,
    format_value,
    legend_text,
    load_panels,
    rate_interval,
    substitute,
)

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy/grafana/dashboards/clipguard.json"


def test_variables_are_substituted_as_grafana_does() -> None:
    expr = 'rate(x{job=~"$job", instance=~"${instance}"}[$__rate_interval])'
    assert (
        substitute(expr, "4s", "clipguard", "a:1")
        == 'rate(x{job=~"clipguard", instance=~"a:1"}[4s])'
    )
    assert rate_interval(15, 15) == "60s" and rate_interval(1, 1) == "4s"
    assert rate_interval(15, 120) == "135s"


def test_every_dashboard_query_is_loaded() -> None:
    panels = load_panels(DASHBOARD)
    assert len(panels) >= 20
    assert all(substitute(t.expr, "4s").count("$") == 0 for p in panels for t in p.targets)
    assert {p.kind for p in panels} >= {"stat", "table", "timeseries", "heatmap"}


def test_legends_and_units() -> None:
    assert legend_text("{{decision}} / {{label}}", {"decision": "block", "label": "real"}) == (
        "block / real"
    )
    assert format_value(0.25, "percentunit") == "25.0%"
    assert format_value(0.012, "s") == "12 ms" and format_value(2.5, "s") == "2.50 s"
    assert format_value(float("nan"), "ops") == "n/a"


def test_draws_every_kind_of_panel(tmp_path: Path) -> None:
    points = [(1_700_000_000.0 + i, float(i)) for i in range(10)]
    panels = [
        Panel("stat", "stat", "ops", (Target("A", "x", "", True),)),
        Panel("table", "table", "", (Target("A", "x", "", True), Target("B", "y", "", True))),
        Panel("lines", "timeseries", "s", (Target("A", "x", "{{instance}}", False),)),
        Panel("heat", "heatmap", "", (Target("A", "x", "{{le}}", False),)),
        Panel("empty", "timeseries", "", (Target("A", "x", "", False),)),
    ]
    results = {
        ("stat", "A"): [Series({}, points)],
        ("table", "A"): [Series({"instance": "a", "name": "m", "version": "1"}, points)],
        ("table", "B"): [Series({"instance": "a"}, points)],
        ("lines", "A"): [Series({"instance": "a"}, points)],
        ("heat", "A"): [Series({"le": le}, points) for le in ("1", "2", "+Inf")],
        ("empty", "A"): [],
    }
    out = tmp_path / "board.png"
    draw(panels, results, out, "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
