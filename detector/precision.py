"""Which dtype the model runs in, and why: chosen by measurement, guarded by agreement.

On CUDA, ``auto`` is fp16 (autocast). On the CPU, bfloat16 weights and inputs pay only where
the processor multiplies bf16 matrices natively *and* the kernels torch picks use that: on
one machine here (avx512_bf16 without AMX exposed) bf16 ran at 0.6x fp32, elsewhere (AMX)
at 4.4x. So ``auto`` does not trust CPU flags alone: where the CPU advertises bf16 it times
the model both ways on a probe batch and takes bf16 only if it is at least
:data:`MIN_SPEEDUP` faster and its scores agree with fp32 within :data:`MAX_SCORE_DELTA`.
``float32`` always keeps exact scores. The decision and its reason are logged and exported
(``clipguard_model_info{dtype, dtype_reason}``).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: bf16 must beat fp32 by this factor on the probe batch to be chosen automatically.
MIN_SPEEDUP = 1.3
#: Largest |P(AI) bf16 - P(AI) fp32| on the probe images for bf16 to be kept.
MAX_SCORE_DELTA = 0.01
PROBE_IMAGES = 8
PROBE_REPEATS = 2
BF16_FLAGS = ("amx_bf16", "avx512_bf16")

#: Bounded vocabulary of reasons (a metric label).
REASONS = (
    "requested",
    "cuda_fp16",
    "no_native_bf16",
    "bf16_slower",
    "bf16_disagrees",
    "bf16_faster",
)


@dataclass(frozen=True)
class PrecisionChoice:
    dtype: torch.dtype
    reason: str
    detail: str = ""


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The native-bf16 flags this CPU advertises (Linux; elsewhere none are assumed)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return []
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    present = set(flags.split())
    return [flag for flag in BF16_FLAGS if flag in present]


def probe_batch(image_size: int, count: int = PROBE_IMAGES, seed: int = 0) -> torch.Tensor:
    """Smooth random images in the model's normalised range: more like photos than noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 8, 8, generator=generator) * 4 - 2
    return torch.nn.functional.interpolate(coarse, size=image_size, mode="bilinear")


def _ai_scores(model: torch.nn.Module, pixels: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.sigmoid(model(pixels).binary_logit.float() / temperature)


def _timed(model: torch.nn.Module, pixels: torch.Tensor) -> float:
    model(pixels)  # first call allocates and picks kernels
    started = time.perf_counter()
    for _ in range(PROBE_REPEATS):
        model(pixels)
    return (time.perf_counter() - started) / PROBE_REPEATS


def choose_cpu_dtype(
    model: torch.nn.Module,
    image_size: int,
    temperature: float = 1.0,
    flags: list[str] | None = None,
) -> PrecisionChoice:
    """``auto`` on the CPU: bf16 where it is measured faster and agrees, else fp32."""
    flags = cpu_bf16_flags() if flags is None else flags
    if not flags:
        return PrecisionChoice(torch.float32, "no_native_bf16", "the CPU advertises no bf16")
    pixels = probe_batch(image_size)
    with torch.inference_mode():
        fp32_s = _timed(model, pixels)
        reference = _ai_scores(model, pixels, temperature)
        low = copy.deepcopy(model).to(torch.bfloat16)
        low_pixels = pixels.to(torch.bfloat16)
        bf16_s = _timed(low, low_pixels)
        delta = float((_ai_scores(low, low_pixels, temperature) - reference).abs().max())
    del low
    speedup = fp32_s / bf16_s
    detail = (
        f"{'+'.join(flags)}: bf16 {speedup:.2f}x the fp32 speed, max |delta ai_score| "
        f"{delta:.4f} on {PROBE_IMAGES} probe images"
    )
    if delta > MAX_SCORE_DELTA:
        return PrecisionChoice(torch.float32, "bf16_disagrees", detail)
    if speedup < MIN_SPEEDUP:
        return PrecisionChoice(torch.float32, "bf16_slower", detail)
    return PrecisionChoice(torch.bfloat16, "bf16_faster", detail)


def agreement(
    model: torch.nn.Module, dtype: torch.dtype, image_size: int, temperature: float = 1.0
) -> float:
    """Max |delta ai_score| of ``dtype`` against fp32 on the probe images (a guard for an
    explicitly requested bf16/fp16 on the CPU)."""
    pixels = probe_batch(image_size)
    with torch.inference_mode():
        reference = _ai_scores(model.float(), pixels, temperature)
        low = copy.deepcopy(model).to(dtype)
        return float((_ai_scores(low, pixels.to(dtype), temperature) - reference).abs().max())
