"""The worker serving an exported .onnx file through the real broker, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import image_bytes
from streams import fresh_topics, produce, read_outputs, running_worker, worker_settings

from clipguard.cli.main import main
from clipguard.cli.produce import upload_event

pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.broker


def test_the_worker_serves_an_onnx_file(
    kafka_bootstrap: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    model = tmp_path / "tiny.onnx"
    export = ["export", "--checkpoint", str(tiny_checkpoint), "--out", str(model)]
    assert main([*export, "--quantize", "int8", "--parity-images", "16"]) == 0
    topics = fresh_topics(kafka_bootstrap, partitions=2)
    events = [
        (f"onnx-{i}".encode(), upload_event(image_bytes(color=(i * 9, 40, 200 - i)), f"onnx-{i}"))
        for i in range(20)
    ]
    events.append((b"broken", b"{not json"))
    settings = worker_settings(kafka_bootstrap, model, topics)
    with running_worker(settings) as worker:
        assert type(worker.engine).__name__ == "OnnxEngine"
        assert worker.engine.dtype_reason == "onnx_int8_static"
        placed = produce(kafka_bootstrap, topics.input, events)
        out = read_outputs(kafka_bootstrap, topics, set(placed))
    judged = [v for v in out.verdicts if v.error is None]
    assert sorted(v.event_id for v in judged) == sorted(f"onnx-{i}" for i in range(20))
    for verdict in judged:
        assert verdict.label in ("real", "ai_generated") and 0.0 <= verdict.ai_score <= 1.0
        assert verdict.model.name == "clipguard-tiny" and verdict.model.sha256
    assert len(out.dead_letters) == 1
    assert set(out.covered(topics.input)) == set(placed)  # nothing lost
