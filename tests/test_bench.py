"""``clipguard bench``: every section of the report is there and its ratios add up.

The bench is measurement, never a timed test: nothing here asserts a speed, only that each
number was measured (positive) and that the derived ones follow from the measured ones.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from clipguard.bench.mix import parse_size, zoo_mix
from clipguard.bench.precision import score_agreement
from clipguard.bench.report import derive, table
from clipguard.bench.worker import percentile
from clipguard.cli.main import main
from clipguard.detector import EngineConfig, InferenceEngine

SECTIONS = ("machine", "config", "stages", "limit", "worker", "efficiency", "naive", "batching")


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.broker
@pytest.mark.slow
def test_bench_tiny_writes_every_section_with_consistent_ratios(
    kafka_bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--bootstrap-servers",
            kafka_bootstrap,
            "--events",
            "40",
            "--naive-events",
            "10",
            "--duration",
            "0.3",
            "--latency-duration",
            "1",
            "--mix-images",
            "4",
            "--agreement-images",
            "12",
            "--no-skip-precision",  # measured even where bf16 is emulated (the tiny model is cheap)
            "--burst",
            "3",
            "--burst-size",
            "640x480",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    for section in (*SECTIONS, "latency", "memory", "noise"):
        assert report.get(section), section
    assert "bottleneck" in printed and "efficiency" in printed and "batching gain" in printed
    views = report["views"]  # the cost of views: 1 against the default count, same mix
    assert views["policy"] == "crop" and "view(s)" in printed
    assert views["counts"]["1"]["views_per_image"] == 1
    assert views["counts"]["5"]["views_per_image"] == 5  # 128-px mix, 64-px native crops
    for row in views["counts"].values():
        assert row["model_images_per_s"] > 0 and row["decode_images_per_s_per_core"] > 0

    stages = report["stages"]
    model, decode, broker = stages["model"], stages["decode"], stages["broker"]
    assert model["images_per_s"] > 0 and model["batch_seconds_p50"] > 0
    assert model["batch_size"] == report["config"]["batch_size"] == 32
    assert decode["images_per_s_per_core"] > 0 and decode["cores"] >= 1
    assert _close(decode["images_per_s"], decode["images_per_s_per_core"] * decode["cores"])
    assert broker["records_per_s"] > 0 and broker["records"] == 40

    limit = report["limit"]
    capacities = {
        "model": model["images_per_s"],
        "decode": decode["images_per_s"],
        "broker": broker["records_per_s"],
    }
    assert limit["capacities"] == capacities
    assert limit["stage"] == min(capacities, key=capacities.__getitem__)
    assert _close(limit["events_per_s"], min(capacities.values()))
    assert 0 < limit["serial_events_per_s"] <= limit["events_per_s"]

    worker, naive = report["worker"], report["naive"]
    assert worker["events"] == 40 and worker["events_per_s"] > 0
    assert worker["error_verdicts"] == 0 and worker["dead_letters"] == 0
    assert worker["inside"]["batches"] >= 1 and worker["inside"]["mean_batch_size"] >= 1
    assert 1 <= naive["events"] <= 10 and naive["events_per_s"] > 0
    efficiency = report["efficiency"]
    assert _close(efficiency["ratio"], worker["events_per_s"] / limit["events_per_s"])
    own = report["worker_own_process"]  # the same backlog, the worker alone in a spawned child
    assert own["events"] == 40 and own["error_verdicts"] == 0 and own["dead_letters"] == 0
    assert 0 <= own["first_verdict_s"] <= own["seconds"]  # one clock across the two processes
    assert own["inside"]["batches"] >= 1 and own["inside"]["model_busy"] > 0
    assert own["process_cpu_cores"] > 0  # the child's CPU, not the bench's
    assert _close(efficiency["own_process_ratio"], own["events_per_s"] / limit["events_per_s"])
    assert "worker, own process" in printed
    for drained in (worker, own):  # each drain between two model-only runs
        around = drained["model_around"]
        assert around["before"] > 0 and around["after"] > 0
        assert _close(around["mean"], (around["before"] + around["after"]) / 2)
        assert _close(
            drained["efficiency_vs_model_around"], drained["events_per_s"] / around["mean"]
        )
    assert own["model_around"]["before"] == report["worker_model_process"]["model_around"]["after"]
    assert ("vs the model around it" in printed) == (limit["stage"] == "model")
    assert efficiency["meets_target"] == (efficiency["ratio"] >= efficiency["target"] == 0.9)
    assert _close(report["batching"]["gain"], worker["events_per_s"] / naive["events_per_s"])

    latency = report["latency"]
    assert [p["load"] for p in latency["loads"]] == [0.5, 0.9]
    for phase in latency["loads"]:
        assert _close(phase["target_events_per_s"], phase["load"] * worker["events_per_s"])
        assert phase["events"] >= 30 and phase["offered_events_per_s"] > 0
        assert 0 < phase["p50_ms"] <= phase["p99_ms"] <= phase["max_ms"]
        assert 0 < phase["inside_worker_p50_ms"] <= phase["inside_worker_p99_ms"]
    bound = report["config"]["max_batch_wait_ms"] + 2000 * model["batch_seconds_p50"]
    assert _close(latency["bound_ms"], bound)
    assert latency["p99_within_bound_at_50"] == (latency["loads"][0]["p99_ms"] < bound)

    precision = report["precision"]  # fp32 and bf16 side by side, agreement on a held-out zoo
    if "fell back" not in precision.get("skipped", ""):
        assert precision["agreement_images"] == 12 and "bf16 vs fp32 agreement" in printed
        assert precision["p99_abs_delta_ai_score"] <= precision["max_abs_delta_ai_score"]
        changed = round((1 - precision["same_decisions"]) * 12)
        assert precision["decisions_changed"] == changed
        assert _close(
            precision["bf16_speedup"],
            precision["bfloat16_images_per_s"] / precision["float32_images_per_s"],
        )
        assert precision["chosen"] == report["machine"]["dtype"]

    memory = report["memory"]
    assert memory["events"] == 3 and (memory["width"], memory["height"]) == (640, 480)
    assert memory["peak_rss_mb"] >= memory["baseline_rss_mb"] > 0
    assert _close(memory["growth_mb"], memory["peak_rss_mb"] - memory["baseline_rss_mb"])
    assert memory["inflight_cap"] >= 32 and memory["bound_mb"] > 0
    assert memory["within_bound"] == (memory["growth_mb"] <= memory["bound_mb"])
    assert memory["error_verdicts"] == 0


def _report(model: float, decode: float, broker: float, worker: float, naive: float) -> dict:
    stage: dict[str, Any] = {"process_cpu_cores": 1.0}
    return {
        "started_at": "2026-11-23T00:00:00+00:00",
        "machine": {
            "cores": 2,
            "torch_threads": 2,
            "device": "cpu",
            "dtype": "float32",
            "loadavg_start": 0.5,
            "loadavg_end": 0.6,
            "kafka_crc32c": "c",
        },
        "config": {
            "model": "clipguard-tiny",
            "weights": "untrained",
            "model_image_size": 64,
            "batch_size": 32,
            "max_batch_wait_ms": 20,
            "mix": {"images": 4, "width": 128, "height": 128, "quality": 90, "mean_jpeg_bytes": 9},
        },
        "stages": {
            "model": {**stage, "images_per_s": model, "batch_seconds_p50": 0.1, "batch_size": 32},
            "decode": {
                **stage,
                "images_per_s": decode,
                "images_per_s_per_core": decode / 2,
                "cores": 2,
                "ms_per_image": 1.0,
            },
            "broker": {**stage, "records_per_s": broker, "mean_record_bytes": 5000},
        },
        "worker": {**stage, "events_per_s": worker, "events": 100},
        "naive": {**stage, "events_per_s": naive, "events": 10},
        "latency": {
            "loads": [
                {
                    "load": 0.5,
                    "offered_events_per_s": 9.0,
                    "events": 90,
                    "p50_ms": 50.0,
                    "p99_ms": 300.0,
                    "max_ms": 310.0,
                    "inside_worker_p50_ms": 20.0,
                    "inside_worker_p99_ms": 40.0,
                }
            ]
        },
    }


def test_derive_names_the_slowest_stage_and_the_ratios() -> None:
    report = derive(_report(model=20.0, decode=400.0, broker=100.0, worker=18.0, naive=6.0))
    assert report["limit"]["stage"] == "model"
    assert report["limit"]["events_per_s"] == 20.0
    assert _close(report["limit"]["serial_events_per_s"], 1 / (1 / 20 + 1 / 400 + 1 / 100))
    assert _close(report["efficiency"]["ratio"], 0.9) and report["efficiency"]["meets_target"]
    assert _close(report["batching"]["gain"], 3.0)
    assert _close(report["latency"]["bound_ms"], 220.0)
    assert report["latency"]["p99_within_bound_at_50"] is False

    report = derive(_report(model=900.0, decode=400.0, broker=100.0, worker=50.0, naive=25.0))
    assert report["limit"]["stage"] == "broker"
    assert _close(report["efficiency"]["ratio"], 0.5)
    assert not report["efficiency"]["meets_target"]


def test_table_shows_the_latency_split() -> None:
    text = table(derive(_report(model=20.0, decode=400.0, broker=100.0, worker=18.0, naive=6.0)))
    row = next(line for line in text.splitlines() if line.strip().startswith("50%"))
    assert row.split()[-4:] == ["20", "/", "40", "OVER"]


def test_table_skips_what_was_not_measured() -> None:
    report = _report(model=20.0, decode=400.0, broker=100.0, worker=18.0, naive=6.0)
    del report["naive"], report["latency"]
    text = table(derive(report))
    assert "MODEL is the bottleneck" in text
    assert "latency: skipped" in text and "memory: skipped" in text
    assert "batching gain" not in text


def test_a_drain_is_set_against_the_model_around_it_only_where_the_model_is_the_limit() -> None:
    for decode, shown in ((400.0, True), (15.0, False)):
        report = _report(model=20.0, decode=decode, broker=100.0, worker=12.0, naive=6.0)
        report["worker"]["model_around"] = {"before": 16.0, "after": 14.0}
        derived = derive(report)
        assert _close(derived["worker"]["efficiency_vs_model_around"], 12.0 / 15.0)
        text = table(derived)
        assert ("0.80  of model only just before / after the drain" in text) == shown


def test_bad_worker_setting_stops_before_measuring(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--set", "max_inflight=0", "--events", "10"]) == 2
    assert "worker settings (--set KEY=VALUE): invalid setting max_inflight" in (
        capsys.readouterr().err
    )


def test_mix_and_helpers() -> None:
    mix = zoo_mix(3, 33, quality=80)
    assert (mix.width, mix.height, len(mix.jpegs)) == (34, 34, 3)
    assert all(jpeg[:2] == b"\xff\xd8" for jpeg in mix.jpegs)
    key, value = mix.events("x", 4)[3]
    assert key == b"x-000003" and json.loads(value)["event_id"] == "x-000003"
    assert parse_size("4000X3000") == (4000, 3000)
    with pytest.raises(ValueError):
        parse_size("4000")
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile(list(range(1, 101)), 0.99) == 99


def test_the_upload_mix_has_every_kind_in_its_real_format_and_size() -> None:
    import io

    from PIL import Image

    from clipguard.bench.mix import UPLOAD_KINDS, upload_mix

    mix = upload_mix(5, seed=1)
    assert sorted(mix.kinds) == sorted(kind[0] for kind in UPLOAD_KINDS)
    for data, kind in zip(mix.jpegs, mix.kinds, strict=True):
        spec = next(k for k in UPLOAD_KINDS if k[0] == kind)
        image = Image.open(io.BytesIO(data))
        assert (image.format, image.size) == (spec[3], (spec[1], spec[2]))
    assert mix.describe()["count_phone_12mp_jpeg"] == 1


def test_score_agreement_counts_labels_and_decisions_that_move(tiny_checkpoint: Path) -> None:
    engine = InferenceEngine.from_checkpoint(tiny_checkpoint, EngineConfig(dtype="float32"))
    policy, threshold = engine.manifest.policy, engine.threshold
    edges = sorted({threshold, policy.review_at, policy.block_at})
    # One image just under each edge in fp32 and just over it in "bf16", two that stay put.
    exact = torch.tensor([0.02, *(edge - 0.001 for edge in edges), 0.999])
    low = torch.tensor([0.02, *(edge + 0.001 for edge in edges), 0.999])
    agreement = score_agreement(exact, low, engine)
    count = len(edges) + 2
    assert agreement["agreement_images"] == count
    assert agreement["max_abs_delta_ai_score"] == pytest.approx(0.002, abs=1e-6)
    assert agreement["same_labels"] == (count - 1) / count  # only the threshold's image
    moved = len({policy.review_at, policy.block_at})  # the images at review_at and block_at
    assert agreement["decisions_changed"] == moved
    assert agreement["same_decisions"] == (count - moved) / count
