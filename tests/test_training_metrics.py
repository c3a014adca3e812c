"""Metrics, calibration, LoRA and modes: small and exact, no training runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipguard.detector import BackboneSpec, build_encoder, new_detector
from clipguard.training import modes
from clipguard.training.calibrate import calibrate, fit_temperature, served_scores
from clipguard.training.lora import add_lora, has_lora, merge_lora
from clipguard.training.metrics import (
    average_precision,
    confusion_matrix,
    roc_auc,
    roc_curve,
    threshold_for_fpr,
)


def test_average_precision_matches_the_step_definition() -> None:
    # sklearn.metrics.average_precision_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.8333
    assert average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(5 / 6)
    assert average_precision([1, 1, 0], [0.9, 0.8, 0.1]) == pytest.approx(1.0)
    assert average_precision([0, 0], [0.3, 0.2]) is None
    # Ties form one threshold: precision 0.5 at full recall.
    assert average_precision([1, 0], [0.5, 0.5]) == pytest.approx(0.5)


def test_roc_auc_counts_ties_as_half() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc([1, 1], [0.5, 0.2]) is None
    rng = np.random.default_rng(0)
    labels = rng.random(400) < 0.5
    scores = rng.normal(labels * 1.0, 1.0)
    pairs = (scores[labels][:, None] > scores[~labels][None, :]).mean()
    assert roc_auc(labels, scores) == pytest.approx(pairs)
    fpr, tpr = roc_curve(labels, scores)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)


def test_confusion_matrix_rows_are_truth() -> None:
    matrix = confusion_matrix([0, 1, 1, 2], [0, 2, 1, 2], 3)
    assert matrix.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]


def test_threshold_for_fpr_flags_at_most_the_allowed_reals() -> None:
    rng = np.random.default_rng(1)
    reals = rng.random(1000).astype(np.float32)
    for target in (0.0, 0.01, 0.05, 0.2):
        t = threshold_for_fpr(reals, target)
        assert (reals >= t).mean() <= target
        assert (reals >= t).mean() >= target - 0.0015  # and not needlessly strict
    tied = np.array([0.9, 0.9, 0.9, 0.1])
    assert (tied >= threshold_for_fpr(tied, 0.5)).sum() == 0  # ties cannot be split


def test_temperature_scaling_recovers_an_inflated_temperature() -> None:
    gen = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, generator=gen) * 2.0
    labels = torch.rand(4000, generator=gen) < torch.sigmoid(true_logits)
    t = fit_temperature(true_logits * 3.0, labels)
    assert t == pytest.approx(3.0, rel=0.15)
    assert fit_temperature(true_logits, torch.ones(4000, dtype=torch.bool)) == 1.0


def test_calibrate_sets_threshold_policy_and_meets_the_target() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.cat([torch.randn(500, generator=gen) - 2, torch.randn(500, generator=gen) + 2])
    is_fake = torch.cat([torch.zeros(500), torch.ones(500)])
    result = calibrate(logits, is_fake, target_fpr=0.01)
    cal, policy = result.calibration, result.policy
    assert cal.target_fpr == 0.01 and policy.review_at == cal.threshold
    assert policy.block_at >= policy.review_at
    reals = served_scores(logits[:500], cal.temperature, cal.bias)
    assert float((reals >= cal.threshold).float().mean()) <= 0.01
    assert result.info["val_fpr"] <= 0.01
    plain = calibrate(logits, is_fake, target_fpr=None)
    assert plain.calibration.threshold == 0.5 and plain.policy.block_at == 0.9


def _tiny_detector(seed: int = 0):
    torch.manual_seed(seed)
    return new_detector(build_encoder(BackboneSpec()), ["real", "a", "b"])


def test_lora_starts_at_the_base_model_and_merges_exactly() -> None:
    detector = _tiny_detector().eval()
    x = torch.randn(3, 3, 64, 64)
    keys = set(detector.state_dict())
    before = detector(x).binary_logit
    params = add_lora(detector.encoder, rank=4, alpha=8)
    assert has_lora(detector.encoder)
    assert torch.allclose(detector(x).binary_logit, before, atol=1e-6)  # B starts at zero
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)
    adapted = detector(x).binary_logit
    assert not torch.allclose(adapted, before, atol=1e-4)
    assert merge_lora(detector.encoder) == 8  # 4 blocks x (in_proj, out_proj)
    assert not has_lora(detector.encoder)
    assert set(detector.state_dict()) == keys  # the checkpoint layout is unchanged
    assert torch.allclose(detector(x).binary_logit, adapted, atol=1e-5)


@pytest.mark.parametrize(
    ("mode", "expect"),
    [("full", "all"), ("linear", "heads"), ("lora", "adapters"), ("last-n", "last")],
)
def test_modes_choose_the_trainable_weights(mode: str, expect: str) -> None:
    detector = _tiny_detector()
    modes.prepare(detector, mode, lora_rank=2, last_n=1)
    trainable = {n for n, p in detector.named_parameters() if p.requires_grad}
    heads = {n for n in trainable if n.startswith(("binary_head", "source_head"))}
    assert len(heads) == 4
    encoder = trainable - heads
    if expect == "all":
        assert encoder == {n for n, _ in detector.named_parameters()} - heads
    elif expect == "heads":
        assert not encoder
    elif expect == "adapters":
        assert encoder and all("lora_" in n for n in encoder)
    else:
        assert any(n.startswith("encoder.transformer.resblocks.3.") for n in encoder)
        assert not any(n.startswith("encoder.transformer.resblocks.2.") for n in encoder)
        assert {"encoder.proj", "encoder.ln_post.weight"} <= encoder
    with pytest.raises(ValueError):
        modes.prepare(_tiny_detector(), "last-n", last_n=9)
