"""The CPU dtype choice: by measurement and agreement, never by CPU flags alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipguard.detector import EngineConfig, InferenceEngine
from clipguard.detector.checkpoint import load_checkpoint
from clipguard.detector.precision import (
    MAX_SCORE_DELTA,
    agreement,
    choose_cpu_dtype,
    cpu_bf16_flags,
    probe_batch,
)


def test_no_native_bf16_means_fp32_without_measuring(tiny_checkpoint: Path) -> None:
    detector, manifest = load_checkpoint(tiny_checkpoint)
    choice = choose_cpu_dtype(detector.eval(), manifest.preprocess.image_size, flags=[])
    assert (choice.dtype, choice.reason) == (torch.float32, "no_native_bf16")


def test_the_choice_follows_the_measurement(tiny_checkpoint: Path) -> None:
    """Whatever this machine measures, the choice is consistent with what it reports."""
    detector, manifest = load_checkpoint(tiny_checkpoint)
    choice = choose_cpu_dtype(detector.eval(), manifest.preprocess.image_size, flags=["x"])
    speedup = float(choice.detail.split("bf16 ")[1].split("x")[0])
    delta = float(choice.detail.split("|delta ai_score| ")[1].split(" ")[0])
    if delta > MAX_SCORE_DELTA:
        assert choice.reason == "bf16_disagrees" and choice.dtype == torch.float32
    elif speedup < 1.3:
        assert choice.reason == "bf16_slower" and choice.dtype == torch.float32
    else:
        assert choice.reason == "bf16_faster" and choice.dtype == torch.bfloat16
    print(f"this machine: {choice.reason}: {choice.detail}")


def test_explicit_bf16_on_the_cpu_agrees_with_fp32_or_falls_back(tiny_checkpoint: Path) -> None:
    detector, manifest = load_checkpoint(tiny_checkpoint)
    size = manifest.preprocess.image_size
    delta = agreement(detector.eval(), torch.bfloat16, size)
    engine = InferenceEngine.from_checkpoint(
        tiny_checkpoint, EngineConfig(device="cpu", dtype="bfloat16")
    )
    if delta <= MAX_SCORE_DELTA:
        assert engine.dtype == torch.bfloat16 and engine.dtype_reason == "requested"
        exact = InferenceEngine.from_checkpoint(
            tiny_checkpoint, EngineConfig(device="cpu", dtype="float32")
        )
        pixels = probe_batch(size, count=4, seed=3)
        low, high = engine.scores(pixels)[0], exact.scores(pixels)[0]
        assert low.dtype == torch.float32  # scores always come back as fp32
        assert (low - high).abs().max() <= MAX_SCORE_DELTA
    else:
        assert engine.dtype == torch.float32 and engine.dtype_reason == "bf16_disagrees"


@pytest.mark.parametrize("text", ["flags : fpu avx512_bf16 amx_bf16\n", "flags : fpu sse2\n"])
def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path, text: str) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\n" + text)
    flags = cpu_bf16_flags(cpuinfo)
    assert flags == (["amx_bf16", "avx512_bf16"] if "amx" in text else [])
    assert cpu_bf16_flags(tmp_path / "missing") == []
