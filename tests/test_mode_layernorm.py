"""``--mode layernorm`` (GenD): only LayerNorms and heads train, on L2-normalised features, and
the checkpoint serves what training reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from clipguard.cli.main import main
from clipguard.detector import EngineConfig, InferenceEngine, read_manifest
from clipguard.detector.backbones import BackboneSpec, build_encoder
from clipguard.detector.checkpoint import new_detector
from clipguard.training import modes, zoo
from clipguard.training.evaluate import score_items
from clipguard.training.recipes import zoo_items

pytestmark = pytest.mark.timeout(900)


def test_layernorm_mode_trains_only_layernorms_and_heads() -> None:
    detector = new_detector(build_encoder(BackboneSpec()), list(zoo.SOURCES))
    modes.prepare(detector, "layernorm")
    norms = [m for m in detector.encoder.modules() if isinstance(m, nn.LayerNorm)]
    expected = {id(p) for m in norms for p in m.parameters()}
    expected |= {id(p) for p in detector.binary_head.parameters()}
    expected |= {id(p) for p in detector.source_head.parameters()}
    trainable = [p for p in detector.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == expected
    n_norm = sum(p.numel() for m in norms for p in m.parameters())
    n_heads = sum(p.numel() for p in [*detector.binary_head.parameters()])
    n_heads += sum(p.numel() for p in detector.source_head.parameters())
    summary = modes.trainable_summary(detector)
    assert summary["trainable_parameters"] == n_norm + n_heads
    assert summary["trainable_parameters"] < summary["parameters"] / 10
    assert detector.feature_norm == "l2"
    norms_of_features = detector.features(torch.randn(3, 3, 64, 64)).norm(dim=-1)
    assert torch.allclose(norms_of_features, torch.ones(3), atol=1e-5)


def test_layernorm_run_gives_a_servable_checkpoint_with_a_held_out_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ln"
    argv = ["train", "--synthetic", "--mode", "layernorm", "--epochs", "2", "--threads", "1"]
    argv += ["--synthetic-images", "256", "--batch-size", "32", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "layernorm"
    test = report["metrics"]["test"]
    assert test["n"] == 500 and 0.0 <= test["auc"] <= 1.0
    manifest = read_manifest(out)
    assert manifest.feature_norm == "l2"
    assert manifest.training["mode"] == "layernorm"
    engine = InferenceEngine.from_checkpoint(out, EngineConfig(dtype="float32"))
    served = score_items(engine, zoo_items(500, size=64, seed=2, classes=list(zoo.SOURCES)))
    accuracy = float(
        ((served.ai_scores >= engine.threshold) == torch.tensor(served.is_fake)).float().mean()
    )
    assert accuracy == pytest.approx(test["accuracy"])
