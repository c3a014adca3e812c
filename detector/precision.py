"""Which dtype the model runs in, and why: decided by the CPU's matrix units, guarded by
agreement with fp32.

On CUDA, ``auto`` is fp16 (autocast). On the CPU, bfloat16 weights and inputs pay only where
the processor has AMX tiles (``amx_bf16``): measured with ``clipguard bench`` on a machine here
with AVX512-BF16 but no AMX, ViT-B-32 ran at 0.64x fp32 in bf16 (13.3 vs 8.5 images/s), while
the AMX machine the issue was measured on gave 4.4x. So ``auto`` takes bf16 only with AMX, and
only if its scores agree with fp32 on a probe batch within :data:`MAX_SCORE_DELTA`; the choice
is deterministic (no timing at start-up, so a busy machine cannot flip it). ``float32`` keeps
exact scores. The decision and its reason are logged and exported
(``clipguard_model_info{dtype, dtype_reason}``); the bench measures both dtypes side by side.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: Largest |P(AI) bf16 - P(AI) fp32| on the probe images for bf16 to be kept.
MAX_SCORE_DELTA = 0.01
PROBE_IMAGES = 8
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
#: The flag that makes bf16 pay (AMX tile matrix multiply).
FAST_BF16_FLAG = "amx_bf16"

#: Bounded vocabulary of reasons (a metric label).
REASONS = (
    "requested",
    "cuda_fp16",
    "no_amx",
    "bf16_disagrees",
    "amx_bf16",
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


def choose_cpu_dtype(
    model: torch.nn.Module,
    image_size: int,
    temperature: float = 1.0,
    flags: list[str] | None = None,
) -> PrecisionChoice:
    """``auto`` on the CPU: bf16 where the CPU has AMX and bf16 agrees with fp32, else fp32."""
    flags = cpu_bf16_flags() if flags is None else flags
    if FAST_BF16_FLAG not in flags:
        have = "+".join(flags) or "no bf16 flags"
        return PrecisionChoice(torch.float32, "no_amx", f"{have}: bf16 does not pay without AMX")
    delta = agreement(model, torch.bfloat16, image_size, temperature)
    detail = f"{'+'.join(flags)}: max |delta ai_score| {delta:.4f} on {PROBE_IMAGES} probe images"
    if delta > MAX_SCORE_DELTA:
        return PrecisionChoice(torch.float32, "bf16_disagrees", detail)
    return PrecisionChoice(torch.bfloat16, "amx_bf16", detail)


def agreement(
    model: torch.nn.Module, dtype: torch.dtype, image_size: int, temperature: float = 1.0
) -> float:
    """Max |delta ai_score| of ``dtype`` against fp32 on the probe images. Works on a copy:
    the caller's model is never converted."""
    pixels = probe_batch(image_size)
    with torch.inference_mode():
        reference = _ai_scores(model, pixels, temperature)
        low = copy.deepcopy(model).to(dtype)
        return float((_ai_scores(low, pixels.to(dtype), temperature) - reference).abs().max())
