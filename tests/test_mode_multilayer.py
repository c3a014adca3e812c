"""``--mode multilayer`` (RINE): a head over every block's CLS token of a frozen encoder, trained
on cached tokens, carried by the checkpoint and used by the engine, the export and training
alike."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipguard.detector import EngineConfig, InferenceEngine, load_checkpoint, read_manifest
from clipguard.detector.backbones import BackboneSpec, build_encoder
from clipguard.detector.checkpoint import (
    HEAD_PREFIXES,
    MANIFEST_FILE,
    new_detector,
    save_checkpoint,
)
from clipguard.detector.multilayer import block_cls_tokens
from clipguard.training import modes, zoo
from clipguard.training.evaluate import score_items
from clipguard.training.loop import TrainConfig
from clipguard.training.recipes import TrainedCheckpoint, train_synthetic, zoo_items

CLASSES = list(zoo.SOURCES)
N_TRAIN, N_VAL, N_TEST = 400, 100, 200

pytestmark = pytest.mark.timeout(900)


@dataclass
class Pair:
    linear: TrainedCheckpoint
    multilayer: TrainedCheckpoint
    cache: Path


def _run(out: Path, mode: str, cache: Path) -> TrainedCheckpoint:
    # Same data, seed, epochs and step size for both modes: only the head differs. Epochs
    # over cached encodings cost milliseconds, so 30 of them fit in a second.
    config = TrainConfig(
        epochs=30,
        batch_size=32,
        lr=3e-3,
        schedule="cosine",
        progress=False,
        mode=mode,
        feature_cache=cache,
    )
    trained = train_synthetic(out, n_train=N_TRAIN, n_val=N_VAL, n_test=N_TEST, config=config)
    assert trained is not None
    return trained


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    root = tmp_path_factory.mktemp("multilayer")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cache = root / "cache"
        return Pair(
            _run(root / "linear", "linear", cache), _run(root / "ml", "multilayer", cache), cache
        )
    finally:
        torch.set_num_threads(threads)


def _served(path: Path) -> tuple[InferenceEngine, torch.Tensor, torch.Tensor]:
    engine = InferenceEngine.from_checkpoint(path, EngineConfig(dtype="float32", threads=1))
    scored = score_items(engine, zoo_items(N_TEST, size=64, seed=2, classes=CLASSES))
    return engine, scored.ai_scores, scored.source_probs


def test_block_tokens_are_the_towers_own_cls_tokens() -> None:
    torch.manual_seed(0)
    encoder = build_encoder(BackboneSpec()).module.eval()
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        tokens = block_cls_tokens(encoder, pixels)
        final = encoder(pixels)
    blocks = encoder.transformer.resblocks
    assert tokens.shape == (3, len(blocks), encoder.transformer.width)
    # The last block's token, through ln_post (applied) and proj (not), is the tower's output.
    assert torch.allclose(tokens[:, -1] @ encoder.proj, final, atol=1e-5)
    # Earlier blocks differ from the last: the head sees more than the final features.
    assert not torch.allclose(tokens[:, 0], tokens[:, -1], atol=1e-2)


def test_multilayer_learns_the_zoo_at_least_as_well_as_linear(pair: Pair) -> None:
    linear = pair.linear.manifest.metrics["test"]
    multilayer = pair.multilayer.manifest.metrics["test"]
    print(f"test AUC: linear {linear['auc']:.3f}, multilayer {multilayer['auc']:.3f}")
    assert multilayer["n"] == N_TEST
    assert multilayer["auc"] >= linear["auc"]
    assert multilayer["auc"] >= 0.7, multilayer
    training = pair.multilayer.manifest.training
    assert training["mode"] == "multilayer"
    assert training["feature_seconds"] is not None  # encoded once, not per epoch
    importance = training["block_importance"]
    assert len(importance) == 4 and sum(importance) == pytest.approx(1.0, abs=1e-3)
    assert max(importance) - min(importance) > 1e-3  # trained away from uniform


def test_linear_and_multilayer_caches_never_collide(pair: Pair) -> None:
    names = sorted(p.name.split("-")[0] for p in pair.cache.glob("*.safetensors"))
    assert names == ["blocks", "blocks", "features", "features"]  # train + val each
    blocks = [load_file(str(p))["features"] for p in pair.cache.glob("blocks-*.safetensors")]
    assert {tuple(t.shape[1:]) for t in blocks} == {(4, 128)}


def test_checkpoint_serves_the_scores_training_reported(pair: Pair) -> None:
    trained = pair.multilayer
    manifest = read_manifest(trained.path)
    assert manifest.multilayer is not None
    assert manifest.multilayer.blocks == 4 and manifest.multilayer.width == 128
    _, ai_scores, source_probs = _served(trained.path)
    assert trained.test_scores is not None
    assert torch.allclose(ai_scores, trained.test_scores.ai_scores, atol=1e-6)
    assert torch.allclose(source_probs, trained.test_scores.source_probs, atol=1e-6)
    threshold = manifest.calibration.threshold
    items = zoo_items(N_TEST, size=64, seed=2, classes=CLASSES)
    is_fake = torch.tensor([item.is_fake for item in items])
    accuracy = float(((ai_scores >= threshold) == is_fake).float().mean())
    assert accuracy == pytest.approx(manifest.metrics["test"]["accuracy"])


def test_engine_uses_the_block_weights_of_the_file(pair: Pair, tmp_path: Path) -> None:
    stored = load_file(str(pair.multilayer.path / "model.safetensors"))
    assert stored["block_head.importance"].shape == (4, 128)
    detector, manifest = load_checkpoint(pair.multilayer.path)
    # By hand from the per-block CLS tokens: Q1, softmax over blocks, Q2, the binary head.
    pixels = torch.rand(5, 3, 64, 64)
    with torch.no_grad():
        tokens = block_cls_tokens(detector.encoder, pixels)
        head = detector.block_head
        weights = torch.softmax(stored["block_head.importance"], dim=0)
        mixed = (head.q1(tokens) * weights).sum(dim=1)
        by_hand = detector.binary_head(head.q2(mixed)).squeeze(-1)
    engine = InferenceEngine(detector, manifest, EngineConfig(dtype="float32", threads=1))
    logits, _ = engine.logits(pixels)
    assert torch.allclose(logits, by_hand, atol=1e-5)
    # Put all the weight on the first block: the served scores follow the file.
    with torch.no_grad():
        detector.block_head.importance.zero_()
        detector.block_head.importance[0] = 20.0
    edited = tmp_path / "edited"
    save_checkpoint(detector, manifest, edited)
    _, before, _ = _served(pair.multilayer.path)
    _, after, _ = _served(edited)
    assert not torch.allclose(before, after, atol=1e-3)


def test_a_checkpoint_without_the_field_still_loads(pair: Pair, tmp_path: Path) -> None:
    """A manifest written before the multilayer head existed has no such key."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.safetensors").write_bytes((pair.linear.path / "model.safetensors").read_bytes())
    raw = json.loads((pair.linear.path / MANIFEST_FILE).read_text())
    raw.pop("multilayer")
    (old / MANIFEST_FILE).write_text(json.dumps(raw))
    detector, manifest = load_checkpoint(old)
    assert manifest.multilayer is None and detector.block_head is None
    _, served, _ = _served(old)
    assert pair.linear.test_scores is not None
    assert torch.allclose(served, pair.linear.test_scores.ai_scores, atol=1e-6)


def test_prepare_trains_only_the_head() -> None:
    detector = new_detector(build_encoder(BackboneSpec()), CLASSES)
    modes.prepare(detector, "multilayer")
    assert detector.block_head is not None
    trainable = {n for n, p in detector.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(HEAD_PREFIXES) for n in trainable)
    assert not any(p.requires_grad for p in detector.encoder.parameters())
    assert detector.binary_head.in_features == detector.block_head.spec.proj_dim


def test_onnx_export_carries_the_multilayer_head(pair: Pair, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from clipguard.cli.main import main

    out = tmp_path / "ml.onnx"
    argv = ["export", "--checkpoint", str(pair.multilayer.path), "--format", "onnx"]
    argv += ["--out", str(out), "--parity-images", "16", "--calibration-images", "8"]
    assert main(argv) == 0  # the command's own parity check against torch passed
    onnx_engine = InferenceEngine.from_checkpoint(out, EngineConfig(threads=1))
    assert onnx_engine.manifest.multilayer == pair.multilayer.manifest.multilayer
    items = zoo_items(N_TEST, size=64, seed=2, classes=CLASSES)
    served = score_items(onnx_engine, items).ai_scores
    assert pair.multilayer.test_scores is not None
    assert torch.allclose(served, pair.multilayer.test_scores.ai_scores, atol=1e-4)
