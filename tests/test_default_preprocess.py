"""The default recipe of ``clipguard train --data`` against every explicit preprocessing
choice, on generated data whose fingerprints are pixel-level (training/fingerprints.py, not
the zoo the detector was designed around), held out, tiny backbone, CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipguard.cli.main import main
from clipguard.cli.train import TrainSettings
from clipguard.training import fingerprints

COMMON = ["--epochs", "6", "--threads", "1", "--no-progress", "--seed", "0"]
CHOICES = ("resize", "crop", "both")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fingerprints") / "data"
    return fingerprints.write_tree(root, 150, seed=5, min_side=72, max_side=120)


def _contract(args: list[str], data: Path, out: Path) -> tuple[str | None, dict]:
    """What a run with these flags stores as its input contract (before training it)."""
    flags = {"data": data, "out": out}
    if args:
        flags["preprocess"] = args[1]
    settings = TrainSettings(**flags)
    return settings.policy(), settings.preprocess_update()


def _held_out_accuracy(
    args: list[str], data: Path, out: Path, capsys: pytest.CaptureFixture[str]
) -> dict:
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--out", str(out), *COMMON, *args]) == 0
    return json.loads(capsys.readouterr().out)["metrics"]["test"]


def test_the_default_recipe_matches_the_best_explicit_choice(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    default = _held_out_accuracy([], data, tmp_path / "default", capsys)
    results = {}
    for choice in CHOICES:
        args = ["--preprocess", choice]
        if _contract(args, data, tmp_path) == _contract([], data, tmp_path):
            results[choice] = default  # the same run as the default (runs are deterministic)
            continue
        results[choice] = _held_out_accuracy(args, data, tmp_path / choice, capsys)
    best = max(results, key=lambda c: results[c]["accuracy"])
    summary = {c: (round(r["accuracy"], 3), round(r["auc"], 3)) for c, r in results.items()}
    assert default["accuracy"] >= results[best]["accuracy"] - 0.02, (default["accuracy"], summary)
    # and it is a real win on this data, not a tie at chance
    assert default["accuracy"] >= results["resize"]["accuracy"] + 0.1, summary
    assert default["auc"] >= results["resize"]["auc"] + 0.1, summary
