"""Views: geometry, one prediction per image whatever its views, bounded work, old manifests,
the serve-time override, and training crops that keep the pixel grid."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_checkpoint
from PIL import Image

from clipguard.consumer.config import WorkerSettings
from clipguard.consumer.worker import engine_from_settings
from clipguard.detector import EngineConfig, InferenceEngine, load_checkpoint, read_manifest
from clipguard.detector.preprocess import (
    MAX_VIEWS,
    PreprocessConfig,
    preprocess,
    preprocess_views,
    view_boxes,
)
from clipguard.training.augment import AugmentConfig, random_crop

S = 64


def _noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _engine(path: Path, **preprocess: object) -> InferenceEngine:
    detector, manifest = load_checkpoint(path)
    cfg = manifest.preprocess.model_copy(update=preprocess)
    config = EngineConfig(dtype="float32", max_batch_size=7, warmup_batches=0)
    return InferenceEngine(detector, manifest.model_copy(update={"preprocess": cfg}), config)


@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_a_batch_of_images_with_views_gives_one_prediction_each_equal_to_alone(
    tiny_checkpoint: Path, aggregate: str
) -> None:
    engine = _engine(tiny_checkpoint, policy="crop", views=5, aggregate=aggregate, grid=8)
    sizes = [(64, 64), (150, 90), (200, 130), (40, 300), (96, 96)]
    images = [_noise(w, h, seed) for seed, (w, h) in enumerate(sizes)]
    views = [preprocess_views(image, engine.preprocess) for image in images]
    assert [v.shape[0] for v in views] == [1, 5, 5, 1, 5]  # small or thin: one view
    batched = engine.predict_tensors(views)  # 17 views in chunks of 7 on the model
    assert len(batched) == len(images)
    for image, prediction in zip(images, batched, strict=True):
        alone = engine.predict_images([image])[0]
        assert prediction.ai_score == pytest.approx(alone.ai_score, abs=1e-5)
        assert prediction.source_scores == pytest.approx(alone.source_scores, abs=1e-5)
    # the aggregate is of the views' own logits, computed one view at a time
    per_view = engine.logits(views[1][:, None].unbind(0))[0]  # five single-view "images"
    expected = per_view.mean() if aggregate == "mean" else per_view.max()
    got = engine.logits([views[1]])[0][0]
    assert float(got) == pytest.approx(float(expected), abs=1e-5)


def test_views_are_native_crops_on_the_grid_and_never_upscaled() -> None:
    cfg = PreprocessConfig(image_size=S, policy="crop", views=9, grid=8)
    boxes = view_boxes(301, 203, cfg)
    assert len(boxes) == 9 and len(set(boxes)) == 9
    for box in boxes:
        assert box.side == S and box.left % 8 == 0 and box.top % 8 == 0
        assert box.left + S <= 301 and box.top + S <= 203
    assert boxes[0] == view_boxes(301, 203, cfg.model_copy(update={"views": 1}))[0]  # centre
    both = view_boxes(301, 203, cfg.model_copy(update={"policy": "both", "views": 3}))
    assert both[0].side == 203 and all(b.side == S for b in both[1:])  # whole, then crops


@pytest.mark.parametrize("policy", ["crop", "both", "resize"])
def test_a_strip_and_a_40_megapixel_image_cost_bounded_work(policy: str) -> None:
    cfg = PreprocessConfig(image_size=S, policy=policy, views=MAX_VIEWS, grid=8)
    strip = view_boxes(1, 4000, cfg)
    huge = view_boxes(8000, 5000, cfg)
    assert len(strip) <= MAX_VIEWS and len(huge) <= MAX_VIEWS
    if policy != "resize":
        assert len(huge) == MAX_VIEWS  # room for all of them, all native
    # and the pixels really are that many crops, each model-sized
    pixels = preprocess_views(Image.new("RGB", (1, 4000), (9, 9, 9)), cfg)
    assert pixels.shape == (len(strip), 3, S, S)
    big = Image.new("RGB", (8000, 5000), (200, 10, 10))
    assert preprocess_views(big, cfg).shape == (len(huge), 3, S, S)


def test_old_manifest_without_view_fields_loads_as_one_view(tmp_path: Path) -> None:
    path = tmp_path / "old"
    make_checkpoint(path)
    raw = json.loads((path / "manifest.json").read_text())
    for key in ("views", "aggregate", "grid"):
        raw["preprocess"].pop(key)
    raw["calibration"].pop("bias")
    raw.pop("recalibrations")
    (path / "manifest.json").write_text(json.dumps(raw))
    manifest = read_manifest(path)
    assert manifest.preprocess.views == 1 and manifest.preprocess.grid == 1
    assert manifest.calibration.bias == 0.0 and manifest.recalibrations == []
    engine = InferenceEngine.from_checkpoint(path, EngineConfig(dtype="float32"))
    image = _noise(120, 80, 3)
    first_view = preprocess(image, manifest.preprocess)[None]
    assert torch.equal(preprocess_views(image, engine.preprocess), first_view)
    score = engine.predict_images([image])[0].ai_score
    assert score == pytest.approx(float(engine.scores(first_view)[0][0]), abs=1e-6)


def test_serve_time_override_of_views_and_aggregation(tiny_checkpoint: Path) -> None:
    settings = WorkerSettings(
        checkpoint=tiny_checkpoint,
        bootstrap_servers="127.0.0.1:9",
        views=4,
        view_aggregation="max",
        dtype="float32",
    )
    engine = engine_from_settings(settings)
    assert engine.preprocess.views == 4 and engine.preprocess.aggregate == "max"
    assert engine.manifest.preprocess.views == 1  # the checkpoint itself is unchanged
    assert preprocess_views(_noise(200, 64, 1), engine.preprocess).shape[0] == 4
    with pytest.raises(ValueError, match="views"):
        WorkerSettings(checkpoint=tiny_checkpoint, bootstrap_servers="x:1", views=0)


def test_training_crops_are_native_and_keep_the_grid_phase() -> None:
    cfg = PreprocessConfig(image_size=S, policy="crop", grid=8)
    image = _noise(203, 157, 5)
    rng = random.Random(0)
    array = np.asarray(image)
    for _ in range(40):
        crop = np.asarray(random_crop(image, rng, AugmentConfig(crop_prob=1.0), cfg))
        assert crop.shape == (S, S, 3)
        hits = [
            (y, x)
            for y in range(0, 157 - S + 1, 8)
            for x in range(0, 203 - S + 1, 8)
            if np.array_equal(array[y : y + S, x : x + S], crop)
        ]
        assert len(hits) == 1  # a grid-aligned window of the original pixels, not resampled
