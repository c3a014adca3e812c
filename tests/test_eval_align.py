"""``clipguard eval --align`` on a planted shortcut: reals all PNG, fakes all JPEG (zoo
generators). A detector trained on it may use the container format as much as the
fingerprints; scoring every image re-encoded one way exposes the difference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clipguard.cli.main import main
from clipguard.training import zoo


def _planted(root: Path, per_class: int) -> Path:
    """ImageFolder tree: ``real`` (PNG) and ``jpeg_gan`` (the zoo's generators, JPEG q95)."""
    splits = {"train": per_class, "val": per_class // 4, "test": per_class // 2}
    serial = 0
    for split, count in splits.items():
        for source, fmt, ext in (("real", "PNG", ".png"), ("jpeg_gan", "JPEG", ".jpg")):
            folder = root / split / source
            folder.mkdir(parents=True)
            for index in range(count):
                rng = np.random.default_rng([21, serial])
                serial += 1
                kind = "real" if source == "real" else zoo.GENERATORS[index % len(zoo.GENERATORS)]
                options = {"quality": 95} if ext == ".jpg" else {}
                zoo.render(kind, rng, 64).save(folder / f"{index:04d}{ext}", fmt, **options)
    return root


@pytest.fixture(scope="module")
def shortcut(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("align")
    data = _planted(base / "data", 300)
    out = base / "ck"
    code = main(
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(out),
            "--epochs",
            "6",
            "--batch-size",
            "16",
            "--lr",
            "5e-4",
            "--schedule",
            "cosine",
            "--preprocess",
            "resize",
            "--jpeg-prob",
            "0",  # the format-bias guard off: this run is meant to learn the shortcut
            "--blur-prob",
            "0",
            "--flip-prob",
            "0",
            "--threads",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0
    return data, out


def test_align_shows_the_gap_and_warns_on_a_format_shortcut(
    shortcut: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, checkpoint = shortcut
    capsys.readouterr()
    code = main(
        ["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--align", "--no-progress"]
    )
    assert code == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    plain, aligned = report["overall"], report["aligned"]["overall"]
    assert plain["accuracy"] >= 0.7  # it learned something: fingerprints, format or both
    assert report["aligned"]["policy"] == {"format": "JPEG", "quality": 75, "size": 256}
    assert report["aligned"]["gap"]["accuracy"] == pytest.approx(  # rounded to 6 places
        plain["accuracy"] - aligned["accuracy"], abs=1e-6
    )
    assert report["aligned"]["gap"]["accuracy"] > 0.05
    assert report["aligned"]["warnings"] and "shortcut" in report["aligned"]["warnings"][0]
    assert "WARNING" in captured.err and "aligned" in captured.err  # side by side, on stderr
    for key in ("balanced_accuracy", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "ece", "auc", "ap"):
        assert key in plain and key in aligned
    assert plain["reliability"] and sum(b["n"] for b in plain["reliability"]) == plain["n"]


def test_align_stays_quiet_when_formats_do_not_differ(
    shortcut: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same checkpoint on a set whose reals are JPEG too: aligned == plain, no warning."""
    _, checkpoint = shortcut
    root = tmp_path / "fair"
    folder = root / "test"
    for source in ("real", "jpeg_gan"):
        (folder / source).mkdir(parents=True)
        for index in range(20):
            image = zoo.render("real", np.random.default_rng([22, index, len(source)]), 64)
            image.save(folder / source / f"{index}.jpg", "JPEG", quality=75)
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(checkpoint),
                "--data",
                str(root),
                "--align",
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["aligned"]["warnings"] == []
