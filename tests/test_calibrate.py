"""``clipguard calibrate``: real-only and labelled re-calibration, same weights, lineage, and
the worker serving the new threshold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import image_bytes, make_checkpoint

from clipguard.cli.main import main
from clipguard.detector import EngineConfig, InferenceEngine, read_manifest
from clipguard.training import zoo
from clipguard.training.data import LabelledImage
from clipguard.training.evaluate import score_items
from clipguard.training.recalibrate import min_real_images


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cal") / "parent"
    make_checkpoint(path, seed=3, classes=list(zoo.SOURCES))
    return path


@pytest.fixture(scope="module")
def reals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 reals: half to calibrate on, half held out (fresh scenes)."""
    root = tmp_path_factory.mktemp("reals")
    return zoo.write_tree(
        root, 400, size=64, seed=11, sources=("real",), splits={"train": 0.5, "test": 0.5}
    )


def _calibrate(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["calibrate", *args]) == 0
    captured = capsys.readouterr()
    assert "before" in captured.err and "after" in captured.err  # the table, for humans
    return json.loads(captured.out)


def test_real_only_meets_the_target_on_held_out_reals_within_its_interval(
    checkpoint: Path, reals: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "calibrated"
    result = _calibrate(
        capsys,
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(reals / "train" / "real"),
        "--all-real",
        "--target-fpr",
        "0.05",
        "--out",
        str(out),
    )
    report = result["report"]
    assert report["method"] == "real-only" and report["after"]["n_real"] == 200
    low, high = report["expected_flag_rate"]["95ci"]
    assert low <= 0.05 <= high
    parent, child = read_manifest(checkpoint), read_manifest(out)
    assert child.sha256 == parent.sha256 == result["sha256"]  # weights bit-identical
    assert child.calibration.temperature == parent.calibration.temperature  # nothing to fit
    assert child.policy.review_at == child.calibration.threshold == result["policy"]["review_at"]
    record = child.recalibrations[-1]
    assert record.parent_version == parent.version and record.method == "real-only"
    assert record.data["n_real"] == 200 and record.data["files_sha256"]
    assert child.version.startswith(parent.version + "+cal")
    # held out: the other 200 reals, scored by the engine serving the new checkpoint
    engine = InferenceEngine.from_checkpoint(out, EngineConfig(dtype="float32"))
    paths = sorted((reals / "test" / "real").glob("*.png"))
    held_out = score_items(engine, [LabelledImage(source=0, path=p) for p in paths])
    assert len(held_out.items) == 200
    fpr = float((held_out.ai_scores.numpy() >= engine.threshold).mean())
    assert low <= fpr <= high


def test_labelled_threshold_follows_the_target_and_refits_temperature_and_bias(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = zoo.write_tree(tmp_path / "data", 100, size=64, seed=12, splits={"test": 1.0})
    thresholds = {}
    for target in ("0.05", "0.3"):
        out = tmp_path / f"cal-{target}"
        result = _calibrate(
            capsys,
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(data),
            "--target-fpr",
            target,
            "--min-real-images",
            "100",
            "--out",
            str(out),
        )
        report = result["report"]
        assert report["method"] == "labelled" and report["after"]["n_fake"] == 400
        assert report["after"]["fpr"] <= float(target)
        assert report["before"]["threshold"] == 0.5  # the parent's
        assert report["after"]["auc"] == pytest.approx(report["before"]["auc"])  # same ranking
        assert report["after"]["nll"] <= report["before"]["nll"] + 1e-9
        manifest = read_manifest(out)
        assert manifest.sha256 == read_manifest(checkpoint).sha256
        assert (manifest.calibration.temperature, manifest.calibration.bias) != (1.0, 0.0)
        thresholds[target] = manifest.calibration.threshold
    assert thresholds["0.05"] > thresholds["0.3"]  # a stricter FPR, a higher threshold


def test_too_few_reals_is_an_error_naming_the_flags(
    checkpoint: Path, reals: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert min_real_images(0.01) == 500
    code = main(
        [
            "calibrate",
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(reals / "train" / "real"),
            "--all-real",
            "--target-fpr",
            "0.01",
            "--out",
            str(tmp_path / "never"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "200 real images given, 500 needed" in err and "--target-fpr" in err
    assert not (tmp_path / "never").exists()


@pytest.mark.broker
def test_the_worker_serving_the_new_checkpoint_reports_its_policy(
    kafka_bootstrap: str,
    checkpoint: Path,
    reals: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from streams import fresh_topics, produce, read_outputs, running_worker, worker_settings

    from clipguard.cli.produce import upload_event

    out = tmp_path / "served"
    _calibrate(
        capsys,
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(reals / "train" / "real"),
        "--all-real",
        "--target-fpr",
        "0.1",
        "--out",
        str(out),
    )
    policy = read_manifest(out).policy
    assert policy.review_at != 0.5
    topics = fresh_topics(kafka_bootstrap, partitions=1)
    events = [
        (f"cal-{i}".encode(), upload_event(image_bytes(color=(i * 40, 90, 200)), f"cal-{i}"))
        for i in range(3)
    ]
    with running_worker(worker_settings(kafka_bootstrap, out, topics)):
        placed = produce(kafka_bootstrap, topics.input, events)
        verdicts = read_outputs(kafka_bootstrap, topics, set(placed)).verdicts
    assert len(verdicts) == 3
    for verdict in verdicts:
        assert (verdict.policy.review_at, verdict.policy.block_at) == (
            policy.review_at,
            policy.block_at,
        )
        assert verdict.model.version == read_manifest(out).version
