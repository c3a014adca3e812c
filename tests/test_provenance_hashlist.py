"""PDQ hash lists: real corpus photos, their re-encoded and resized copies, unrelated images,
list parsing errors, and reloading on change and on request."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from conftest import CORPUS
from PIL import Image

from clipguard.detector import decode_image
from clipguard.provenance import (
    HashList,
    ProvenanceConfigError,
    ProvenanceReader,
    ProvenanceSettings,
    hashlist,
)
from clipguard.provenance.hashlist import hash_file, parse, pdq_hash

pytestmark = pytest.mark.skipif(
    not CORPUS.is_dir(), reason="shared/corpus is not beside this checkout"
)

PHOTOS = ["flower.jpg", "flower2.jpg", "hopper.jpg"]


def _reencode(data: bytes, scale: float, quality: int, fmt: str = "JPEG") -> bytes:
    image = decode_image(data)
    size = (round(image.width * scale), round(image.height * scale))
    out = io.BytesIO()
    image.resize(size, Image.Resampling.LANCZOS).save(out, fmt, quality=quality)
    return out.getvalue()


def _write_list(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


class Clock:
    """A clock the test moves by hand (no sleeps, no patching)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def listed(tmp_path: Path) -> Path:
    flower = hash_file(CORPUS / "flower.jpg")
    hopper = hash_file(CORPUS / "hopper.jpg")
    return _write_list(
        tmp_path / "hashes.txt",
        [
            "# operator list",
            f"{flower} ai_generated Midjourney v6  # reported 2026-11-20",
            "",
            f"{hopper.upper()} real",
        ],
    )


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("scale,quality", [(1.0, 60), (0.6, 85), (0.4, 50)])
def test_copies_match_within_the_threshold(name: str, scale: float, quality: int) -> None:
    original = (CORPUS / name).read_bytes()
    digest, quality_score = pdq_hash(decode_image(original))
    copy_digest, _ = pdq_hash(decode_image(_reencode(original, scale, quality)))
    distance = bin(int.from_bytes(digest, "big") ^ int.from_bytes(copy_digest, "big")).count("1")
    assert quality_score >= 50
    assert distance <= hashlist.DEFAULT_THRESHOLD, (name, scale, quality, distance)


def test_unrelated_images_do_not_match() -> None:
    digests = [pdq_hash(decode_image((CORPUS / n).read_bytes()))[0] for n in PHOTOS]
    for i, a in enumerate(digests):
        for b in digests[i + 1 :]:
            assert bin(int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).count("1") > 64


def test_reader_matches_copies_and_names_the_generator(listed: Path) -> None:
    reader = ProvenanceReader(ProvenanceSettings(hash_list=listed, readers=("hashlist",)))
    copy = _reencode((CORPUS / "flower.jpg").read_bytes(), 0.7, 70)
    [evidence] = reader.read(copy)  # no image given: the reader decodes the bytes itself
    assert (evidence.kind, evidence.claim, evidence.trusted, evidence.generator) == (
        "hash_list",
        "ai_generated",
        True,
        "midjourney",
    )
    assert "line 2" in evidence.detail
    hopper = decode_image(_reencode((CORPUS / "hopper.jpg").read_bytes(), 1.5, 90, "PNG"))
    [real] = reader.read(b"", hopper)  # the decoded image is used when given
    assert (real.claim, real.generator) == ("real", None)
    assert reader.read((CORPUS / "flower2.jpg").read_bytes()) == []
    assert reader.read(b"not an image") == []  # the decode stage reports undecodable input


def test_flat_images_are_not_matched(tmp_path: Path) -> None:
    flat = Image.new("RGB", (64, 64), (120, 120, 120))
    digest, quality = pdq_hash(flat)
    assert quality < hashlist.DEFAULT_MIN_QUALITY
    path = _write_list(tmp_path / "flat.txt", [f"{digest.hex()} ai_generated"])
    reader = ProvenanceReader(ProvenanceSettings(hash_list=path, readers=("hashlist",)))
    assert reader.read(b"", flat) == []


def test_ties_prefer_the_generated_label(tmp_path: Path) -> None:
    digest = hash_file(CORPUS / "flower.jpg")
    path = _write_list(tmp_path / "tie.txt", [f"{digest} real", f"{digest} ai_generated"])
    found = HashList(path).match(bytes.fromhex(digest))
    assert found is not None and (found.label, found.distance, found.line) == ("ai_generated", 0, 2)


@pytest.mark.parametrize(
    "line,problem",
    [
        ("abc ai_generated", "64 hex digits"),
        ("0" * 64 + " maybe", "ai_generated or real"),
        ("0" * 64, "expected"),
        ("0" * 64 + "1 real", "64 hex digits"),
        ("g" * 64 + " real", "64 hex digits"),
    ],
)
def test_bad_lines_name_the_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    path = _write_list(tmp_path / "bad.txt", ["# fine", "0" * 64 + " real", line])
    with pytest.raises(ProvenanceConfigError, match=rf"bad\.txt:3: .*{problem}"):
        ProvenanceReader(ProvenanceSettings(hash_list=path))


def test_missing_list_is_a_startup_error(tmp_path: Path) -> None:
    with pytest.raises(ProvenanceConfigError, match="hash_list: cannot read"):
        ProvenanceReader(ProvenanceSettings(hash_list=tmp_path / "none.txt"))


def test_reload_on_change_and_on_request(tmp_path: Path) -> None:
    flower = hash_file(CORPUS / "flower.jpg")
    path = _write_list(tmp_path / "list.txt", [])
    clock = Clock()
    hashes = HashList(path, clock=clock, check_interval_s=1.0)
    query = bytes.fromhex(flower)
    assert len(hashes) == 0 and hashes.match(query) is None

    _write_list(path, [f"{flower} ai_generated"])
    os.utime(path, ns=(1, 10**18))  # a distinct mtime even on coarse clocks
    hashes.maybe_reload()
    assert len(hashes) == 0  # not yet: checked at most once an interval
    clock.now = 1.5
    hashes.maybe_reload()
    assert len(hashes) == 1 and hashes.match(query) is not None

    _write_list(path, [f"{flower} ai_generated", "broken line"])
    os.utime(path, ns=(1, 2 * 10**18))
    clock.now = 3.0
    hashes.maybe_reload()  # logged, never raised; the old list stays in force
    assert len(hashes) == 1
    with pytest.raises(ProvenanceConfigError, match=r"list\.txt:2"):
        hashes.reload()
    assert len(hashes) == 1

    _write_list(path, [f"{flower} real", f"{'0' * 64} ai_generated"])
    assert hashes.reload() == 2  # what the worker calls on SIGHUP
    assert hashes.match(query).label == "real"


def test_parse_accepts_comments_and_case() -> None:
    hashes, labels, generators, lines = parse(
        "# c\n\n" + "A" * 64 + " real\n" + "b" * 64 + " ai_generated DALL-E  # x\n", "mem"
    )
    assert hashes.shape == (2, 4) and labels == ["real", "ai_generated"]
    assert generators == [None, "dall_e"] and lines == [3, 4]


def test_command_prints_list_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        hashlist.main(
            ["--label", "ai_generated", "--generator", "DALL-E 3", str(CORPUS / "flower.jpg")]
        )
        == 0
    )
    printed = capsys.readouterr().out
    _hashes, labels, generators, _lines = parse(printed, "stdout")
    assert labels == ["ai_generated"] and generators == ["dall_e"]
    assert hashlist.main(["--label", "real", str(tmp_path / "missing.jpg")]) == 1
