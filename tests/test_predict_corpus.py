"""Pillow's own hostile test corpus through ``clipguard predict``: a line per file, typed
errors, no crash, no hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CORPUS

KNOWN_ERRORS = {
    "EmptyImageError",
    "ImageTooLargeError",
    "DecompressionBombError",
    "UnsupportedFormatError",
    "CorruptImageError",
}


def _predict(checkpoint: Path, *paths: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "clipguard.cli",
            "predict",
            "--checkpoint",
            str(checkpoint),
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.skipif(not CORPUS.is_dir(), reason="shared/corpus is not beside this checkout")
def test_every_corpus_file_predicts_or_reports_a_typed_error(tiny_checkpoint: Path) -> None:
    files = sorted(p for p in CORPUS.rglob("*") if p.is_file())
    assert len(files) > 500
    # The whole corpus takes a few seconds; the timeout (a few hundred ms per file) is what
    # turns a hang into a failure.
    result = _predict(tiny_checkpoint, CORPUS, timeout=0.25 * len(files) + 60)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == [str(p) for p in files]
    predicted = [line for line in lines if "error" not in line]
    failed = [line for line in lines if "error" in line]
    assert predicted and failed
    assert result.returncode == 1  # some files could not be judged
    for line in predicted:
        assert line["label"] in ("real", "ai_generated")
        assert line["decision"] in ("allow", "review", "block")
    for line in failed:
        assert line["error"]["class"] in KNOWN_ERRORS, line
        assert line["error"]["stage"] == "decode" and line["error"]["reason"]


def test_predict_exit_codes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from conftest import image_bytes

    good = tmp_path / "good.png"
    good.write_bytes(image_bytes())
    ok = _predict(tiny_checkpoint, good, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["path"] == str(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    mixed = _predict(tiny_checkpoint, good, bad, timeout=120)
    assert mixed.returncode == 1
    assert [
        json.loads(line).get("error", {}).get("class") for line in mixed.stdout.splitlines()
    ] == [
        None,
        "UnsupportedFormatError",
    ]
    missing = _predict(tmp_path / "no-checkpoint", good, timeout=120)
    assert missing.returncode == 2 and "checkpoint" in missing.stderr
