"""The one preprocessing path, the batched engine, and the decision policy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from clipguard.detector import EngineConfig, InferenceEngine, Policy, PreprocessConfig
from clipguard.detector.policy import Decision
from clipguard.detector.precision import REASONS
from clipguard.detector.preprocess import fit, preprocess


def _gradient(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height))
    image.putdata([(x % 256, y % 256, (x + y) % 256) for y in range(height) for x in range(width)])
    return image


def test_resize_policy_keeps_the_centre_square() -> None:
    cfg = PreprocessConfig(image_size=32, policy="resize")
    out = fit(_gradient(128, 64), cfg)
    assert out.size == (32, 32)
    reference = _gradient(128, 64).crop((32, 0, 96, 64)).resize((32, 32), Image.Resampling.BICUBIC)
    assert out.tobytes() == reference.tobytes()


def test_crop_policy_never_resizes_large_images() -> None:
    cfg = PreprocessConfig(image_size=32, policy="crop")
    image = _gradient(100, 80)
    assert fit(image, cfg).tobytes() == image.crop((34, 24, 66, 56)).tobytes()
    assert fit(_gradient(20, 10), cfg).size == (32, 32)  # small ones are scaled up to fit


def test_extreme_aspect_ratio_stays_small() -> None:
    cfg = PreprocessConfig(image_size=64)
    tensor = preprocess(Image.new("RGB", (1, 200_000)), cfg)
    assert tensor.shape == (3, 64, 64)


def test_preprocess_normalises_with_the_config() -> None:
    cfg = PreprocessConfig(image_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    tensor = preprocess(Image.new("RGB", (8, 8), (255, 0, 255)), cfg)
    assert torch.allclose(tensor[0], torch.ones(8, 8))
    assert torch.allclose(tensor[1], -torch.ones(8, 8))


def test_batch_equals_single(tiny_checkpoint: Path) -> None:
    engine = InferenceEngine.from_checkpoint(tiny_checkpoint, EngineConfig(max_batch_size=4))
    images = [_gradient(64 + 8 * i, 64) for i in range(7)]
    batched = engine.predict_images(images)
    single = [engine.predict_images([image])[0] for image in images]
    assert len(batched) == 7
    for a, b in zip(batched, single, strict=True):
        assert a.ai_score == pytest.approx(b.ai_score, abs=1e-5)
        assert a.label == b.label
        for name in engine.classes:
            assert a.source_scores[name] == pytest.approx(b.source_scores[name], abs=1e-5)


def test_engine_picks_its_device_and_dtype_with_a_reason_and_warms_up(
    tiny_checkpoint: Path,
) -> None:
    engine = InferenceEngine.from_checkpoint(tiny_checkpoint)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert engine.device.type == expected
    assert engine.dtype_reason in REASONS
    if expected == "cpu":  # bf16 only where measured faster and in agreement with fp32
        assert (engine.dtype == torch.bfloat16) == (engine.dtype_reason == "bf16_faster")
    assert not engine.warmed_up
    engine.warm_up()
    assert engine.warmed_up
    assert engine.predict_tensors(torch.empty(0, 3, 64, 64)) == []


def test_predictions_are_consistent(tiny_checkpoint: Path) -> None:
    engine = InferenceEngine.from_checkpoint(tiny_checkpoint)
    for prediction in engine.predict_images([_gradient(70, 70), Image.new("RGB", (9, 9))]):
        assert 0.0 <= prediction.ai_score <= 1.0
        assert sum(prediction.source_scores.values()) == pytest.approx(1.0, abs=1e-4)
        if prediction.label == "ai_generated":
            assert prediction.source in engine.classes[1:]
        else:
            assert prediction.source is None


def test_policy_thresholds() -> None:
    policy = Policy(review_at=0.4, block_at=0.8)
    assert policy.decide(0.1) is Decision.ALLOW
    assert policy.decide(0.4) is Decision.REVIEW
    assert policy.decide(0.79) is Decision.REVIEW
    assert policy.decide(0.8) is Decision.BLOCK
    with pytest.raises(ValidationError, match="must not exceed"):
        Policy(review_at=0.9, block_at=0.5)
    with pytest.raises(ValidationError):
        Policy(review_at=-0.1)


class _SmallGpu(InferenceEngine):
    """An engine whose device "fits" at most two images: CUDA's OOM, reproduced on the CPU."""

    def _forward(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if chunk.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return super()._forward(chunk)


def test_out_of_memory_halves_the_batch_and_keeps_results(tiny_checkpoint: Path) -> None:
    reference = InferenceEngine.from_checkpoint(tiny_checkpoint, EngineConfig(max_batch_size=16))
    small = _SmallGpu(*_load(tiny_checkpoint), EngineConfig(max_batch_size=16))
    pixels = torch.randn(11, 3, 64, 64)
    expected, got = reference.scores(pixels), small.scores(pixels)
    assert torch.allclose(expected[0], got[0], atol=1e-5)
    assert torch.allclose(expected[1], got[1], atol=1e-5)
    assert small.oom_retries == 3  # 16 -> 8 -> 4 -> 2


def _load(path: Path):
    from clipguard.detector import load_checkpoint

    return load_checkpoint(path)
