"""The bench's ONNX section: model-only images/s on ONNX Runtime next to torch.

The checkpoint is exported as ``clipguard export`` does it (fp32, and int8 with static
quantisation calibrated on zoo images), each file served by the ONNX engine and timed by
the same :func:`measure_model` as torch, at the same batch and thread count, twice
interleaved (the better run counts, as for the torch model stage). Dynamic int8
is timed too, with its batch dependence, because that is the measurement behind choosing
static quantisation (docs/onnx.md).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from clipguard.bench.stages import measure_model
from clipguard.detector import EngineConfig, load_checkpoint
from clipguard.detector.onnx_parity import ParityError, batch_independence
from clipguard.detector.onnx_runtime import MissingExtraError, require_extra

PARITY_IMAGES = 64
CALIBRATION_IMAGES = 128
VARIANTS = ("fp32", "int8", "int8_dynamic")


def measure_onnx(
    checkpoint: Path,
    batch: torch.Tensor,
    config: EngineConfig,
    duration_s: float,
    note: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """images/s of each ONNX variant on ``batch``, and its agreement with torch fp32."""
    try:
        require_extra("onnx")
        require_extra("onnxruntime")
    except MissingExtraError as exc:
        return {"skipped": str(exc)}
    from clipguard.cli.export import CALIBRATION_SEED, HELD_OUT_SEED, zoo_pixels
    from clipguard.detector.onnx_engine import OnnxEngine
    from clipguard.detector.onnx_export import set_metadata
    from clipguard.detector.onnx_pipeline import export_onnx
    from clipguard.detector.onnx_quantize import quantize_int8

    detector, manifest = load_checkpoint(checkpoint)
    held_out = zoo_pixels(PARITY_IMAGES, manifest.preprocess, HELD_OUT_SEED)
    calibration = zoo_pixels(CALIBRATION_IMAGES, manifest.preprocess, CALIBRATION_SEED)
    result: dict[str, Any] = {"threads": config.threads, "batch_size": batch.shape[0]}
    with tempfile.TemporaryDirectory(prefix="clipguard-bench-onnx-") as tmp:
        files = {name: Path(tmp) / f"{name}.onnx" for name in VARIANTS}
        try:
            note("onnx: exporting fp32 and static int8 (parity against torch on the zoo)")
            fp32 = export_onnx(detector, manifest, files["fp32"], held_out)
            int8 = export_onnx(detector, manifest, files["int8"], held_out, "int8", calibration)
        except ParityError as exc:
            return {"skipped": str(exc), "record": exc.record}
        dynamic = quantize_int8(files["fp32"], files["int8_dynamic"], "dynamic")
        set_metadata(files["int8_dynamic"], manifest, dynamic)  # says what it is
        result["parity_fp32"], result["parity_int8"] = fp32["parity"], int8["parity"]
        engines = {name: OnnxEngine(files[name], config) for name in VARIANTS}
        # Interleaved twice, the better run counts: other load only ever slows one down.
        for round_ in (1, 2):
            for name, engine in engines.items():
                note(f"model only on onnx {name} ({round_}/2): batches of {batch.shape[0]}")
                rate = measure_model(engine, batch, duration_s)["images_per_s"]
                key = f"{name}_images_per_s"
                result[key] = max(rate, result.get(key, 0.0))
                note(f"  {rate:.1f} images/s")
        for name, engine in engines.items():
            result[f"{name}_batch_max_abs_delta"] = batch_independence(
                engine.session, held_out[:32]
            )["max_abs_delta_ai_score"]
        del engines
    return result


def onnx_lines(section: dict[str, Any] | None, torch_rate: float, torch_dtype: str) -> list[str]:
    """The table's lines for this section (empty when the section is absent)."""
    if not section:
        return []
    label = f"{'    torch / onnx fp32 / int8':<30}{'':>10}  "
    if "skipped" in section:
        return [label + f"onnx skipped: {section['skipped']}"]
    p8 = section["parity_int8"]
    return [
        label + f"{torch_rate:,.1f} ({torch_dtype}) / {section['fp32_images_per_s']:,.1f} / "
        f"{section['int8_images_per_s']:,.1f} images/s (int8 static "
        f"{section['int8_images_per_s'] / section['fp32_images_per_s']:.2f}x onnx fp32)",
        f"{'    onnx vs torch fp32':<30}{'':>10}  fp32 max |delta ai_score| "
        f"{section['parity_fp32']['max_abs_delta_ai_score']:.1e}; int8 p99 "
        f"{p8['p99_abs_delta_ai_score']:.4f}, decisions identical {p8['same_decisions']:.1%} "
        f"of {p8['images']} zoo images",
        f"{'    int8 dynamic (not used)':<30}{'':>10}  {section['int8_dynamic_images_per_s']:,.1f}"
        f" images/s, but alone vs in a batch |delta ai_score| up to "
        f"{section['int8_dynamic_batch_max_abs_delta']:.4f} (static: "
        f"{section['int8_batch_max_abs_delta']:.1e})",
    ]
