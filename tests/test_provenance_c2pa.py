"""C2PA Content Credentials through the real c2pa library: signed here, read there.

Each test signs images with a throwaway root CA and signer made by ``cryptography``:
generated (``trainedAlgorithmicMedia``), camera (``digitalCapture``) and edited claims,
tampered pixels, and a signer that does or does not chain to the configured anchor.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from provenance_assets import (
    DST,
    Authority,
    ai_manifest,
    capture_manifest,
    edit_manifest,
    make_authority,
    photo,
    sign,
)

from clipguard.provenance import ProvenanceConfigError, ProvenanceReader, ProvenanceSettings
from clipguard.provenance.c2pa import C2paVerifier, load_trust_anchors
from clipguard.provenance.watchdog import Watchdog, WatchdogTimeout


@pytest.fixture(scope="module")
def authority() -> Authority:
    return make_authority("Trusted")


@pytest.fixture(scope="module")
def stranger() -> Authority:
    return make_authority("Stranger")


@pytest.fixture(scope="module")
def anchors(authority: Authority, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return authority.write_root(tmp_path_factory.mktemp("anchors") / "anchors.pem")


@pytest.fixture(scope="module")
def verifier(anchors: Path) -> C2paVerifier:
    return C2paVerifier(load_trust_anchors(anchors))


@pytest.fixture(scope="module")
def ai_jpeg(authority: Authority) -> bytes:
    return sign(authority, photo(fmt="JPEG"), "JPEG", ai_manifest("DALL-E 3"))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_trusted_generated_claim(authority: Authority, verifier: C2paVerifier, fmt: str) -> None:
    signed = sign(authority, photo(fmt=fmt), fmt, ai_manifest("DALL-E 3"))
    result = verifier.inspect(signed)
    assert result.state == "trusted"
    [evidence] = result.evidence
    assert (evidence.kind, evidence.claim, evidence.trusted) == ("c2pa", "ai_generated", True)
    assert evidence.generator == "dall_e"
    assert "trainedAlgorithmicMedia" in evidence.detail and "Trusted Signer" in evidence.detail


def test_signed_claim_without_anchors_is_valid_but_untrusted(ai_jpeg: bytes) -> None:
    result = C2paVerifier(None).inspect(ai_jpeg)
    assert result.state == "valid"
    [evidence] = result.evidence
    assert evidence.claim == "ai_generated" and not evidence.trusted
    assert "not trusted" in evidence.detail


def test_signer_that_does_not_chain_to_the_anchor(
    stranger: Authority, verifier: C2paVerifier
) -> None:
    signed = sign(stranger, photo(fmt="JPEG"), "JPEG", ai_manifest())
    result = verifier.inspect(signed)
    assert result.state == "valid"
    assert [e.trusted for e in result.evidence] == [False]
    assert result.evidence[0].claim == "ai_generated"


def test_camera_claim(authority: Authority, verifier: C2paVerifier) -> None:
    signed = sign(authority, photo(fmt="PNG"), "PNG", capture_manifest())
    result = verifier.inspect(signed)
    assert result.state == "trusted"
    [evidence] = result.evidence
    assert (evidence.claim, evidence.trusted, evidence.generator) == ("real", True, None)
    assert "digitalCapture" in evidence.detail


def test_edited_claim_with_a_camera_ingredient(
    authority: Authority, verifier: C2paVerifier
) -> None:
    camera = sign(authority, photo(fmt="JPEG", seed=1), "JPEG", capture_manifest())
    edited = sign(authority, photo(fmt="JPEG", seed=2), "JPEG", edit_manifest(), (camera, "JPEG"))
    [evidence] = verifier.inspect(edited).evidence
    assert (evidence.claim, evidence.trusted) == ("edited", True)
    assert "1 ingredient" in evidence.detail


def test_edit_of_a_generated_image_is_generated(
    authority: Authority, verifier: C2paVerifier
) -> None:
    generated = sign(authority, photo(fmt="JPEG", seed=3), "JPEG", ai_manifest("Midjourney"))
    edited = sign(
        authority, photo(fmt="JPEG", seed=4), "JPEG", edit_manifest(), (generated, "JPEG")
    )
    [evidence] = verifier.inspect(edited).evidence
    assert (evidence.claim, evidence.generator, evidence.trusted) == (
        "ai_generated",
        "midjourney",
        True,
    )
    assert "ingredient" in evidence.detail


def test_generative_fill_is_generated(authority: Authority, verifier: C2paVerifier) -> None:
    camera = sign(authority, photo(fmt="JPEG", seed=5), "JPEG", capture_manifest())
    fill = {
        "action": "c2pa.edited",
        "digitalSourceType": DST + "compositeWithTrainedAlgorithmicMedia",
        "softwareAgent": "Adobe Firefly",
    }
    edited = sign(
        authority, photo(fmt="JPEG", seed=6), "JPEG", edit_manifest(fill), (camera, "JPEG")
    )
    [evidence] = verifier.inspect(edited).evidence
    assert (evidence.claim, evidence.generator) == ("ai_generated", "firefly")


def test_pixels_altered_after_signing_fail_validation(
    ai_jpeg: bytes, verifier: C2paVerifier
) -> None:
    tampered = bytearray(ai_jpeg)
    end = tampered.rindex(b"\xff\xd9")  # end of image: the bytes before it are scan data
    for offset in (20, 21, 40):
        tampered[end - offset] ^= 0x5A
    result = verifier.inspect(bytes(tampered))
    assert result.state == "invalid"
    [evidence] = result.evidence
    assert (evidence.claim, evidence.trusted, evidence.generator) == ("unknown", False, None)
    assert "dataHash.mismatch" in evidence.detail


@pytest.mark.parametrize("cut", [0.3, 0.5, 0.9])
def test_truncated_and_mangled_manifests_never_raise(
    ai_jpeg: bytes, verifier: C2paVerifier, cut: float
) -> None:
    truncated = ai_jpeg[: int(len(ai_jpeg) * cut)]
    assert verifier.inspect(truncated).state in ("unreadable", "invalid", "absent")
    mangled = bytearray(ai_jpeg)
    start = mangled.index(b"jumb")
    for i in range(start, min(len(mangled), start + 400), 7):
        mangled[i] ^= 0xFF
    result = verifier.inspect(bytes(mangled))
    assert result.state in ("unreadable", "invalid", "absent")
    assert all(e.claim == "unknown" and not e.trusted for e in result.evidence)


def test_manifest_larger_than_the_cap(ai_jpeg: bytes, anchors: Path) -> None:
    small = C2paVerifier(load_trust_anchors(anchors), max_manifest_bytes=256)
    result = small.inspect(ai_jpeg)
    assert result.state == "too_large"
    assert result.evidence[0].claim == "unknown" and "cap" in result.evidence[0].detail


def test_no_manifest_is_absent_without_calling_the_library(verifier: C2paVerifier) -> None:
    assert verifier.inspect(photo()).state == "absent"
    assert verifier.inspect(b"").state == "absent"
    assert verifier.inspect(b"jumb" * 10).state == "unsupported"


def test_reader_reports_the_state_and_the_trust(ai_jpeg: bytes, anchors: Path) -> None:
    reader = ProvenanceReader(ProvenanceSettings(c2pa_trust_anchors=anchors))
    report = reader.inspect(ai_jpeg)
    assert report.c2pa_state == "trusted"
    assert [(e.kind, e.claim, e.trusted) for e in report.evidence] == [
        ("c2pa", "ai_generated", True)
    ]


def test_unreadable_trust_anchor_file_is_a_startup_error(tmp_path: Path) -> None:
    with pytest.raises(ProvenanceConfigError, match="c2pa_trust_anchors: cannot read"):
        ProvenanceReader(ProvenanceSettings(c2pa_trust_anchors=tmp_path / "missing.pem"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ProvenanceConfigError, match=r"no (valid PEM )?certificate"):
        ProvenanceReader(ProvenanceSettings(c2pa_trust_anchors=garbage))
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(ProvenanceConfigError, match="c2pa_trust_anchors"):
        ProvenanceReader(ProvenanceSettings(c2pa_trust_anchors=broken))


def test_watchdog_bounds_a_call_that_hangs() -> None:
    watchdog = Watchdog(workers=1)
    release = threading.Event()
    with pytest.raises(WatchdogTimeout):
        watchdog.run(release.wait, timeout_s=0.05)
    assert watchdog.overdue == 1
    started = time.monotonic()
    with pytest.raises(WatchdogTimeout, match="no free thread"):  # waits its deadline, no more
        watchdog.run(lambda: 1, timeout_s=0.2)
    assert 0.15 < time.monotonic() - started < 5
    release.set()
    deadline = time.monotonic() + 5
    while watchdog.overdue and time.monotonic() < deadline:
        time.sleep(0.01)
    assert watchdog.overdue == 0
    assert watchdog.run(lambda: 42, timeout_s=5) == 42
    with pytest.raises(ZeroDivisionError):
        watchdog.run(lambda: 1 / 0, timeout_s=5)
    watchdog.close()


def test_concurrent_reads_share_the_threads(authority: Authority, anchors: Path) -> None:
    """More callers than watchdog threads (a decode pool): each waits for a thread in turn."""
    signed = sign(authority, photo(fmt="JPEG", seed=9), "JPEG", ai_manifest())
    shared = C2paVerifier(load_trust_anchors(anchors), timeout_s=30, watchdog=Watchdog(workers=2))
    states: list[str] = []

    def work() -> None:
        for _ in range(5):
            states.append(shared.inspect(signed).state)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert states == ["trusted"] * 30
    shared.close()
