"""``clipguard import``: a published linear detector head (plain tensors) -> a checkpoint.

No training: the head is checked against the backbone's feature dim and mapped onto
clipguard's binary + source heads (clipguard.detector.published). ``.pth`` files are read
only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, FilePath

from clipguard.cli.common import EXIT_OK, add_flag, flag_values
from clipguard.consumer.config import ClipguardSettings
from clipguard.detector.backbones import TINY_BACKBONE
from clipguard.detector.published import UFD, HeadImport, import_head


class ImportSettings(ClipguardSettings):
    head: FilePath
    out: Path
    #: ``ufd``: UniversalFakeDetect's fc_weights.pth (ViT-L-14 / openai, centre crop 224).
    preset: Literal["ufd"] | None = None
    backbone: str = TINY_BACKBONE
    pretrained: str | None = None
    preprocess: Literal["resize", "crop"] = "resize"
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
    parser.add_argument("head", type=Path, help="fc_weights.pth or a .safetensors linear head")
    add_flag(parser, "--out", type=Path, help="checkpoint directory or .safetensors to write")
    add_flag(parser, "--preset", choices=["ufd"], help="ufd: UniversalFakeDetect's probe")
    add_flag(parser, "--backbone", help=f"open_clip model name (default {TINY_BACKBONE})")
    add_flag(parser, "--pretrained", help="open_clip tag or local backbone weights file")
    add_flag(parser, "--preprocess", choices=["resize", "crop"], help="resize (default) or crop")
    add_flag(parser, "--image-size", dest="image_size", type=int, help="input side in pixels")
    add_flag(parser, "--source-name", dest="source_name", help="where the head came from")
    add_flag(parser, "--licence", help="the head's licence, recorded in the manifest")
    add_flag(parser, "--version", help="checkpoint version string")
    parser.add_argument("--config", help="TOML file with settings")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    flags = flag_values(args)
    flags["head"] = args.head
    settings = ImportSettings.load(args.config, **flags)
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
