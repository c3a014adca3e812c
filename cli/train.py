"""``clipguard train``: fine-tune a detector and save a checkpoint."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from clipguard.cli.common import EXIT_OK, add_flag, flag_values
from clipguard.consumer.config import ClipguardSettings
from clipguard.detector.backbones import TINY_BACKBONE, BackboneSpec
from clipguard.training.augment import AugmentConfig
from clipguard.training.folders import read_image_folder
from clipguard.training.loop import TrainConfig
from clipguard.training.recipes import SYNTHETIC_NOTICE, train_and_save, train_synthetic

log = logging.getLogger("clipguard.train")


class TrainSettings(ClipguardSettings):
    data: Path | None = None
    synthetic: bool = False
    out: Path
    backbone: str = TINY_BACKBONE
    pretrained: str | None = None
    mode: Literal["full", "linear"] = "full"
    epochs: int = Field(default=12, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float | None = Field(default=None, gt=0)
    seed: int = 0
    device: str = "auto"
    synthetic_images: int = Field(default=2000, ge=50)

    @model_validator(mode="after")
    def _one_source(self) -> TrainSettings:
        if (self.data is None) == (not self.synthetic):
            raise ValueError("give exactly one of --data DIR and --synthetic")
        return self

    def default_lr(self) -> float:
        """From scratch learns fast; pretrained CLIP wants a small step (the paper's regime)."""
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.pretrained is None else 1e-5


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="fine-tune a detector and save a checkpoint")
    add_flag(parser, "--data", type=Path, help="ImageFolder root: <split>/<source>/<image>")
    parser.add_argument(
        "--synthetic",
        action="store_const",
        const=True,
        default=None,
        help="train on the built-in synthetic generator zoo",
    )
    add_flag(parser, "--out", type=Path, help="checkpoint directory (or .safetensors) to write")
    add_flag(parser, "--backbone", help=f"open_clip model name (default {TINY_BACKBONE})")
    add_flag(parser, "--pretrained", help="open_clip tag (downloads) or local weights file")
    add_flag(parser, "--mode", help="full (all weights, the paper) or linear (frozen encoder)")
    add_flag(parser, "--epochs", type=int, help="default: 12 (the paper)")
    add_flag(parser, "--batch-size", dest="batch_size", type=int)
    add_flag(parser, "--lr", type=float, help="default: 1e-3 from scratch, 1e-5 pretrained")
    add_flag(parser, "--seed", type=int)
    add_flag(parser, "--device", help="auto, cpu, cuda")
    add_flag(
        parser,
        "--synthetic-images",
        dest="synthetic_images",
        type=int,
        help="training images drawn from the zoo (default 2000)",
    )
    parser.add_argument("--config", help="TOML file with settings")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = TrainSettings.load(args.config, **flag_values(args))
    backbone = BackboneSpec(name=settings.backbone, pretrained=settings.pretrained)
    config = TrainConfig(
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.default_lr(),
        seed=settings.seed,
        device=settings.device,
        train_encoder=settings.mode == "full",
    )
    if settings.synthetic:
        log.info("training on the synthetic zoo: %s", SYNTHETIC_NOTICE)
        trained = train_synthetic(
            settings.out,
            backbone=backbone,
            n_train=settings.synthetic_images,
            seed=settings.seed,
            config=config,
        )
    else:
        assert settings.data is not None
        dataset = read_image_folder(settings.data)
        if dataset.skipped:
            log.warning("skipped %d files that are not images", len(dataset.skipped))
        trained = train_and_save(
            out=settings.out,
            backbone=backbone,
            classes=dataset.classes,
            train_items=dataset.splits.get("train", []),
            val_items=dataset.splits.get("val", []),
            test_items=dataset.splits.get("test", []),
            config=config,
            augment=AugmentConfig(),
            extra_training_info={"data": str(settings.data), "mode": settings.mode},
        )
    print(
        json.dumps(
            {
                "checkpoint": str(trained.path),
                "version": trained.manifest.version,
                "best_epoch": trained.result.best_epoch,
                "seconds": round(trained.seconds, 1),
                "metrics": trained.manifest.metrics,
            },
            indent=2,
        )
    )
    return EXIT_OK
