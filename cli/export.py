"""``clipguard export --format onnx``: a checkpoint as one ``.onnx`` file, checked against torch.

The held-out parity images are zoo images (training/zoo.py) rendered at the model's input
size from a seed the calibration images do not use; int8 calibration images are zoo images
too unless ``--calibration DIR`` points at images like the training data.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from clipguard.cli.common import EXIT_OK, add_flag, flag_values, iter_files
from clipguard.consumer.config import CheckpointPath, ClipguardSettings, SettingsError
from clipguard.detector.checkpoint import load_checkpoint
from clipguard.detector.decode import decode_image
from clipguard.detector.onnx_parity import ParityError
from clipguard.detector.onnx_pipeline import export_onnx
from clipguard.detector.preprocess import PreprocessConfig, decode_min_side, preprocess
from clipguard.training import zoo

#: Zoo seeds: calibration stands in for training data, parity is measured on other images.
CALIBRATION_SEED = 1
HELD_OUT_SEED = 2


class ExportSettings(ClipguardSettings):
    checkpoint: CheckpointPath
    out: Path
    format: Literal["onnx"] = "onnx"
    quantize: Literal["none", "int8"] = "none"
    #: A folder of images like the training data, for int8 activation ranges (default: zoo).
    calibration: Path | None = None
    calibration_images: int = Field(default=128, ge=1, le=10_000)
    parity_images: int = Field(default=64, ge=2, le=10_000)
    threads: int | None = Field(default=None, ge=1)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX (fp32 or int8), checked against torch",
        description="Writes one .onnx file: preprocessed pixels (N,3,S,S) in, calibrated "
        "P(AI) (N,) and source probabilities (N,C) out, the checkpoint's manifest in its "
        "metadata. Prints its parity with torch on held-out zoo images and refuses to write "
        "a file that misses the tolerances (docs/onnx.md). Needs the 'onnx' extra.",
    )
    add_flag(parser, "--checkpoint", type=Path, help="checkpoint directory or .safetensors")
    add_flag(parser, "--format", choices=["onnx"], help="onnx (the only format so far)")
    add_flag(parser, "--out", type=Path, help="the .onnx file to write")
    add_flag(parser, "--quantize", choices=["none", "int8"], help="none (fp32) or int8 (static)")
    add_flag(parser, "--calibration", type=Path, help="int8: folder of training-like images")
    add_flag(parser, "--calibration-images", dest="calibration_images", type=int, help="128")
    add_flag(parser, "--parity-images", dest="parity_images", type=int, help="held-out, 64")
    add_flag(parser, "--threads", type=int, help="torch threads while exporting")
    parser.add_argument("--config", help="TOML file with settings")
    parser.set_defaults(func=run)


def zoo_pixels(count: int, cfg: PreprocessConfig, seed: int) -> np.ndarray:
    """``count`` zoo images (real and every generator) preprocessed: (count,3,S,S)."""
    samples = zoo.generate(count, size=max(zoo.MIN_SIZE, cfg.image_size), seed=seed)
    return torch.stack([preprocess(s.image, cfg) for s in samples]).numpy()


def folder_pixels(folder: Path, count: int, cfg: PreprocessConfig, seed: int) -> np.ndarray:
    """Up to ``count`` images sampled from ``folder`` (recursively), preprocessed."""
    files = list(iter_files([folder], all_files=False))
    if not files:
        raise SettingsError([f"--calibration {folder}: no images found"])
    random.Random(seed).shuffle(files)
    side = decode_min_side(cfg)
    picked = [
        preprocess(decode_image(path.read_bytes(), min_side=side), cfg) for path in files[:count]
    ]
    return torch.stack(picked).numpy()


def summary(out: Path, record: dict[str, Any]) -> list[str]:
    """What was written and how far it is from torch, as printed at export."""
    parity, batch = record["parity"], record["batch_independence"]
    kind = "fp32" if record["quantize"] == "none" else f"int8 {record['mode']}"
    cal = (
        f", {record['calibration_images']} calibration images"
        if "calibration_images" in record
        else ""
    )
    return [
        f"export   {out} ({kind}{cal}, opset {record['opset']})",
        f"parity   vs torch fp32 on {parity['images']} held-out zoo images: max |delta ai_score| "
        f"{parity['max_abs_delta_ai_score']:.2e}, p99 {parity['p99_abs_delta_ai_score']:.2e}, "
        f"max |delta source prob| {parity['max_abs_delta_source_prob']:.2e}, decisions "
        f"identical {parity['same_decisions']:.1%}"
        + (
            f" (every flip within {parity['flip_max_margin']:.4f} of a threshold)"
            if parity.get("flip_max_margin") is not None
            else ""
        ),
        f"batch    each image alone vs in batches of {batch['batch']}: max |delta ai_score| "
        f"{batch['max_abs_delta_ai_score']:.2e}",
        "tolerance " + ", ".join(f"{k} {v:g}" for k, v in record["tolerances"].items()),
    ]


def run(args: argparse.Namespace) -> int:
    settings = ExportSettings.load(args.config, **flag_values(args))
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    detector, manifest = load_checkpoint(settings.checkpoint)
    cfg = manifest.preprocess
    held_out = zoo_pixels(settings.parity_images, cfg, HELD_OUT_SEED)
    calibration = None
    if settings.quantize == "int8":
        calibration = (
            folder_pixels(settings.calibration, settings.calibration_images, cfg, CALIBRATION_SEED)
            if settings.calibration is not None
            else zoo_pixels(settings.calibration_images, cfg, CALIBRATION_SEED)
        )
    try:
        record = export_onnx(
            detector, manifest, settings.out, held_out, settings.quantize, calibration
        )
    except ParityError as exc:
        if exc.record:
            print("\n".join(summary(settings.out, exc.record)), file=sys.stderr)
        raise
    print("\n".join(summary(settings.out, record)), flush=True)
    return EXIT_OK
