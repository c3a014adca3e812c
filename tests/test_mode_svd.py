"""``--mode svd`` (Effort): attention projections split into a frozen principal part and a trained
SVD residual, regularised as the paper says, merged back before saving."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.nn.utils import parametrize

from clipguard.cli.main import main
from clipguard.detector import EngineConfig, InferenceEngine, read_manifest
from clipguard.detector.backbones import BackboneSpec, build_encoder
from clipguard.detector.checkpoint import new_detector
from clipguard.detector.heads import Detector
from clipguard.training import modes, svd, zoo
from clipguard.training.evaluate import score_items
from clipguard.training.loop import TrainConfig, detector_loss
from clipguard.training.recipes import TrainedCheckpoint, train_synthetic, zoo_items
from clipguard.training.state import frozen_fingerprint, trainable_state

CLASSES = list(zoo.SOURCES)
N_TRAIN, N_VAL, N_TEST = 400, 100, 200
RANK = 64  # of the tiny model's 128 directions: a 64-dim residual per weight

pytestmark = pytest.mark.timeout(900)


def _prepared(rank: int | None = RANK) -> tuple[Detector, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    detector = new_detector(build_encoder(BackboneSpec()), CLASSES)
    originals = {k: v.detach().clone() for k, v in detector.state_dict().items()}
    modes.prepare(detector, "svd", svd_rank=rank)
    return detector, originals


def _residuals(detector: Detector) -> list[tuple[svd.SVDResidual, torch.Tensor, torch.Tensor]]:
    """(parametrization, original weight, rebuilt weight) of every adapted projection."""
    found = []
    for module, name in svd.attention_targets(detector.encoder):
        chain = module.parametrizations[name]
        found.append((chain[0], chain.original, getattr(module, name)))
    return found


def test_the_decomposition_is_exact_before_training() -> None:
    detector, originals = _prepared()
    found = _residuals(detector)
    assert len(found) == 8  # in_proj and out_proj of 4 blocks
    for residual, original, rebuilt in found:
        assert torch.allclose(rebuilt, original, atol=1e-6)
        # The paper's split: principal U_r S_r V_r^T plus residual, orthogonal to each other.
        principal = (residual.u_main * residual.s_main) @ residual.vh_main
        assert torch.allclose(principal + residual.residual(), original, atol=1e-5)
        assert residual.u.shape[1] == min(original.shape) - RANK
        assert (residual.u_main.T @ residual.u).abs().max() < 1e-4
        # The frozen part holds the largest singular values.
        assert residual.s_main.min() >= residual.s.max()
    assert float(svd.regulariser(detector.encoder, 1.0, 1.0).detach()) < 1e-6
    assert svd.merge_svd(detector.encoder) == 8
    merged = detector.state_dict()
    assert set(merged) == set(originals)
    for key, tensor in originals.items():
        assert torch.allclose(merged[key], tensor, atol=1e-6), key


def test_only_the_residual_and_the_heads_get_gradients() -> None:
    detector, _ = _prepared()
    residual = {id(p) for p in svd.residual_parameters(detector.encoder)}
    heads = {
        id(p) for p in (*detector.binary_head.parameters(), *detector.source_head.parameters())
    }
    out = detector(torch.rand(4, 3, 64, 64))
    loss = detector_loss(
        out.binary_logit, out.source_logits, torch.tensor([0.0, 1, 1, 0]), torch.arange(4), 1.0
    )
    (loss + svd.regulariser(detector.encoder, 1.0, 1.0)).backward()
    graded = {id(p) for p in detector.parameters() if p.grad is not None}
    assert graded == residual | heads
    for p in svd.residual_parameters(detector.encoder):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0
    for _, original, _ in _residuals(detector):
        assert original.grad is None and not original.requires_grad
    summary = modes.trainable_summary(detector)
    assert summary["trainable_parameters"] == sum(
        p.numel() for p in detector.parameters() if id(p) in residual | heads
    )


def test_a_step_moves_the_residual_and_keeps_the_principal_part() -> None:
    detector, originals = _prepared()
    before = [(r.u0.clone(), r.u_main.clone()) for r, _, _ in _residuals(detector)]
    optimizer = torch.optim.Adam([p for p in detector.parameters() if p.requires_grad], lr=1e-2)
    out = detector(torch.rand(4, 3, 64, 64))
    detector_loss(
        out.binary_logit, out.source_logits, torch.tensor([0.0, 1, 1, 0]), torch.arange(4), 1.0
    ).backward()
    optimizer.step()
    for (residual, original, rebuilt), (u0, u_main) in zip(
        _residuals(detector), before, strict=True
    ):
        assert torch.equal(residual.u0, u0) and torch.equal(residual.u_main, u_main)
        assert not torch.allclose(rebuilt, original, atol=1e-4)  # the weight did move
        principal = (residual.u_main * residual.s_main) @ residual.vh_main
        assert torch.allclose(rebuilt - residual.residual(), principal, atol=1e-5)
    assert float(svd.regulariser(detector.encoder, 1.0, 0.0).detach()) > 0
    assert float(svd.regulariser(detector.encoder, 0.0, 1.0).detach()) > 0
    svd.merge_svd(detector.encoder)
    key = "encoder.transformer.resblocks.0.attn.in_proj_weight"
    assert not torch.allclose(detector.state_dict()[key], originals[key], atol=1e-4)


def test_the_regularisers_measure_what_the_paper_names() -> None:
    detector, _ = _prepared()
    residual, original, _ = _residuals(detector)[0]
    with torch.no_grad():
        residual.s.mul_(2.0)  # same directions, more energy
        assert float(residual.orthogonality()) < 1e-6
        energy = float(residual(original).pow(2).sum() - original.pow(2).sum())
        assert float(residual.energy_drift(original)) == pytest.approx(abs(energy), rel=1e-4)
        assert energy > 0
        residual.u.add_(residual.u_main[:, :1] * 0.1)  # lean into a frozen direction
        assert float(residual.orthogonality()) > 1e-3


def test_default_rank_keeps_all_but_one_direction() -> None:
    detector, _ = _prepared(rank=None)
    for residual, original, _ in _residuals(detector):
        assert residual.rank == min(original.shape) - 1 and residual.s.numel() == 1
    # Rank-1 factors (one column of U): the resumable state still hashes and saves them.
    assert len(frozen_fingerprint(detector)) == 64
    assert all(t.is_contiguous() for t in trainable_state(detector).values())


def test_a_rank_that_does_not_fit_names_the_flag() -> None:
    detector = new_detector(build_encoder(BackboneSpec()), CLASSES)
    with pytest.raises(modes.ModeError, match="--svd-rank must be between 0 and 127"):
        modes.prepare(detector, "svd", svd_rank=128)


@dataclass
class Pair:
    linear: TrainedCheckpoint
    svd: TrainedCheckpoint


def _run(out: Path, mode: str) -> TrainedCheckpoint:
    # Same data, seed, epochs, batch and step size for both modes.
    config = TrainConfig(
        epochs=4,
        batch_size=16,
        lr=3e-3,
        schedule="cosine",
        progress=False,
        mode=mode,
        svd_rank=RANK,
    )
    trained = train_synthetic(out, n_train=N_TRAIN, n_val=N_VAL, n_test=N_TEST, config=config)
    assert trained is not None
    return trained


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    root = tmp_path_factory.mktemp("svd")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Pair(_run(root / "linear", "linear"), _run(root / "svd", "svd"))
    finally:
        torch.set_num_threads(threads)


def test_svd_learns_the_zoo_at_least_as_well_as_linear(pair: Pair) -> None:
    linear = pair.linear.manifest.metrics["test"]
    trained = pair.svd.manifest.metrics["test"]
    print(f"test AUC: linear {linear['auc']:.3f}, svd {trained['auc']:.3f}")
    assert trained["n"] == N_TEST
    assert trained["auc"] >= linear["auc"]
    assert trained["auc"] >= 0.6, trained
    training = pair.svd.manifest.training
    assert training["mode"] == "svd"
    assert training["svd"] == {"weights": 8, "frozen_rank": [RANK], "residual_rank": [64]}


def test_checkpoint_has_the_ordinary_layout_and_serves_what_training_reported(
    pair: Pair,
) -> None:
    plain = new_detector(build_encoder(BackboneSpec()), CLASSES).state_dict()
    stored = load_file(str(pair.svd.path / "model.safetensors"))
    assert set(stored) == set(plain)
    assert all(stored[k].shape == plain[k].shape for k in plain)
    assert not any(k.startswith("block_head.") for k in stored)
    assert read_manifest(pair.svd.path).multilayer is None
    engine = InferenceEngine.from_checkpoint(pair.svd.path, EngineConfig(dtype="float32"))
    assert not any(parametrize.is_parametrized(m) for m in engine.model.modules())
    served = score_items(engine, zoo_items(N_TEST, size=64, seed=2, classes=CLASSES))
    assert pair.svd.test_scores is not None
    assert torch.allclose(served.ai_scores, pair.svd.test_scores.ai_scores, atol=1e-6)
    assert torch.allclose(served.source_probs, pair.svd.test_scores.source_probs, atol=1e-6)
    threshold = engine.threshold
    accuracy = float(
        ((served.ai_scores >= threshold) == torch.tensor(served.is_fake)).float().mean()
    )
    assert accuracy == pytest.approx(pair.svd.manifest.metrics["test"]["accuracy"])


def test_the_cli_flags_reach_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["train", "--synthetic", "--mode", "svd", "--svd-rank", "120", "--epochs", "1"]
    argv += ["--svd-orth-weight", "0.5", "--synthetic-images", "64", "--threads", "1"]
    argv += ["--no-progress", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "svd"
    training = read_manifest(out).training
    assert training["svd"]["frozen_rank"] == [120]
    assert training["config"]["svd_orth_weight"] == 0.5
    assert main([*argv[:4], "--svd-rank", "999", *argv[6:]]) == 2
