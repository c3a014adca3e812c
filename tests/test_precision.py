"""The CPU dtype choice: a bf16 flag, agreement with fp32, then a measured speed-up."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from clipguard.detector import EngineConfig, InferenceEngine
from clipguard.detector.checkpoint import load_checkpoint
from clipguard.detector.precision import (
    MAX_SCORE_DELTA,
    MIN_SPEEDUP,
    REASONS,
    TIMING_ROUNDS,
    agreement,
    choose_cpu_dtype,
    cpu_bf16_flags,
    probe_batch,
)


class ScriptedClock:
    """A clock whose passes take ``fp32`` then ``bf16`` seconds, alternately: the order in
    which :func:`measured_speedup` times them."""

    def __init__(self, fp32: float, bf16: float) -> None:
        self.durations = [fp32, bf16]
        self.now, self.calls = 0.0, 0

    def __call__(self) -> float:
        if self.calls % 2:  # the end of a pass
            self.now += self.durations[(self.calls // 2) % 2]
        self.calls += 1
        return self.now


def _never(*_: object) -> float:
    raise AssertionError("nothing is timed without a bf16 flag")


def test_without_a_bf16_flag_auto_stays_fp32_and_times_nothing(tiny_checkpoint: Path) -> None:
    detector, manifest = load_checkpoint(tiny_checkpoint)
    size = manifest.preprocess.image_size
    choice = choose_cpu_dtype(detector.eval(), size, flags=[], clock=_never)
    assert (choice.dtype, choice.reason) == (torch.float32, "no_bf16_isa")


@pytest.mark.parametrize(
    ("flags", "fp32_s", "bf16_s", "expected"),
    [
        (["avx512_bf16"], 0.4, 0.1, (torch.bfloat16, "bf16_faster")),  # the AMD EPYC VM: 3.9x
        (["avx512_bf16"], 0.4, 0.7, (torch.float32, "bf16_slower")),  # the Xeon VM: 0.6x
        (["amx_bf16", "avx512_bf16"], 0.4, 0.3, (torch.float32, "bf16_slower")),  # 1.33x < 1.5
        (["bf16"], 0.3, 0.2, (torch.bfloat16, "bf16_faster")),  # Arm, exactly 1.5x
    ],
)
def test_auto_takes_bf16_only_where_it_is_measured_to_pay_and_agrees(
    tiny_checkpoint: Path,
    flags: list[str],
    fp32_s: float,
    bf16_s: float,
    expected: tuple[torch.dtype, str],
) -> None:
    detector, manifest = load_checkpoint(tiny_checkpoint)
    size = manifest.preprocess.image_size
    clock = ScriptedClock(fp32_s, bf16_s)
    choice = choose_cpu_dtype(detector.eval(), size, flags=flags, clock=clock)
    if agreement(detector, torch.bfloat16, size) > MAX_SCORE_DELTA:
        expected = (torch.float32, "bf16_disagrees")
    else:
        assert clock.calls == 2 * 2 * TIMING_ROUNDS  # both dtypes, every round
        assert f"{fp32_s / bf16_s:.2f}x" in choice.detail
    assert (choice.dtype, choice.reason) == expected
    assert all(p.dtype == torch.float32 for p in detector.parameters())  # never converted


def test_bf16_that_disagrees_is_refused_before_anything_is_timed(tiny_checkpoint: Path) -> None:
    detector, manifest = load_checkpoint(tiny_checkpoint)
    size = manifest.preprocess.image_size
    with torch.no_grad():  # a head that reads exactly where bf16's features move
        pixels = probe_batch(size)
        exact = detector.eval().features(pixels)[0]
        rounded = copy.deepcopy(detector).bfloat16().features(pixels.bfloat16())[0].float()
        error = rounded - exact
        detector.binary_head.weight.copy_(4 * error / error.square().sum())
        detector.binary_head.bias.fill_(-float(detector.binary_head.weight[0] @ exact))
    assert agreement(detector, torch.bfloat16, size) > MAX_SCORE_DELTA
    choice = choose_cpu_dtype(detector.eval(), size, flags=["avx512_bf16"], clock=_never)
    assert (choice.dtype, choice.reason) == (torch.float32, "bf16_disagrees")


def test_the_real_measurement_on_this_cpu_is_consistent(tiny_checkpoint: Path) -> None:
    """On this machine's CPU, with its real clock: whatever it picks, dtype and reason agree."""
    detector, manifest = load_checkpoint(tiny_checkpoint)
    choice = choose_cpu_dtype(detector.eval(), manifest.preprocess.image_size)
    assert choice.reason in REASONS
    assert (choice.dtype == torch.bfloat16) == (choice.reason == "bf16_faster")
    if choice.reason in ("bf16_faster", "bf16_slower"):
        speedup = float(choice.detail.split("bf16 ")[-1].split("x")[0])
        assert (speedup >= MIN_SPEEDUP) == (choice.reason == "bf16_faster")


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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("flags : fpu avx512_bf16 amx_bf16\n", ["amx_bf16", "avx512_bf16"]),
        ("flags : fpu sse2 avx2\n", []),
        ("Features : fp asimd bf16 i8mm\n", ["bf16"]),  # aarch64
    ],
)
def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path, text: str, expected: list[str]) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\n" + text)
    assert cpu_bf16_flags(cpuinfo) == expected
    assert cpu_bf16_flags(tmp_path / "missing") == []
