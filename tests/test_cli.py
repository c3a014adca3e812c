"""The command line: help everywhere, settings errors as exit 2, training end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clipguard.cli.main import COMMANDS, build_parser, main
from clipguard.detector import InferenceEngine, read_manifest
from clipguard.training import zoo


def _names() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_every_subcommand_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    names = _names()
    assert {"serve", "demo", "train", "predict", "broker", "produce"} <= set(names)
    assert len(names) == len(COMMANDS)
    for name in names:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0
        assert "usage: clipguard " + name in capsys.readouterr().out


def test_serve_flags_from_the_design_exist(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--checkpoint",
        "--bootstrap-servers",
        "--input-topic",
        "--output-topic",
        "--dlq-topic",
        "--group-id",
        "--metrics-port",
        "--max-batch-size",
        "--max-batch-wait-ms",
        "--config",
    ):
        assert flag in text, flag


def test_bad_settings_exit_2_with_the_setting_named(
    capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path
) -> None:
    code = main(
        [
            "serve",
            "--checkpoint",
            str(tiny_checkpoint),
            "--bootstrap-servers",
            "x",
            "--max-batch-size",
            "0",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "bootstrap_servers" in err and "max_batch_size" in err
    assert main(["train", "--out", "x"]) == 2
    assert "--data DIR and --synthetic" in capsys.readouterr().err


def test_train_synthetic_writes_a_checkpoint_the_engine_serves(tmp_path: Path) -> None:
    out = tmp_path / "ck"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipguard.cli",
            "train",
            "--synthetic",
            "--out",
            str(out),
            "--epochs",
            "1",
            "--synthetic-images",
            "128",
            "--batch-size",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["checkpoint"] == str(out)
    manifest = read_manifest(out)
    assert manifest.classes == list(zoo.SOURCES)
    assert manifest.training["notice"].startswith("trained on clipguard's synthetic")
    assert "test" in manifest.metrics
    engine = InferenceEngine.from_checkpoint(out)
    assert len(engine.predict_images([zoo.generate(1, seed=5)[0].image])) == 1


def test_train_from_an_image_folder(tmp_path: Path) -> None:
    root = zoo.write_tree(tmp_path / "data", n_per_source=10, seed=3)
    out = tmp_path / "folder-ck.safetensors"
    code = main(
        ["train", "--data", str(root), "--out", str(out), "--epochs", "1", "--batch-size", "16"]
    )
    assert code == 0
    manifest = read_manifest(out)
    assert manifest.classes[0] == "real"
    assert set(manifest.classes) == set(zoo.SOURCES)
