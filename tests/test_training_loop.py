"""Training on the synthetic zoo: it learns, every mode serves the same scores it reports,
calibration meets its target, and a resumed run continues where it stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipguard.detector import EngineConfig, InferenceEngine, read_manifest
from clipguard.training import zoo
from clipguard.training.evaluate import score_items
from clipguard.training.loop import TrainConfig
from clipguard.training.recipes import TrainedCheckpoint, train_synthetic, zoo_items
from clipguard.training.state import load_state, state_dir_for

CLASSES = list(zoo.SOURCES)
N_VAL = N_TEST = 200

# Real training runs: about a minute on a quiet 2-core machine, several times that when the
# cores are shared, so these get more room than the suite's default per-test limit.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory) -> TrainedCheckpoint:
    """Full fine-tune, small: 800 images x 6 epochs (about half a minute on 2 cores)."""
    out = tmp_path_factory.mktemp("learned") / "ck"
    config = TrainConfig(epochs=6, batch_size=16, lr=5e-4, schedule="cosine", progress=False)
    # One intra-op thread: the tiny model gains little from two, and on a busy machine two
    # OpenMP threads spin against each other (several times the CPU for the same run).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trained = train_synthetic(
            out, n_train=800, n_val=N_VAL, n_test=N_TEST, config=config, target_fpr=0.05
        )
    finally:
        torch.set_num_threads(threads)
    assert trained is not None
    return trained


def _tiny_run(out: Path, mode: str, epochs: int = 1, **kwargs) -> TrainedCheckpoint:
    config = TrainConfig(
        epochs=epochs, batch_size=16, lr=1e-3, progress=False, mode=mode, lora_rank=4, **kwargs
    )
    trained = train_synthetic(
        out, n_train=64, n_val=32, n_test=40, config=config, state_dir=state_dir_for(out)
    )
    assert trained is not None
    return trained


def test_full_training_beats_chance_by_a_wide_margin(learned: TrainedCheckpoint) -> None:
    test = learned.manifest.metrics["test"]
    assert test["n"] == N_TEST
    assert test["auc"] >= 0.85, test
    assert test["accuracy"] >= 0.75, test
    assert test["source_accuracy"] >= 0.8, test
    history = learned.manifest.training["history"]
    assert len(history) == 6 and history[-1]["loss"] < history[0]["loss"]
    assert learned.manifest.training["mode"] == "full"


def _assert_engine_matches(trained: TrainedCheckpoint, n_test: int) -> None:
    # The worker's loading path, in fp32 as training scored it (dtype=auto may pick bf16 on a
    # CPU with bf16 units: agreement within 0.01, tests/test_precision.py, not bit equality).
    engine = InferenceEngine.from_checkpoint(trained.path, EngineConfig(dtype="float32"))
    items = zoo_items(n_test, size=64, seed=2, classes=CLASSES)  # train_synthetic's test set
    served = score_items(engine, items)
    assert trained.test_scores is not None
    assert torch.allclose(served.ai_scores, trained.test_scores.ai_scores, atol=1e-6)
    assert torch.allclose(served.source_probs, trained.test_scores.source_probs, atol=1e-6)
    threshold = trained.manifest.calibration.threshold
    accuracy = float(
        ((served.ai_scores >= threshold) == torch.tensor(served.is_fake)).float().mean()
    )
    assert accuracy == pytest.approx(trained.manifest.metrics["test"]["accuracy"])


def test_full_checkpoint_serves_the_scores_training_reported(learned: TrainedCheckpoint) -> None:
    _assert_engine_matches(learned, N_TEST)


@pytest.mark.parametrize("mode", ["linear", "lora", "last-n"])
def test_every_mode_checkpoint_serves_the_scores_training_reported(
    tmp_path: Path, mode: str
) -> None:
    trained = _tiny_run(tmp_path / mode, mode)
    manifest = read_manifest(tmp_path / mode)
    assert manifest.training["mode"] == mode
    if mode == "lora":
        assert manifest.training["lora"]["rank"] == 4
        assert manifest.training["lora"]["merged_weights"] == 8
        assert not any(
            "lora" in key for key in load_file(str(tmp_path / mode / "model.safetensors"))
        )
    if mode == "linear":
        assert trained.result.feature_seconds is not None
    _assert_engine_matches(trained, 40)


def test_calibration_meets_the_target_fpr_on_its_validation_set(
    learned: TrainedCheckpoint,
) -> None:
    manifest = read_manifest(learned.path)
    calibration, policy = manifest.calibration, manifest.policy
    assert calibration.target_fpr == 0.05
    assert calibration.temperature > 0
    assert policy.review_at == calibration.threshold <= policy.block_at
    engine = InferenceEngine.from_checkpoint(learned.path, EngineConfig(dtype="float32"))
    val = score_items(engine, zoo_items(N_VAL, size=64, seed=1, classes=CLASSES))
    reals = val.ai_scores[torch.tensor(~val.is_fake)]
    fpr = int((reals >= calibration.threshold).sum()) / len(reals)
    assert fpr <= 0.05
    assert fpr >= 0.05 - 1.5 / len(reals)  # hits it, not merely stays under it
    assert int((reals >= policy.block_at).sum()) / len(reals) <= 0.005
    assert manifest.metrics["val"]["real_accuracy"] == pytest.approx(1 - fpr)


def test_resume_continues_from_the_saved_epoch_exactly(tmp_path: Path) -> None:
    straight = _tiny_run(tmp_path / "straight", "full", epochs=3, schedule="constant")
    first = _tiny_run(tmp_path / "first", "full", epochs=2, schedule="constant")
    state = load_state(state_dir_for(first.path))
    assert state.epoch == 2 and len(state.info["history"]) == 2
    config = TrainConfig(epochs=3, batch_size=16, lr=1e-3, progress=False, schedule="constant")
    resumed = train_synthetic(
        tmp_path / "resumed",
        n_train=64,
        n_val=32,
        n_test=40,
        config=config,
        resume=first.path,  # the checkpoint; its train_state sits beside it
    )
    assert resumed is not None
    assert resumed.result.resumed_from_epoch == 2
    assert [h.epoch for h in resumed.result.history] == [1, 2, 3]
    assert resumed.result.history[2].loss == pytest.approx(straight.result.history[2].loss)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic seeds: bit for bit


def test_resume_refuses_a_different_run(tmp_path: Path) -> None:
    from clipguard.detector.errors import CheckpointError

    first = _tiny_run(tmp_path / "first", "full", epochs=1)
    config = TrainConfig(epochs=2, batch_size=16, lr=1e-3, progress=False, mode="linear")
    with pytest.raises(CheckpointError, match="mode"):
        train_synthetic(
            tmp_path / "other", n_train=64, n_val=32, n_test=40, config=config, resume=first.path
        )


def test_early_stopping_on_a_flat_validation_ap(tmp_path: Path) -> None:
    config = TrainConfig(epochs=6, batch_size=16, lr=1e-9, progress=False, patience=2)
    trained = train_synthetic(tmp_path / "flat", n_train=48, n_val=32, n_test=16, config=config)
    assert trained is not None
    assert trained.result.stopped_early
    assert len(trained.result.history) == 3 and trained.result.best_epoch == 1


def test_linear_features_are_cached_on_disk_and_reused(tmp_path: Path) -> None:
    cache = tmp_path / "features"
    config = TrainConfig(
        epochs=2, batch_size=16, lr=1e-3, progress=False, mode="linear", feature_cache=cache
    )
    first = train_synthetic(tmp_path / "a", n_train=48, n_val=16, n_test=16, config=config)
    files = sorted(cache.glob("features-*.safetensors"))
    assert len(files) == 2  # train and val
    stamps = [f.stat().st_mtime_ns for f in files]
    second = train_synthetic(tmp_path / "b", n_train=48, n_val=16, n_test=16, config=config)
    assert [f.stat().st_mtime_ns for f in files] == stamps  # read, not recomputed
    assert first is not None and second is not None
    assert torch.equal(first.test_scores.ai_scores, second.test_scores.ai_scores)
