"""Recipes that go from data to a saved, calibrated, evaluated checkpoint.

The CLI and the demo call these. Order of a run: seed, build the encoder, fit (any mode,
any number of torchrun processes), then on rank 0 only: merge LoRA adapters, calibrate on
the validation set through the serving engine, evaluate val and test through it, save.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from clipguard.detector.backbones import BackboneSpec, build_encoder
from clipguard.detector.checkpoint import Manifest, new_detector, save_checkpoint
from clipguard.detector.engine import EngineConfig, InferenceEngine
from clipguard.detector.preprocess import PreprocessConfig
from clipguard.training import holdout, modes, zoo, zoo_families
from clipguard.training.augment import NO_AUGMENT, AugmentConfig
from clipguard.training.calibrate import calibrate
from clipguard.training.data import DetectorDataset, LabelledImage
from clipguard.training.evaluate import (
    Scored,
    engine_logits,
    score_items,
    seen_unseen,
    summarize,
)
from clipguard.training.loop import TrainConfig, TrainResult, fit, seed_everything

SYNTHETIC_NOTICE = (
    "trained on clipguard's synthetic generator zoo: it detects the zoo's artificial "
    "upsampling fingerprints, not real-world generators"
)


@dataclass
class TrainedCheckpoint:
    path: Path
    manifest: Manifest
    result: TrainResult
    seconds: float
    #: The held-out test set as the training code's evaluation scored it (engine outputs).
    test_scores: Scored | None = None


def zoo_items(n: int, *, size: int, seed: int, classes: Sequence[str]) -> list[LabelledImage]:
    samples = zoo.generate(n, size=size, seed=seed, sources=tuple(classes))
    return [LabelledImage(source=classes.index(s.source), image=s.image) for s in samples]


def _calibrated(
    engine: InferenceEngine,
    manifest: Manifest,
    val_items: Sequence[LabelledImage],
    target_fpr: float | None,
) -> tuple[Manifest, dict[str, Any]]:
    logits, kept = engine_logits(engine, val_items)
    is_fake = torch.tensor([item.is_fake for item in kept])
    result = calibrate(logits, is_fake, target_fpr)
    updated = manifest.model_copy(
        update={"calibration": result.calibration, "policy": result.policy}
    )
    return updated, result.info


def train_and_save(
    *,
    out: Path,
    backbone: BackboneSpec,
    classes: Sequence[str],
    train_items: Sequence[LabelledImage],
    val_items: Sequence[LabelledImage],
    test_items: Sequence[LabelledImage],
    config: TrainConfig,
    augment: AugmentConfig = NO_AUGMENT,
    preprocess_policy: str | None = None,
    preprocess_update: dict[str, Any] | None = None,
    version: str | None = None,
    extra_training_info: dict[str, Any] | None = None,
    target_fpr: float | None = None,
    state_dir: Path | None = None,
    resume: Path | None = None,
    holdout_plan: holdout.HoldoutPlan | None = None,
) -> TrainedCheckpoint | None:
    """Build, fit, calibrate, evaluate through the serving engine, save.

    Returns ``None`` on torchrun ranks other than 0 (they train, rank 0 does the rest).
    With ``holdout_plan`` the item lists are checked for leaks before anything trains, the
    plan goes into the manifest (``training.holdout``) and ``metrics.test.seen_unseen``
    splits the per-generator rows into seen and unseen.
    """
    started = time.perf_counter()
    if holdout_plan is not None:
        if list(classes) != holdout_plan.classes:
            raise holdout.HoldoutError(
                f"classes {list(classes)} are not the plan's {holdout_plan.classes}"
            )
        splits = {"train": train_items, "val": val_items, "test": test_items}
        holdout.check_no_leak(holdout_plan, classes, splits)
    seed_everything(config.seed)  # the encoder's random init is part of the run's identity
    encoder = build_encoder(backbone)
    preprocess: PreprocessConfig = encoder.preprocess
    update = {**(preprocess_update or {})}
    if preprocess_policy is not None:
        update["policy"] = preprocess_policy
    if update:  # validated: a bad view count or grid is refused here, not in the worker
        preprocess = PreprocessConfig.model_validate({**preprocess.model_dump(), **update})
    detector = new_detector(encoder, list(classes), modes.feature_norm(config.mode))
    train_set = DetectorDataset(train_items, preprocess, augment, seed=config.seed)
    val_set = DetectorDataset(val_items, preprocess) if val_items else None
    result = fit(
        detector,
        train_set,
        val_set,
        config,
        state_dir=state_dir,
        resume=resume,
        state_info={"classes": list(classes), "backbone": backbone.name},
    )
    if not result.is_main:
        return None
    merged = modes.finalize(detector)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    training: dict[str, Any] = {
        "mode": config.mode,
        "config": config.model_dump(mode="json"),
        "augment": augment.model_dump(mode="json"),
        "n_train": len(train_items),
        "n_val": len(val_items),
        "n_test": len(test_items),
        **result.as_dict(),
        **(extra_training_info or {}),
    }
    if config.mode == "lora":
        training["lora"] = {
            "rank": config.lora_rank,
            "alpha": config.lora_alpha,
            "merged_weights": merged,
        }
    if config.mode == "last-n":
        training["last_n"] = config.last_n
    if holdout_plan is not None:
        training["holdout"] = holdout_plan.manifest_info()
    manifest = Manifest(
        version=version or f"{backbone.name}-{config.mode}-{stamp}",
        backbone=encoder.model_config,
        pretrained=backbone.pretrained,
        feature_dim=encoder.feature_dim,
        feature_norm=detector.feature_norm,
        classes=list(classes),
        preprocess=preprocess,
        training=training,
    )
    # fp32: the reference arithmetic, and an engine that picks bf16 converts its module in
    # place, which would change the weights this run saves.
    engine_config = EngineConfig(device=config.device, dtype="float32")
    engine = InferenceEngine(detector, manifest, engine_config)
    if val_items:
        manifest, calibration_info = _calibrated(engine, manifest, val_items, target_fpr)
        manifest.training["calibration"] = calibration_info
        engine = InferenceEngine(detector, manifest, engine_config)
    metrics: dict[str, Any] = {}
    if val_items:
        metrics["val"] = summarize(score_items(engine, val_items), engine.classes, engine.threshold)
    test_scores = None
    if test_items:
        test_scores = score_items(engine, test_items)
        metrics["test"] = summarize(test_scores, engine.classes, engine.threshold)
        if holdout_plan is not None:
            metrics["test"]["seen_unseen"] = seen_unseen(
                metrics["test"]["per_generator"], holdout_plan.held_out
            )
    manifest = manifest.model_copy(update={"metrics": metrics})
    manifest = save_checkpoint(detector, manifest, out)
    return TrainedCheckpoint(out, manifest, result, time.perf_counter() - started, test_scores)


def train_synthetic(
    out: Path,
    *,
    backbone: BackboneSpec | None = None,
    n_train: int = 3000,
    n_val: int = 300,
    n_test: int = 500,
    image_size: int = 64,
    seed: int = 0,
    config: TrainConfig | None = None,
    augment: AugmentConfig | None = None,
    target_fpr: float | None = None,
    state_dir: Path | None = None,
    resume: Path | None = None,
    sources: Sequence[str] | None = None,
    holdout_sources: Sequence[str] = (),
) -> TrainedCheckpoint | None:
    """The demo's and the tests' detector: the tiny backbone on the synthetic zoo.

    ``sources`` picks generators and families of :mod:`zoo_families` (default: the original
    zoo, generated exactly as before); ``holdout_sources`` keeps some out of train and val
    and reports them as unseen (the protocol in :mod:`clipguard.training.holdout`).
    """
    backbone = backbone or BackboneSpec()
    config = config or TrainConfig(epochs=6, batch_size=64, lr=1e-3, schedule="cosine", seed=seed)
    augment = augment or synthetic_augment()
    names = zoo_families.expand([zoo.REAL, *(sources or zoo.GENERATORS)])
    info: dict[str, Any] = {"data": "synthetic zoo", "notice": SYNTHETIC_NOTICE}
    plan = None
    if names == zoo.SOURCES and not holdout_sources:
        classes = list(zoo.SOURCES)
        splits = {
            "train": zoo_items(n_train, size=image_size, seed=seed, classes=classes),
            "val": zoo_items(n_val, size=image_size, seed=seed + 1, classes=classes),
            "test": zoo_items(n_test, size=image_size, seed=seed + 2, classes=classes),
        }
    else:
        plan = holdout.resolve(holdout_sources, names[1:], families=zoo_families.FAMILIES)
        classes = plan.classes
        splits = holdout.synthetic_splits(
            plan, n_train=n_train, n_val=n_val, n_test=n_test, size=image_size, seed=seed
        )
        info["synthetic_sources"] = list(names)
    return train_and_save(
        out=out,
        backbone=backbone,
        classes=classes,
        train_items=splits["train"],
        val_items=splits["val"],
        test_items=splits["test"],
        config=config,
        augment=augment,
        version=f"synthetic-{backbone.name}-{config.mode}-seed{seed}",
        extra_training_info=info,
        target_fpr=target_fpr,
        state_dir=state_dir,
        resume=resume,
        holdout_plan=plan,
    )


def synthetic_augment() -> AugmentConfig:
    """The zoo's augmentation: no flips, no odd crops, light JPEG.

    The zoo's fingerprints sit on the 2x2 pixel grid: a mirror of an even-width image and a
    crop at an odd offset swap their phase, so flips are off and crops (off by default here)
    keep even offsets. JPEG because the demo ships some uploads as JPEG (format-bias guard:
    real and fake alike).
    """
    return AugmentConfig(flip_prob=0.0, jpeg_prob=0.4, jpeg_quality=(85, 100), crop_even=True)
