"""ProvenanceReader end to end: all readers on one upload, the time budget, the caps, the
hostile Pillow corpus under a hard per-file timeout, and random bytes (hypothesis)."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CORPUS
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from provenance_assets import (
    DST,
    ai_manifest,
    make_authority,
    photo,
    png_with_text,
    sign,
    xmp_packet,
)

from clipguard.provenance import (
    MAX_DETAIL,
    MAX_EVIDENCE,
    Evidence,
    ProvenanceReader,
    ProvenanceSettings,
    hash_file,
)
from clipguard.provenance.containers import (
    PNG_SIGNATURE,
    jpeg_segments,
    png_chunks,
    png_text,
    riff_chunks,
)

A1111 = "cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Model: dreamshaper_8"


class SteppingClock:
    """Each reading moves time on by ``step`` seconds."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_all_readers_on_one_upload(tmp_path: Path) -> None:
    authority = make_authority()
    anchors = authority.write_root(tmp_path / "anchors.pem")
    xmp = xmp_packet(f' Iptc4xmpExt:DigitalSourceType="{DST}trainedAlgorithmicMedia"/>')
    exif = Image.Exif()
    exif[0x0131] = "Midjourney"
    source = photo(fmt="JPEG", xmp=xmp, exif=exif, comment=A1111.encode())
    signed = sign(authority, source, "JPEG", ai_manifest("Adobe Firefly"))
    reader = ProvenanceReader(ProvenanceSettings(c2pa_trust_anchors=anchors))
    report = reader.inspect(signed)
    assert [(e.kind, e.claim, e.trusted, e.generator) for e in report.evidence] == [
        ("c2pa", "ai_generated", True, "firefly"),
        ("iptc", "ai_generated", False, None),
        ("exif", "ai_generated", False, "midjourney"),
        ("generator_metadata", "ai_generated", False, "stable_diffusion"),
    ]
    assert report.c2pa_state == "trusted" and not report.skipped
    assert set(report.seconds) == {"c2pa", "xmp", "exif", "pngtext"}
    reader.close()


def test_plain_upload_has_no_evidence() -> None:
    reader = ProvenanceReader()
    report = reader.inspect(photo(fmt="PNG"))
    assert report.evidence == [] and report.c2pa_state == "absent"


def test_budget_skips_the_readers_not_yet_started(tmp_path: Path) -> None:
    hashes = tmp_path / "h.txt"
    hashes.write_text(f"{'0' * 64} real\n")
    settings = ProvenanceSettings(hash_list=hashes, budget_ms=3500)  # two readers fit
    reader = ProvenanceReader(settings, clock=SteppingClock(1.0))
    report = reader.inspect(png_with_text([("tEXt", "parameters", A1111)]))
    assert report.skipped == ["exif", "pngtext", "hashlist"]
    skipped = [e for e in report.evidence if "budget" in e.detail]
    assert [(e.kind, e.claim) for e in skipped] == [
        ("exif", "unknown"),
        ("generator_metadata", "unknown"),
        ("hash_list", "unknown"),
    ]


def test_caps_on_size_and_count() -> None:
    reader = ProvenanceReader(ProvenanceSettings(max_bytes=1000))
    report = reader.inspect(png_with_text([("tEXt", "parameters", A1111 * 20)]))
    assert report.evidence == [] and report.skipped == reader.readers
    many = png_with_text(
        [("tEXt", "Software", name) for name in ("NovelAI", "ComfyUI", "Midjourney", "Flux")]
    )
    assert len(ProvenanceReader().read(many)) <= MAX_EVIDENCE
    long = Evidence(kind="exif", claim="unknown", detail="x\x00\x1b[31m" * 500, generator="g" * 500)
    assert (
        len(long.detail) <= MAX_DETAIL and "\x1b" not in long.detail and len(long.generator) <= 64
    )


def test_reader_selection_and_reload(tmp_path: Path) -> None:
    assert ProvenanceReader(ProvenanceSettings(readers=("xmp", "exif"))).readers == ["xmp", "exif"]
    assert "hashlist" not in ProvenanceReader().readers  # no list configured
    assert ProvenanceReader().reload() is None
    path = tmp_path / "h.txt"
    path.write_text(f"{'0' * 64} real\n")
    reader = ProvenanceReader(ProvenanceSettings(hash_list=path))
    path.write_text(f"{'0' * 64} real\n{'1' * 64} ai_generated\n")
    assert reader.reload() == 2


# --- the hostile corpus, every file under a hard timeout ------------------------------

_CHILD = r"""
import sys
from pathlib import Path
from clipguard.detector import decode_image
from clipguard.provenance import ProvenanceReader, ProvenanceSettings
corpus, anchors, hashes = map(Path, sys.argv[1:4])
reader = ProvenanceReader(ProvenanceSettings(c2pa_trust_anchors=anchors, hash_list=hashes))
for path in sorted(p for p in corpus.rglob("*") if p.is_file()):
    print("start", path, flush=True)
    data = path.read_bytes()
    evidence = reader.read(data)
    try:
        image = decode_image(data)
    except Exception:
        image = None
    if image is not None:
        evidence += reader.read(data, image)
    print("done", len(evidence), flush=True)
print("finished", flush=True)
"""


@pytest.mark.skipif(not CORPUS.is_dir(), reason="shared/corpus is not beside this checkout")
def test_every_corpus_file_reads_without_raising_or_hanging(tmp_path: Path) -> None:
    anchors = make_authority().write_root(tmp_path / "anchors.pem")
    hashes = tmp_path / "hashes.txt"
    hashes.write_text(f"{hash_file(CORPUS / 'hopper.jpg')} ai_generated\n")
    per_file_s = 30.0  # a hang bound on a busy machine, not a speed target
    errors = (tmp_path / "stderr.txt").open("w+")  # a file: a full pipe would stall the child
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(CORPUS), str(anchors), str(hashes)],
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert child.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(child.stdout, selectors.EVENT_READ)
    current, done, finished = "(start-up)", 0, False
    try:
        while not finished:
            deadline = time.monotonic() + per_file_s
            line = ""
            while not line:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(timeout=remaining):
                    pytest.fail(f"no progress for {per_file_s} s while reading {current}")
                line = child.stdout.readline()
                if not line:
                    errors.seek(0)
                    pytest.fail(f"reader process died at {current}: {errors.read()[-3000:]}")
            kind, _, rest = line.strip().partition(" ")
            if kind == "start":
                current = rest
            elif kind == "done":
                done += 1
            finished = kind == "finished"
    finally:
        child.kill()
        child.wait()
    assert done > 500
    errors.seek(0)
    assert "Traceback" not in errors.read()


# --- random bytes: the container walkers and the whole reader -------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_png_walk_on_random_bytes(tail: bytes) -> None:
    data = PNG_SIGNATURE + tail
    for span in png_chunks(data):
        assert span.start >= 8 and span.start + span.length <= len(data)
        text = png_text(span.type, data[span.start : span.start + span.length], 1024)
        assert text is None or len(text.text) <= 1024 * 4


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_jpeg_and_riff_walks_on_random_bytes(tail: bytes) -> None:
    for data in (b"\xff\xd8" + tail, b"RIFF" + tail[:4] + b"WEBP" + tail[4:]):
        for span in (*jpeg_segments(data), *riff_chunks(data)):
            assert span.start >= 0 and span.start + span.length <= len(data)


@pytest.fixture(scope="module")
def reader() -> ProvenanceReader:
    return ProvenanceReader()


@settings(max_examples=150, deadline=None)
@given(
    prefix=st.sampled_from(
        [PNG_SIGNATURE, b"\xff\xd8\xff\xe1", b"RIFF\x00\x01\x00\x00WEBP", b"II*\x00", b""]
    ),
    body=st.binary(max_size=2048),
)
def test_reader_never_raises_on_random_bytes(
    reader: ProvenanceReader, prefix: bytes, body: bytes
) -> None:
    evidence = reader.read(prefix + body)
    assert all(isinstance(e, Evidence) for e in evidence)
