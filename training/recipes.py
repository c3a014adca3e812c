"""Recipes that go from data to a saved checkpoint; the CLI and the demo call these."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clipguard.detector.backbones import BackboneSpec, build_encoder
from clipguard.detector.checkpoint import Manifest, new_detector, save_checkpoint
from clipguard.detector.engine import EngineConfig, InferenceEngine
from clipguard.detector.preprocess import PreprocessConfig
from clipguard.training import zoo
from clipguard.training.augment import NO_AUGMENT, AugmentConfig
from clipguard.training.data import DetectorDataset, LabelledImage
from clipguard.training.evaluate import evaluate
from clipguard.training.loop import TrainConfig, TrainResult, fit

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


def zoo_items(n: int, *, size: int, seed: int, classes: Sequence[str]) -> list[LabelledImage]:
    samples = zoo.generate(n, size=size, seed=seed, sources=tuple(classes))
    return [LabelledImage(source=classes.index(s.source), image=s.image) for s in samples]


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
    version: str | None = None,
    extra_training_info: dict[str, Any] | None = None,
) -> TrainedCheckpoint:
    """Build the encoder, fit, evaluate through the serving engine, save the checkpoint."""
    started = time.perf_counter()
    encoder = build_encoder(backbone)
    preprocess: PreprocessConfig = encoder.preprocess
    if preprocess_policy is not None:
        preprocess = preprocess.model_copy(update={"policy": preprocess_policy})
    detector = new_detector(encoder, list(classes))
    train_set = DetectorDataset(train_items, preprocess, augment, seed=config.seed)
    val_set = DetectorDataset(val_items, preprocess) if val_items else None
    result = fit(detector, train_set, val_set, config)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    manifest = Manifest(
        version=version or f"{backbone.name}-{stamp}",
        backbone=encoder.model_config,
        pretrained=backbone.pretrained,
        feature_dim=encoder.feature_dim,
        classes=list(classes),
        preprocess=preprocess,
        training={
            "config": config.model_dump(),
            "augment": augment.model_dump(),
            "n_train": len(train_items),
            "n_val": len(val_items),
            **result.as_dict(),
            **(extra_training_info or {}),
        },
    )
    engine = InferenceEngine(detector, manifest, EngineConfig(device="cpu"))
    if test_items:
        manifest = manifest.model_copy(update={"metrics": {"test": evaluate(engine, test_items)}})
    manifest = save_checkpoint(detector, manifest, out)
    return TrainedCheckpoint(out, manifest, result, time.perf_counter() - started)


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
) -> TrainedCheckpoint:
    """The demo's and the tests' detector: the tiny backbone on the synthetic zoo."""
    backbone = backbone or BackboneSpec()
    config = config or TrainConfig(epochs=6, batch_size=64, lr=1e-3, schedule="cosine", seed=seed)
    # No flips: the zoo's fingerprints sit on the 2x2 pixel grid and a mirror of an even-width
    # image swaps its phase. JPEG as the demo ships some uploads as JPEG (format-bias guard:
    # real and fake alike).
    augment = augment or AugmentConfig(flip_prob=0.0, jpeg_prob=0.4, jpeg_quality=(85, 100))
    classes = list(zoo.SOURCES)
    return train_and_save(
        out=out,
        backbone=backbone,
        classes=classes,
        train_items=zoo_items(n_train, size=image_size, seed=seed, classes=classes),
        val_items=zoo_items(n_val, size=image_size, seed=seed + 1, classes=classes),
        test_items=zoo_items(n_test, size=image_size, seed=seed + 2, classes=classes),
        config=config,
        augment=augment,
        version=f"synthetic-{backbone.name}-seed{seed}",
        extra_training_info={"data": "synthetic zoo", "notice": SYNTHETIC_NOTICE},
    )
