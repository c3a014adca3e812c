"""Provenance in every verdict, end to end: real events through the embedded broker and the
real worker; Content Credentials signed with the real c2pa library; a real PDQ hash list."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
from provenance_assets import ai_manifest, make_authority, photo, png_with_text, sign
from streams import fresh_topics, produce, read_outputs, running_worker, worker_settings

from clipguard.detector.decode import DecodeLimits, decode_image
from clipguard.provenance import pdq_hash

pytestmark = pytest.mark.broker

A1111 = "a cat in a hat\nSteps: 20, Sampler: Euler a, Model: sd_xl_base_1.0, Version: v1.6.0"


def _event(event_id: str, data: bytes) -> tuple[bytes, bytes]:
    value = {"event_id": event_id, "image_b64": base64.b64encode(data).decode()}
    return event_id.encode(), json.dumps(value).encode()


def test_verdicts_carry_evidence_and_who_decided(
    kafka_bootstrap: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    authority = make_authority()
    anchors = authority.write_root(tmp_path / "anchors.pem")
    listed = photo((256, 192), seed=7)
    hash_list = tmp_path / "hashes.txt"
    digest = pdq_hash(decode_image(listed, DecodeLimits()))[0].hex()
    hash_list.write_text(f"# known generated\n{digest} ai_generated midjourney\n")
    uploads = {
        "plain": photo((96, 72), seed=1),
        "a1111": png_with_text([("tEXt", "parameters", A1111)], size=(64, 48)),
        "c2pa-ai": sign(authority, photo((96, 72), seed=2), "JPEG", ai_manifest("DALL-E")),
        "listed": listed,
    }
    topics = fresh_topics(kafka_bootstrap, partitions=1)
    settings = worker_settings(
        kafka_bootstrap, tiny_checkpoint, topics, c2pa_trust_anchors=anchors, hash_list=hash_list
    )
    with running_worker(settings):
        placed = produce(kafka_bootstrap, topics.input, [_event(k, v) for k, v in uploads.items()])
        out = read_outputs(kafka_bootstrap, topics, set(placed))
    verdicts = {v.event_id: v for v in out.verdicts}
    assert set(verdicts) == set(uploads)

    plain = verdicts["plain"]
    assert plain.decided_by == "classifier" and not any(
        e.claim == "ai_generated" for e in plain.evidence
    )

    a1111 = verdicts["a1111"]  # untrusted metadata: can raise to review, never decides alone
    stated = [e for e in a1111.evidence if e.kind == "generator_metadata"]
    assert stated and stated[0].claim == "ai_generated" and not stated[0].trusted
    assert a1111.decision in ("review", "block") and a1111.decided_by == "classifier"

    signed = verdicts["c2pa-ai"]  # a trusted Content Credential says AI: it decides
    c2pa = [e for e in signed.evidence if e.kind == "c2pa"]
    assert c2pa and c2pa[0].trusted and c2pa[0].claim == "ai_generated"
    assert (signed.decision, signed.decided_by, signed.label) == (
        "block",
        "provenance",
        "ai_generated",
    )

    hit = verdicts["listed"]  # the operator's hash list decides, and names the generator
    assert (hit.decision, hit.decided_by, hit.source) == ("block", "hash_list", "midjourney")


def test_predict_prints_evidence(tiny_checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "gen.png").write_bytes(png_with_text([("tEXt", "parameters", A1111)]))
    command = [sys.executable, "-m", "clipguard.cli", "predict", "--checkpoint"]
    result = subprocess.run(
        [*command, str(tiny_checkpoint), str(tmp_path / "gen.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["decided_by"] == "classifier"
    assert any(e["kind"] == "generator_metadata" for e in line["evidence"])
