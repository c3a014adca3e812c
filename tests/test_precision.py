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


def test_without_amx_auto_stays_fp32_whatever_else_the_cpu_has(tiny_checkpoint: Path) -> None:
    detector, manifest = load_checkpoint(tiny_checkpoint)
    for flags in ([], ["avx512_bf16"]):
        choice = choose_cpu_dtype(detector.eval(), manifest.preprocess.image_size, flags=flags)
        assert (choice.dtype, choice.reason) == (torch.float32, "no_amx")


def test_with_amx_auto_takes_bf16_when_it_agrees_and_leaves_the_model_alone(
    tiny_checkpoint: Path,
) -> None:
    detector, manifest = load_checkpoint(tiny_checkpoint)
    size = manifest.preprocess.image_size
    choice = choose_cpu_dtype(detector.eval(), size, flags=["amx_bf16", "avx512_bf16"])
    delta = agreement(detector, torch.bfloat16, size)
    expected = "amx_bf16" if delta <= MAX_SCORE_DELTA else "bf16_disagrees"
    assert choice.reason == expected
    assert all(p.dtype == torch.float32 for p in detector.parameters())  # never converted


def test_the_engine_never_converts_the_callers_model(tiny_checkpoint: Path) -> None:
    detector, manifest = load_checkpoint(tiny_checkpoint)
    engine = InferenceEngine(detector, manifest, EngineConfig(device="cpu", dtype="bfloat16"))
    assert all(p.dtype == torch.float32 for p in detector.parameters())
    if engine.dtype == torch.bfloat16:
        assert next(engine.model.parameters()).dtype == torch.bfloat16


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
