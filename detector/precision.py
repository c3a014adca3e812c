"""Which dtype the model runs in, and why: bf16 where the CPU has native bf16 maths, it is
measured to pay on this model, and its scores agree with fp32.

On CUDA, ``auto`` is fp16 (autocast). On the CPU, CPU flags alone do not predict the speed of
bf16 weights and inputs. Measured here with the ViT-B-32 tower, one thread, batch 16: a Xeon VM
with AVX512-BF16 but no AMX ran bf16 at 0.57-0.64x fp32, an AMD EPYC VM with AVX512-BF16 (and no
AMX) at 3.85x, the AMX machine the issue was measured on at 4.4x, an AVX2-only EPYC (no bf16
flag, bf16 emulated) at 0.15x. So ``auto`` on the CPU:

1. no native bf16 flag (``amx_bf16``, ``avx512_bf16``, Arm's ``bf16``): fp32, nothing timed;
2. bf16 scores on the probe images differ from fp32 by more than :data:`MAX_SCORE_DELTA`: fp32;
3. otherwise both dtypes are timed on the probe batch (interleaved, best of
   :data:`TIMING_ROUNDS`); bf16 is kept only if it is at least :data:`MIN_SPEEDUP` times faster.
   The threshold sits far from every ratio measured (0.6x, 2.5x for the tiny model, 3.9x), so
   a busy machine does not flip the choice; pin ``--dtype`` for a choice that never moves.

``float32`` keeps exact scores. The decision, its reason and the measured speed-up are logged
and exported (``clipguard_model_info{dtype, dtype_reason}``); the bench measures both dtypes
side by side.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: Largest |P(AI) bf16 - P(AI) fp32| on the probe images for bf16 to be kept.
MAX_SCORE_DELTA = 0.01
PROBE_IMAGES = 8
#: bf16 must be at least this much faster than fp32 on the probe batch to be chosen.
MIN_SPEEDUP = 1.5
TIMING_ROUNDS = 2
#: /proc/cpuinfo flags of native bf16 matrix maths (x86 AMX and AVX512-BF16, Arm BF16).
BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")

#: Bounded vocabulary of reasons (a metric label).
REASONS = (
    "requested",
    "cuda_fp16",
    "no_bf16_isa",
    "bf16_disagrees",
    "bf16_slower",
    "bf16_faster",
)

Clock = Callable[[], float]


@dataclass(frozen=True)
class PrecisionChoice:
    dtype: torch.dtype
    reason: str
    detail: str = ""


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The native-bf16 flags this CPU advertises (Linux x86 ``flags``, Arm ``Features``;
    elsewhere none are assumed)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return []
    present: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            present.update(value.split())
    return [flag for flag in BF16_FLAGS if flag in present]


def probe_batch(image_size: int, count: int = PROBE_IMAGES, seed: int = 0) -> torch.Tensor:
    """Smooth random images in the model's normalised range: more like photos than noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 8, 8, generator=generator) * 4 - 2
    return torch.nn.functional.interpolate(coarse, size=image_size, mode="bilinear")


def _ai_scores(model: torch.nn.Module, pixels: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.sigmoid(model(pixels).binary_logit.float() / temperature)


def choose_cpu_dtype(
    model: torch.nn.Module,
    image_size: int,
    temperature: float = 1.0,
    flags: list[str] | None = None,
    clock: Clock = time.perf_counter,
) -> PrecisionChoice:
    """``auto`` on the CPU: bf16 where the CPU has native bf16, bf16 agrees with fp32 and is
    measured to be at least :data:`MIN_SPEEDUP` times faster on this model; else fp32.
    The caller's model is never converted."""
    flags = cpu_bf16_flags() if flags is None else flags
    if not flags:
        return PrecisionChoice(torch.float32, "no_bf16_isa", "no bf16 flag in /proc/cpuinfo")
    pixels = probe_batch(image_size)
    low = copy.deepcopy(model).to(torch.bfloat16)
    delta = _max_delta(model, low, pixels, temperature)
    detail = f"{'+'.join(flags)}: max |delta ai_score| {delta:.4f} on {PROBE_IMAGES} probe images"
    if delta > MAX_SCORE_DELTA:
        return PrecisionChoice(torch.float32, "bf16_disagrees", detail)
    speedup = measured_speedup(model, low, pixels, clock)
    detail += f", bf16 {speedup:.2f}x fp32 (needs {MIN_SPEEDUP}x)"
    if speedup < MIN_SPEEDUP:
        return PrecisionChoice(torch.float32, "bf16_slower", detail)
    return PrecisionChoice(torch.bfloat16, "bf16_faster", detail)


def measured_speedup(
    model: torch.nn.Module,
    low: torch.nn.Module,
    pixels: torch.Tensor,
    clock: Clock = time.perf_counter,
    rounds: int = TIMING_ROUNDS,
) -> float:
    """fp32 seconds / bf16 seconds for one forward pass on ``pixels``: interleaved rounds, the
    best of each, after the warm-up the agreement check already ran."""
    low_pixels = pixels.to(torch.bfloat16)
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    with torch.inference_mode():
        for _ in range(rounds):
            for dtype, net, batch in (
                (torch.float32, model, pixels),
                (torch.bfloat16, low, low_pixels),
            ):
                start = clock()
                net(batch)
                best[dtype] = min(best[dtype], clock() - start)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)


def _max_delta(
    model: torch.nn.Module, low: torch.nn.Module, pixels: torch.Tensor, temperature: float
) -> float:
    low_dtype = next(low.parameters()).dtype
    with torch.inference_mode():
        reference = _ai_scores(model, pixels, temperature)
        return float((_ai_scores(low, pixels.to(low_dtype), temperature) - reference).abs().max())


def agreement(
    model: torch.nn.Module, dtype: torch.dtype, image_size: int, temperature: float = 1.0
) -> float:
    """Max |delta ai_score| of ``dtype`` against fp32 on the probe images. Works on a copy:
    the caller's model is never converted."""
    low = copy.deepcopy(model).to(dtype)
    return _max_delta(model, low, probe_batch(image_size), temperature)
