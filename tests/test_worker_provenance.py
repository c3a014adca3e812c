"""Provenance in every verdict, end to end: real events through the embedded broker and the
real worker; Content Credentials signed with the real c2pa library; a real PDQ hash list."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
from faults import Fleet, new_topics
from provenance_assets import (
    ai_manifest,
    capture_manifest,
    make_authority,
    photo,
    png_with_text,
    sign,
    xmp_packet,
)
from streams import produce, read_outputs

from clipguard.detector.decode import DecodeLimits, decode_image
from clipguard.provenance import pdq_hash

pytestmark = pytest.mark.broker

A1111 = "a cat in a hat\nSteps: 20, Sampler: Euler a, Model: sd_xl_base_1.0, Version: v1.6.0"


def _event(event_id: str, data: bytes) -> tuple[bytes, bytes]:
    value = {"event_id": event_id, "image_b64": base64.b64encode(data).decode()}
    return event_id.encode(), json.dumps(value).encode()


def _tampered(signed: bytes) -> bytes:
    """Pixels changed after signing: flip scan-data bytes just before the end of image."""
    data = bytearray(signed)
    end = data.rindex(b"\xff\xd9")
    for offset in (20, 21, 40):
        data[end - offset] ^= 0x5A
    return bytes(data)


def test_a_mixed_stream_through_serve_gets_evidence_and_who_decided(
    kafka_bootstrap: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """DESIGN.md's provenance contract through real `clipguard serve` processes."""
    authority = make_authority()
    anchors = authority.write_root(tmp_path / "anchors.pem")
    listed = photo((256, 192), seed=7)
    digest = pdq_hash(decode_image(listed, DecodeLimits()))[0].hex()
    hash_list = tmp_path / "hashes.txt"
    hash_list.write_text(f"# known generated\n{digest} ai_generated midjourney\n")
    signed_ai = sign(authority, photo((96, 72), seed=2), "JPEG", ai_manifest("DALL-E"))
    dst = "http://cv.iptc.org/newscodes/digitalsourcetype/"
    xmp = xmp_packet(f' Iptc4xmpExt:DigitalSourceType="{dst}trainedAlgorithmicMedia"/>')
    uploads = {
        "signed-ai": signed_ai,
        "signed-camera": sign(authority, photo((96, 72), seed=3), "JPEG", capture_manifest()),
        "tampered": _tampered(signed_ai),
        "unsigned-xmp": photo((96, 72), seed=4, fmt="JPEG", xmp=xmp),
        "metadata-only": png_with_text([("tEXt", "parameters", A1111)], size=(64, 48)),
        "hash-listed": listed,
        "plain": photo((96, 72), seed=1),
    }
    topics = new_topics(kafka_bootstrap, partitions=1, prefix="prov")
    with Fleet(tiny_checkpoint, kafka_bootstrap, topics, tmp_path) as fleet:
        worker = fleet.spawn("prov", c2pa_trust_anchors=anchors, hash_list=hash_list)
        worker.wait_ready()
        placed = produce(kafka_bootstrap, topics.input, [_event(k, v) for k, v in uploads.items()])
        out = read_outputs(kafka_bootstrap, topics, set(placed))  # type: ignore[arg-type]
        code, _ = worker.terminate(timeout=45)
    assert code == 0, worker.log_tail()
    verdicts = {v.event_id: v for v in out.verdicts}
    assert set(verdicts) == set(uploads)
    print("\nupload          decision  decided_by  label         source       evidence")
    for name in uploads:
        v = verdicts[name]
        found = ", ".join(
            f"{e.kind}:{e.claim}{'(trusted)' if e.trusted else ''}" for e in v.evidence
        )
        print(
            f"{name:<15} {v.decision:<9} {v.decided_by:<11} {v.label:<13} "
            f"{v.source or '-':<12} {found or '-'}"
        )

    def kinds(name: str) -> dict[str, tuple[str, bool]]:
        return {e.kind: (e.claim, e.trusted) for e in verdicts[name].evidence}

    assert kinds("signed-ai")["c2pa"] == ("ai_generated", True)
    assert (verdicts["signed-ai"].decision, verdicts["signed-ai"].decided_by) == (
        "block",
        "provenance",
    )
    assert kinds("signed-camera")["c2pa"] == ("real", True)
    assert verdicts["signed-camera"].decided_by == "provenance"
    assert verdicts["signed-camera"].decision in ("allow", "review")  # a block only drops
    assert kinds("tampered")["c2pa"] == ("unknown", False)  # invalid: never AI evidence
    assert verdicts["tampered"].decided_by == "classifier"
    assert kinds("unsigned-xmp")["iptc"] == ("ai_generated", False)
    assert verdicts["unsigned-xmp"].decision != "allow"  # untrusted AI claims raise to review
    assert verdicts["unsigned-xmp"].decided_by == "classifier"
    assert kinds("metadata-only")["generator_metadata"] == ("ai_generated", False)
    assert verdicts["metadata-only"].decision != "allow"
    hit = verdicts["hash-listed"]
    assert (hit.decision, hit.decided_by, hit.source) == ("block", "hash_list", "midjourney")
    assert verdicts["plain"].decided_by == "classifier"
    assert not any(e.claim == "ai_generated" for e in verdicts["plain"].evidence)


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
