"""``clipguard eval``: engine numbers, per-generator fields, robustness sweep, plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_checkpoint

from clipguard.cli.main import main
from clipguard.detector import InferenceEngine
from clipguard.training import zoo
from clipguard.training.evaluate import score_items
from clipguard.training.layouts import read_dataset
from clipguard.training.metrics import average_precision
from clipguard.training.robustness import PERTURBATIONS

GENERATORS = list(zoo.GENERATORS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "ck"
    make_checkpoint(path, classes=list(zoo.SOURCES))
    return path


@pytest.fixture(scope="module")
def zoo_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zoo") / "data"
    return zoo.write_tree(root, n_per_source=6, size=64, seed=4, splits={"test": 1.0})


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["eval", *args, "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "AP" in captured.err  # the table is for humans, on stderr
    return json.loads(captured.out)


def test_eval_reports_engine_numbers_per_generator(
    checkpoint: Path, zoo_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.json"
    report = _run(
        capsys, "--checkpoint", str(checkpoint), "--data", str(zoo_tree), "--json", str(out)
    )
    assert json.loads(out.read_text()) == report
    assert report["data"]["layout"] == "zoo" and report["data"]["split"] == "test"
    overall = report["overall"]
    for key in ("accuracy", "real_accuracy", "fake_accuracy", "ap", "auc", "source_accuracy"):
        assert key in overall
    assert overall["n"] == 30 and overall["n_real"] == 6 and overall["n_fake"] == 24
    assert set(overall["per_generator"]) == set(GENERATORS)
    for metrics in overall["per_generator"].values():
        assert metrics["n_fake"] == 6 and metrics["n_real"] == 6
        for key in ("accuracy", "real_accuracy", "fake_accuracy", "ap", "auc", "source_accuracy"):
            assert key in metrics
    confusion = overall["source_confusion"]
    assert confusion["classes"] == list(zoo.SOURCES)
    assert np.asarray(confusion["matrix"]).sum() == 30
    # The same numbers as the serving engine gives, item by item.
    engine = InferenceEngine.from_checkpoint(checkpoint)
    scored = score_items(engine, read_dataset(zoo_tree).splits["test"])
    predicted = scored.ai_scores.numpy() >= engine.threshold
    assert overall["accuracy"] == pytest.approx(float((predicted == scored.is_fake).mean()))
    assert overall["ap"] == pytest.approx(average_precision(scored.is_fake, scored.ai_scores))


def test_robustness_sweep_and_plots(
    checkpoint: Path, zoo_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plots = tmp_path / "plots"
    report = _run(
        capsys,
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(zoo_tree),
        "--robustness",
        "--plots",
        str(plots),
        "--batch-size",
        "16",
    )
    robustness = report["robustness"]
    names = ["clean", *(p.name for p in PERTURBATIONS)]
    assert list(robustness) == names
    assert {"jpeg_q30", "blur_sigma3", "downscale_0.5", "thumbnail_128"} <= set(names)
    for row in robustness.values():
        assert {"accuracy", "ap", "auc", "real_accuracy", "fake_accuracy"} <= set(row)
    assert robustness["clean"]["accuracy"] == report["overall"]["accuracy"]
    assert robustness["jpeg_q30"]["ap"] != robustness["clean"]["ap"]  # it did perturb
    assert sorted(Path(p).name for p in report["plots"]) == [
        "confusion.png",
        "reliability.png",
        "robustness.png",
        "roc.png",
    ]
    assert all((plots / name).stat().st_size > 1000 for name in ("roc.png", "robustness.png"))


def test_eval_on_a_wang2020_test_split_pairs_reals_per_generator(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "cnndet"
    rng = np.random.default_rng(0)
    for gen, source in (("stylegan", "nearest_gan"), ("biggan", "upconv_gan")):
        for label, name in (("0_real", "real"), ("1_fake", source)):
            folder = root / "test" / gen / label
            folder.mkdir(parents=True)
            for i in range(4):
                zoo.render(name, rng, 64).save(folder / f"{i}.png")
    report = _run(capsys, "--checkpoint", str(checkpoint), "--data", str(root))
    assert report["data"]["layout"] == "wang2020"
    per_generator = report["overall"]["per_generator"]
    assert set(per_generator) == {"stylegan", "biggan"}
    assert all(m["n_real"] == 4 and m["n_fake"] == 4 for m in per_generator.values())
    # Generators the checkpoint never learnt have no attribution, but still binary metrics.
    assert all(m["source_accuracy"] is None for m in per_generator.values())


def test_eval_synthetic_and_bad_settings(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _run(capsys, "--checkpoint", str(checkpoint), "--synthetic", "20")
    assert report["overall"]["n"] == 20
    assert main(["eval", "--checkpoint", str(checkpoint)]) == 2
    assert "--data DIR and --synthetic" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", "/nonexistent"]) == 2
    assert "data" in capsys.readouterr().err
