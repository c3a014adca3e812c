"""``clipguard train``: fine-tune, calibrate and evaluate a detector, save a checkpoint.

Works alone or under ``torchrun --nproc_per_node N -m clipguard.cli train ...``
(DistributedDataParallel; rank 0 prints and writes). Progress bars go to stderr, the final
JSON report to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from clipguard.cli.common import EXIT_OK, add_flag, flag_values
from clipguard.cli.holdout_runs import data_plan, leave_one_out
from clipguard.consumer.config import (
    ClipguardSettings,
    SettingsError,
    comma_separated,
)
from clipguard.detector.backbones import TINY_BACKBONE, BackboneSpec
from clipguard.detector.preprocess import MAX_VIEWS
from clipguard.training import distributed, holdout, zoo, zoo_families
from clipguard.training.augment import AugmentConfig
from clipguard.training.folders import DatasetError, carve_splits
from clipguard.training.layouts import LAYOUTS, read_dataset
from clipguard.training.loop import TrainConfig
from clipguard.training.modes import MODES, Mode, ModeError
from clipguard.training.presets import (
    DATA_CROP_GRID,
    DATA_PREPROCESS,
    DATA_VIEWS,
    PRESETS,
    preset_defaults,
)
from clipguard.training.recipes import (
    SYNTHETIC_NOTICE,
    TrainedCheckpoint,
    synthetic_augment,
    train_and_save,
    train_synthetic,
)
from clipguard.training.report import leave_one_out_table, seen_unseen_table
from clipguard.training.state import state_dir_for

log = logging.getLogger("clipguard.train")

Layout = Literal["auto", "wang2020", "ufd", "genimage", "cifake", "imagefolder", "zoo", "manifest"]
assert set(Layout.__args__) == set(LAYOUTS)  # type: ignore[attr-defined]


class TrainSettings(ClipguardSettings):
    data: Path | None = None
    synthetic: bool = False
    out: Path
    layout: Layout = "auto"
    #: CNNDetection's training fakes are all ProGAN; name their generator class.
    train_generator: str | None = None
    preset: Literal["paper", "ufd"] | None = None
    backbone: str = TINY_BACKBONE
    pretrained: str | None = None
    mode: Mode = "full"
    epochs: int = Field(default=12, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float | None = Field(default=None, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    #: Default: cosine for --synthetic, constant (the paper's Adam) for --data.
    schedule: Literal["constant", "cosine"] | None = None
    accumulate: int = Field(default=1, ge=1)
    patience: int | None = Field(default=None, ge=1)
    amp: bool = True
    lora_rank: int = Field(default=8, ge=1)
    lora_alpha: float = Field(default=16.0, gt=0)
    last_n: int = Field(default=2, ge=1)
    #: --mode svd: frozen singular directions per attention weight (default: all but one).
    svd_rank: int | None = Field(default=None, ge=0)
    svd_orth_weight: float = Field(default=1.0, ge=0)
    svd_sv_weight: float = Field(default=1.0, ge=0)
    #: Default for --data: DATA_PREPROCESS (measured, docs/training.md "Choosing the
    #: preprocessing"); --synthetic keeps the zoo's recipe (resize, one view).
    preprocess: Literal["resize", "crop", "both", "scale_first"] | None = None
    views: int | None = Field(default=None, ge=1, le=MAX_VIEWS)
    view_aggregation: Literal["mean", "max"] | None = None
    #: Native crop offsets on multiples of this (default 8: JPEG blocks, x2/x4/x8 upsamplers).
    crop_grid: int | None = Field(default=None, ge=1, le=64)
    flip_prob: float | None = Field(default=None, ge=0, le=1)
    blur_prob: float | None = Field(default=None, ge=0, le=1)
    jpeg_prob: float | None = Field(default=None, ge=0, le=1)
    crop_prob: float | None = Field(default=None, ge=0, le=1)
    jpeg_quality: tuple[int, int] | None = None
    blur_sigma: tuple[float, float] | None = None
    target_fpr: float | None = Field(default=None, gt=0, lt=1)
    resume: Path | None = None
    val_fraction: float = Field(default=0.1, ge=0, lt=0.5)
    test_fraction: float = Field(default=0.1, ge=0, lt=0.5)
    feature_cache: Path | None = None
    seed: int = 0
    device: str = "auto"
    num_workers: int = Field(default=0, ge=0)
    #: torch intra-op threads per process (default: torch's choice, one per core).
    threads: int | None = Field(default=None, ge=1)
    progress: bool = True
    synthetic_images: int = Field(default=2000, ge=50)
    #: Zoo generators or families (training/zoo_families.py); default: the original zoo.
    synthetic_sources: Annotated[tuple[str, ...], NoDecode] | None = None
    #: Generators (or families) kept out of train and val and reported as unseen.
    holdout_sources: Annotated[tuple[str, ...], NoDecode] = ()
    #: Train once per held-out generator (or family); report each and the mean.
    leave_one_out: Literal["generator", "family"] | None = None

    @field_validator("synthetic_sources", "holdout_sources", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return comma_separated(value)

    @field_validator("synthetic_sources")
    @classmethod
    def _known_sources(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            zoo_families.expand(value)  # ValueError lists the known names
        return value

    @field_validator("jpeg_quality", "blur_sigma", mode="before")
    @classmethod
    def _range(cls, value: Any) -> Any:
        """``LO,HI`` (a flag or a TOML string) or a two-item list."""
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",")]
            if len(parts) != 2:
                raise ValueError(f"expected LO,HI, got {value!r}")
            return tuple(parts)
        return value

    @field_validator("jpeg_quality")
    @classmethod
    def _quality(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 1 <= value[0] <= value[1] <= 100:
            raise ValueError(f"JPEG quality range must satisfy 1 <= LO <= HI <= 100, got {value}")
        return value

    @field_validator("blur_sigma")
    @classmethod
    def _sigma(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 <= value[0] <= value[1]:
            raise ValueError(f"blur sigma range must satisfy 0 <= LO <= HI, got {value}")
        return value

    @field_validator("data", "resume")
    @classmethod
    def _exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.exists():
            raise ValueError(f"not found: {value}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> TrainSettings:
        if (self.data is None) == (not self.synthetic):
            raise ValueError("give exactly one of --data DIR and --synthetic")
        if self.leave_one_out and self.holdout_sources:
            raise ValueError("give --holdout-sources or --leave-one-out, not both")
        if self.leave_one_out and self.resume is not None:
            raise ValueError("--resume continues one run; --leave-one-out makes several")
        if self.synthetic and self.holdout_sources:
            self.synthetic_plan()  # unknown names or nothing left to train on: refused here
        return self

    def synthetic_names(self) -> tuple[str, ...]:
        """``real`` + the selected zoo generators."""
        return zoo_families.expand([zoo.REAL, *(self.synthetic_sources or zoo.GENERATORS)])

    def synthetic_plan(self) -> holdout.HoldoutPlan:
        return holdout.resolve(
            self.holdout_sources, self.synthetic_names()[1:], families=zoo_families.FAMILIES
        )

    def default_lr(self) -> float:
        """From scratch learns fast; pretrained CLIP wants a small step (the paper's regime)."""
        if self.lr is not None:
            return self.lr
        if self.mode in ("linear", "multilayer"):  # heads only (RINE trains at 1e-3)
            return 1e-3
        if self.mode == "svd":  # unit singular vectors need a larger step than weights
            return 1e-3 if self.pretrained is None else 2e-4
        return 1e-3 if self.pretrained is None else 1e-5

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.default_lr(),
            weight_decay=self.weight_decay,
            schedule=self.schedule or ("cosine" if self.synthetic else "constant"),
            seed=self.seed,
            device=self.device,
            num_workers=self.num_workers,
            progress=self.progress,
            mode=self.mode,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
            last_n=self.last_n,
            svd_rank=self.svd_rank,
            svd_orth_weight=self.svd_orth_weight,
            svd_sv_weight=self.svd_sv_weight,
            accumulate=self.accumulate,
            amp=self.amp,
            patience=self.patience,
            feature_cache=self.feature_cache,
        )

    def policy(self) -> str | None:
        """The preprocessing policy: the flag, else the measured default for --data."""
        if self.preprocess is not None or self.synthetic:
            return self.preprocess
        return DATA_PREPROCESS

    def preprocess_update(self) -> dict[str, Any]:
        """Views, aggregation and crop grid stored in the checkpoint's input contract."""
        policy = self.policy()
        native = policy in ("crop", "both")
        views = self.views or (DATA_VIEWS if native and not self.synthetic else None)
        grid = self.crop_grid or (DATA_CROP_GRID if native else None)
        given = {"views": views, "aggregate": self.view_aggregation, "grid": grid}
        return {k: v for k, v in given.items() if v is not None}

    def augment_config(self) -> AugmentConfig:
        """CNNDetection's Blur+JPEG (0.1) with flips for real data; the zoo's own recipe.

        Under ``crop``/``both`` every training image is a random native crop (crop_prob 1):
        the model trains on the same kind of view it is scored through.
        """
        base = (
            synthetic_augment() if self.synthetic else AugmentConfig(blur_prob=0.1, jpeg_prob=0.1)
        )
        if self.policy() in ("crop", "both"):
            base = base.model_copy(update={"crop_prob": 1.0})
        given = {
            "flip_prob": self.flip_prob,
            "blur_prob": self.blur_prob,
            "jpeg_prob": self.jpeg_prob,
            "crop_prob": self.crop_prob,
            "jpeg_quality": self.jpeg_quality,
            "blur_sigma": self.blur_sigma,
        }
        return base.model_copy(update={k: v for k, v in given.items() if v is not None})


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a detector and save a checkpoint",
        description="Train a detector (any mode), calibrate it on the validation split, "
        "evaluate it through the serving engine and save a checkpoint. Under torchrun, "
        "rank 0 writes and prints.",
    )
    add_flag(parser, "--data", type=Path, help="dataset folder or CSV/JSONL manifest")
    parser.add_argument(
        "--synthetic",
        action="store_const",
        const=True,
        default=None,
        help="train on the built-in synthetic generator zoo",
    )
    add_flag(parser, "--out", type=Path, help="checkpoint directory (or .safetensors) to write")
    add_flag(parser, "--layout", choices=LAYOUTS, help="dataset layout (default: detect)")
    add_flag(
        parser,
        "--train-generator",
        dest="train_generator",
        help="wang2020: generator name of the training fakes (default progan)",
    )
    add_flag(parser, "--preset", choices=sorted(PRESETS), help="paper or ufd defaults")
    add_flag(parser, "--backbone", help=f"open_clip model name (default {TINY_BACKBONE})")
    add_flag(parser, "--pretrained", help="open_clip tag (downloads) or local weights file")
    add_flag(parser, "--mode", choices=MODES, help="which weights train (default full)")
    add_flag(parser, "--epochs", type=int, help="default: 12 (the paper)")
    add_flag(parser, "--batch-size", dest="batch_size", type=int, help="over all processes")
    add_flag(parser, "--lr", type=float, help="default: 1e-3 from scratch/linear, 1e-5 pretrained")
    add_flag(parser, "--weight-decay", dest="weight_decay", type=float)
    add_flag(parser, "--schedule", choices=("constant", "cosine"))
    add_flag(parser, "--accumulate", type=int, help="micro-batches per optimizer step")
    add_flag(parser, "--patience", type=int, help="early stop after N epochs without better AP")
    parser.add_argument(
        "--no-amp",
        dest="amp",
        action="store_const",
        const=False,
        default=None,
        help="no mixed precision on CUDA",
    )
    add_flag(parser, "--lora-rank", dest="lora_rank", type=int, help="default 8")
    add_flag(parser, "--lora-alpha", dest="lora_alpha", type=float, help="default 16")
    add_flag(parser, "--last-n", dest="last_n", type=int, help="blocks trained in last-n mode")
    add_flag(
        parser,
        "--svd-rank",
        dest="svd_rank",
        type=int,
        help="svd mode: singular directions kept frozen per attention weight "
        "(default: all but one, Effort's rank-1 residual)",
    )
    add_flag(
        parser,
        "--svd-orth-weight",
        dest="svd_orth_weight",
        type=float,
        help="svd mode: orthogonality regulariser weight (default 1)",
    )
    add_flag(
        parser,
        "--svd-sv-weight",
        dest="svd_sv_weight",
        type=float,
        help="svd mode: singular-value (weight energy) regulariser weight (default 1)",
    )
    add_flag(
        parser,
        "--preprocess",
        choices=("resize", "crop", "both", "scale_first"),
        help=f"stored in the checkpoint (default for --data: {DATA_PREPROCESS})",
    )
    parser.add_argument(
        "--crop",
        dest="preprocess",
        action="store_const",
        const="crop",
        help="same as --preprocess crop (native crops, no resize)",
    )
    add_flag(
        parser,
        "--views",
        type=int,
        help=f"views per image when scoring (default for crop/both: {DATA_VIEWS})",
    )
    add_flag(parser, "--view-aggregation", dest="view_aggregation", choices=("mean", "max"))
    add_flag(
        parser,
        "--crop-grid",
        dest="crop_grid",
        type=int,
        help=f"crop offsets on multiples of N pixels (default {DATA_CROP_GRID})",
    )
    add_flag(parser, "--flip-prob", dest="flip_prob", type=float)
    add_flag(parser, "--blur-prob", dest="blur_prob", type=float, help="sigma in [0, 3]")
    add_flag(parser, "--jpeg-prob", dest="jpeg_prob", type=float, help="quality in [30, 100]")
    add_flag(parser, "--crop-prob", dest="crop_prob", type=float, help="random crop")
    add_flag(parser, "--jpeg-quality", dest="jpeg_quality", help="LO,HI (default 30,100)")
    add_flag(parser, "--blur-sigma", dest="blur_sigma", help="LO,HI (default 0,3)")
    add_flag(
        parser,
        "--target-fpr",
        dest="target_fpr",
        type=float,
        help="set the threshold for this false-positive rate on validation reals (e.g. 0.01)",
    )
    add_flag(parser, "--resume", type=Path, help="continue a run from its checkpoint/state")
    add_flag(parser, "--val-fraction", dest="val_fraction", type=float)
    add_flag(parser, "--test-fraction", dest="test_fraction", type=float)
    add_flag(parser, "--feature-cache", dest="feature_cache", type=Path, help="linear mode")
    add_flag(parser, "--seed", type=int)
    add_flag(parser, "--device", help="auto, cpu, cuda")
    add_flag(parser, "--num-workers", dest="num_workers", type=int, help="data loader workers")
    add_flag(parser, "--threads", type=int, help="torch threads per process (shared machines: 1)")
    parser.add_argument(
        "--no-progress", dest="progress", action="store_const", const=False, default=None
    )
    add_flag(
        parser,
        "--synthetic-images",
        dest="synthetic_images",
        type=int,
        help="training images drawn from the zoo (default 2000)",
    )
    add_flag(
        parser,
        "--synthetic-sources",
        dest="synthetic_sources",
        help="comma list of zoo generators or families (zoo, deconv, denoise, vae, jpeg, "
        "spectral; 'new' = the five new families, 'all'); default: the original zoo",
    )
    add_flag(
        parser,
        "--holdout-sources",
        dest="holdout_sources",
        help="comma list of generators (or zoo families) kept out of train and val and "
        "reported as unseen next to the seen ones",
    )
    parser.add_argument(
        "--leave-one-out",
        dest="leave_one_out",
        nargs="?",
        const="generator",
        default=None,
        choices=("generator", "family"),
        help="train once per held-out generator (or family: --leave-one-out family) into "
        "OUT/holdout-NAME and report each and the mean",
    )
    parser.add_argument("--config", help="TOML file with settings")
    parser.set_defaults(func=run)


def load_settings(args: argparse.Namespace) -> TrainSettings:
    flags = flag_values(args)
    settings = TrainSettings.load(args.config, **flags)
    extra = preset_defaults(settings.preset, settings.model_fields_set)
    if extra:
        settings = TrainSettings.load(args.config, **{**extra, **flags})
    return settings


def _train(settings: TrainSettings) -> TrainedCheckpoint | None:
    backbone = BackboneSpec(name=settings.backbone, pretrained=settings.pretrained)
    config = settings.train_config()
    state_dir = state_dir_for(settings.out)
    if settings.synthetic:
        log.info("training on the synthetic zoo: %s", SYNTHETIC_NOTICE)
        return train_synthetic(
            settings.out,
            backbone=backbone,
            n_train=settings.synthetic_images,
            seed=settings.seed,
            config=config,
            augment=settings.augment_config(),
            target_fpr=settings.target_fpr,
            state_dir=state_dir,
            resume=settings.resume,
            sources=settings.synthetic_sources,
            holdout_sources=settings.holdout_sources,
        )
    assert settings.data is not None
    try:
        dataset = read_dataset(
            settings.data, settings.layout, train_generator=settings.train_generator
        )
        carve_splits(
            dataset,
            val_fraction=settings.val_fraction,
            test_fraction=settings.test_fraction,
            seed=settings.seed,
        )
    except DatasetError as exc:
        raise SettingsError([f"invalid setting data (--data / CLIPGUARD_DATA): {exc}"]) from None
    if dataset.skipped:
        log.warning("skipped %d files that are not images or not readable", len(dataset.skipped))
    for note in dataset.notes:
        log.info("%s", note)
    log.info("dataset %s", json.dumps(dataset.summary()))
    classes, splits, plan = dataset.classes, dataset.splits, None
    if settings.holdout_sources:
        plan = data_plan(settings.holdout_sources, dataset.classes, dataset.splits)
        classes, splits = plan.classes, holdout.apply(plan, dataset.classes, dataset.splits)
        log.info("holding out %s; training on real + %s", plan.held_out, plan.seen)
    return train_and_save(
        out=settings.out,
        backbone=backbone,
        classes=classes,
        train_items=splits.get("train", []),
        val_items=splits.get("val", []),
        test_items=splits.get("test", []),
        config=config,
        augment=settings.augment_config(),
        preprocess_policy=settings.policy(),
        preprocess_update=settings.preprocess_update(),
        extra_training_info={
            "data": str(settings.data),
            "dataset": dataset.summary(),
            "preset": settings.preset,
        },
        target_fpr=settings.target_fpr,
        state_dir=state_dir,
        resume=settings.resume,
        holdout_plan=plan,
    )


def report(trained: TrainedCheckpoint) -> dict[str, Any]:
    manifest = trained.manifest
    result = trained.result
    return {
        "checkpoint": str(trained.path),
        "version": manifest.version,
        "mode": manifest.training.get("mode"),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": result.resumed_from_epoch,
        "world_size": result.world_size,
        "seconds": round(trained.seconds, 1),
        "seconds_per_epoch": (
            round(result.seconds_per_epoch, 3) if result.seconds_per_epoch else None
        ),
        "feature_seconds": (
            round(result.feature_seconds, 2) if result.feature_seconds is not None else None
        ),
        "trainable_parameters": result.trainable.get("trainable_parameters"),
        "skipped_files": manifest.training.get("dataset", {}).get("skipped_files", 0),
        "undecodable_train_images": (result.history[-1].skipped_images if result.history else 0),
        "calibration": manifest.calibration.model_dump(),
        "policy": manifest.policy.model_dump(),
        "metrics": manifest.metrics,
    }


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    info = distributed.env_info()
    if not info.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        if settings.leave_one_out:
            loo = leave_one_out(settings, _train, report)
            if loo is not None:
                print(leave_one_out_table(loo["summary"]), file=sys.stderr)
                print(json.dumps(loo, indent=2, default=str))
            return EXIT_OK
        trained = _train(settings)
    except ModeError as exc:
        raise SettingsError([f"invalid setting for --mode {settings.mode}: {exc}"]) from None
    finally:
        distributed.shutdown()
    if trained is not None:
        seen_unseen = (trained.manifest.metrics.get("test") or {}).get("seen_unseen")
        if seen_unseen:
            print(seen_unseen_table(seen_unseen), file=sys.stderr)
        print(json.dumps(report(trained), indent=2, default=str))
    return EXIT_OK
