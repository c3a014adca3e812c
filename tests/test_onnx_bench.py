"""The bench's ONNX section on the tiny model: every rate measured, the table lines printed.

Measurement, not a timed test: nothing asserts a speed, only that each figure is there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from clipguard.bench.onnx_rates import measure_onnx, onnx_lines
from clipguard.detector import EngineConfig, load_checkpoint
from clipguard.detector.onnx_parity import BATCH_MAX_DELTA


def test_onnx_section_measures_fp32_int8_and_dynamic(tiny_checkpoint: Path) -> None:
    pytest.importorskip("onnxruntime")
    _, manifest = load_checkpoint(tiny_checkpoint)
    size = manifest.preprocess.image_size
    batch = torch.rand(8, 3, size, size) * 4 - 2
    config = EngineConfig(device="cpu", max_batch_size=8, threads=1, warmup_batches=1)
    section = measure_onnx(tiny_checkpoint, batch, config, duration_s=0.2)
    for name in ("fp32", "int8", "int8_dynamic"):
        assert section[f"{name}_images_per_s"] > 0
    assert section["int8_batch_max_abs_delta"] <= BATCH_MAX_DELTA
    assert section["int8_dynamic_batch_max_abs_delta"] > BATCH_MAX_DELTA
    assert section["parity_int8"]["images"] == 64
    lines = onnx_lines(section, 123.4, "float32")
    assert len(lines) == 3 and "123.4 (float32)" in lines[0] and "decisions identical" in lines[1]


def test_onnx_section_without_the_extra_is_skipped_not_failed(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    section = measure_onnx(tiny_checkpoint, torch.zeros(1, 3, 8, 8), EngineConfig(), 0.1)
    assert "clipguard[onnx]" in section["skipped"]
    assert "onnx skipped" in onnx_lines(section, 1.0, "float32")[0]
    assert onnx_lines(None, 1.0, "float32") == []
