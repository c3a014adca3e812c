"""``clipguard train``: presets, layouts, modes and settings errors through the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from clipguard.cli.main import build_parser, main
from clipguard.cli.train import load_settings
from clipguard.detector import InferenceEngine, read_manifest
from clipguard.training import zoo


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain little from a second thread; on a busy machine two spin-wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _settings(*argv: str):
    return load_settings(build_parser().parse_args(["train", *argv]))


def test_presets_fill_only_what_was_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    ufd = _settings("--data", ".", "--out", "x", "--preset", "ufd")
    assert (ufd.mode, ufd.backbone, ufd.pretrained, ufd.preprocess) == (
        "linear",
        "ViT-L-14",
        "openai",
        "crop",
    )
    assert ufd.train_config().patience == 5 and ufd.augment_config().crop_prob == 1.0
    paper = _settings("--data", ".", "--out", "x", "--preset", "paper", "--epochs", "3")
    assert (paper.mode, paper.epochs, paper.train_config().lr) == ("full", 3, 1e-5)
    assert paper.train_config().schedule == "constant"
    monkeypatch.setenv("CLIPGUARD_MODE", "lora")
    assert _settings("--data", ".", "--out", "x", "--preset", "paper").mode == "lora"


def test_bad_train_settings_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["train", "--synthetic", "--out", "x", "--target-fpr", "1.5"]) == 2
    assert "target_fpr" in capsys.readouterr().err
    assert main(["train", "--synthetic", "--out", "x", "--resume", str(tmp_path / "no")]) == 2
    assert "resume" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(tmp_path / "empty"), "--out", "x"]) == 2
    assert "--layout" in capsys.readouterr().err


def _cnndetection_tree(root: Path) -> Path:
    """A small CNNDetection tree made of zoo images: ProGAN-like fakes in train/val."""
    rng = np.random.default_rng(0)
    counts = {"train": 12, "val": 4}
    for split, n in counts.items():
        for cls in ("cat", "car"):
            for label, source in (("0_real", "real"), ("1_fake", "upconv_gan")):
                folder = root / split / cls / label
                folder.mkdir(parents=True)
                for i in range(n):
                    zoo.render(source, rng, 64).save(folder / f"{i}.png")
    for gen, source in (("progan", "upconv_gan"), ("stylegan", "nearest_gan")):
        for label, name in (("0_real", "real"), ("1_fake", source)):
            folder = root / "test" / gen / label
            folder.mkdir(parents=True)
            for i in range(6):
                zoo.render(name, rng, 64).save(folder / f"{i}.jpg", quality=95)
    return root


def test_train_lora_on_a_cnndetection_tree_with_calibration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _cnndetection_tree(tmp_path / "cnndet")
    out = tmp_path / "ck"
    code = main(
        [
            "train",
            "--data",
            str(root),
            "--out",
            str(out),
            "--mode",
            "lora",
            "--lora-rank",
            "2",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--accumulate",
            "2",
            "--blur-prob",
            "0.5",
            "--jpeg-prob",
            "0.5",
            "--crop-prob",
            "0.5",
            "--target-fpr",
            "0.1",
            "--patience",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    manifest = read_manifest(out)
    assert manifest.classes == ["real", "progan"]
    assert manifest.training["dataset"]["layout"] == "wang2020"
    assert manifest.training["lora"]["rank"] == 2
    assert manifest.calibration.target_fpr == 0.1
    assert manifest.policy.review_at == manifest.calibration.threshold
    test = report["metrics"]["test"]
    assert set(test["per_generator"]) == {"progan", "stylegan"}
    assert (out / "train_state" / "state.json").is_file()
    engine = InferenceEngine.from_checkpoint(out)
    assert engine.threshold == manifest.calibration.threshold


def test_torchrun_two_processes_on_gloo(tmp_path: Path) -> None:
    """Two CPU processes under torchrun (gloo): one report, one checkpoint, world size 2."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "clipguard.cli",
            "train",
            "--synthetic",
            "--out",
            str(out),
            "--epochs",
            "2",
            "--synthetic-images",
            "96",
            "--batch-size",
            "16",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)  # exactly one JSON document: only rank 0 prints
    assert report["world_size"] == 2 and report["epochs_run"] == 2
    manifest = read_manifest(out)
    assert manifest.training["world_size"] == 2
    engine = InferenceEngine.from_checkpoint(out)
    assert len(engine.predict_images([zoo.generate(1, seed=9)[0].image])) == 1
