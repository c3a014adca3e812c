"""The bench's worker in a process of its own: it drains a real backlog through the embedded
broker and reports its own metrics; a child that cannot start is a clear error, not a hang.
The precision section's default skip follows the CPU's bf16 support."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from clipguard.bench.command import precision_skip_reason
from clipguard.bench.mix import zoo_mix
from clipguard.bench.stages import BenchError
from clipguard.bench.worker import BenchEnv
from clipguard.bench.worker_process import measure_peak_process
from clipguard.consumer.config import WorkerSettings


def _env(bootstrap: str, checkpoint: Path, timeout_s: float = 120.0) -> BenchEnv:
    def build(input_topic: str, output_topic: str, dlq_topic: str, group: str) -> WorkerSettings:
        return WorkerSettings(
            checkpoint=checkpoint,
            bootstrap_servers=bootstrap,
            input_topic=input_topic,
            output_topic=output_topic,
            dlq_topic=dlq_topic,
            group_id=group,
            metrics_enabled=False,
            session_timeout_ms=6_000,
            heartbeat_interval_ms=1_000,
        )

    return BenchEnv(bootstrap, None, timeout_s, build)


@pytest.mark.broker
def test_the_worker_process_drains_the_backlog_and_reports_its_metrics(
    kafka_bootstrap: str, tiny_checkpoint: Path
) -> None:
    env = _env(kafka_bootstrap, tiny_checkpoint)
    mix = zoo_mix(4, 64)
    result = measure_peak_process(env, env.worker_settings("a", "b", "c", "d"), mix, 24)
    assert result["events"] == 24 and result["error_verdicts"] == 0
    assert result["dead_letters"] == 0
    assert result["seconds"] > 0 and 0 <= result["first_verdict_s"] <= result["seconds"]
    inside = result["inside"]  # the child's own registry: its batches add up to the backlog
    assert round(inside["batches"] * inside["mean_batch_size"]) == 24
    assert 0 < inside["model_busy"] <= 1.05
    assert result["process_cpu_cores"] > 0


@pytest.mark.broker
def test_a_worker_process_that_cannot_load_its_model_is_a_clear_error(
    kafka_bootstrap: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated: safetensors refuses it
    env = _env(kafka_bootstrap, broken, timeout_s=60)  # bounds the wait if it ever hangs
    # The child's own report, not the parent's timeout ("sent no readiness within ..."):
    with pytest.raises(BenchError, match="the worker process failed"):
        measure_peak_process(env, env.worker_settings("a", "b", "c", "d"), zoo_mix(2, 64), 4)


def test_precision_is_skipped_by_default_only_without_native_bf16() -> None:
    assert precision_skip_reason(None, "bf16_faster") is None
    assert precision_skip_reason(None, "bf16_slower") is None
    assert "no native bf16" in (precision_skip_reason(None, "no_bf16_isa") or "")
    assert precision_skip_reason(False, "no_bf16_isa") is None  # --no-skip-precision
    assert precision_skip_reason(True, "bf16_faster") == "skipped (--skip-precision)"
