"""C2PA Content Credentials, read and validated with the official ``c2pa-python`` library.

A manifest store embedded in the image states who made it and how: the claim generator,
actions with an IPTC ``digitalSourceType`` (``trainedAlgorithmicMedia`` for generated
images), and ingredients (earlier versions, with their own manifests). The library
checks the signature and the hard binding to the pixels; a signer counts as trusted only
when its certificate chains to an anchor in the operator's PEM file. A manifest that
fails validation is reported as ``unknown``, never as evidence of anything: it may have
been copied from another image or edited by hand.

The library is told never to touch the network (no remote manifests, no OCSP). The
native call runs under a :class:`~clipguard.provenance.watchdog.Watchdog` deadline, and
is skipped outright when the bytes hold no JUMBF box (almost every upload).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import c2pa as c2pa_lib
from cryptography import x509

from clipguard.provenance import containers
from clipguard.provenance.errors import ProvenanceConfigError
from clipguard.provenance.evidence import Claim, Evidence
from clipguard.provenance.generators import generator_name
from clipguard.provenance.sourcetype import AI_CODES, claim_of, source_code
from clipguard.provenance.watchdog import Watchdog, WatchdogTimeout

log = logging.getLogger(__name__)

#: Bounded vocabulary of what became of a C2PA read (a metric label).
C2paState = Literal[
    "absent", "trusted", "valid", "invalid", "too_large", "unreadable", "timeout", "unsupported"
]
C2PA_STATES: tuple[C2paState, ...] = (
    "absent",
    "trusted",
    "valid",
    "invalid",
    "too_large",
    "unreadable",
    "timeout",
    "unsupported",
)

DEFAULT_MAX_MANIFEST_BYTES = 8 * 1024 * 1024
# Actions that do not change what the picture shows.
_NON_EDITS = {
    "c2pa.created",
    "c2pa.opened",
    "c2pa.published",
    "c2pa.transcoded",
    "c2pa.repackaged",
    "c2pa.converted",
    "c2pa.watermarked",
}


@dataclass(frozen=True)
class C2paResult:
    """The read's outcome as a bounded state, and the evidence for the verdict."""

    state: C2paState
    evidence: list[Evidence] = field(default_factory=list)


def load_trust_anchors(path: Path) -> str:
    """The PEM text of a trust-anchor file; a start-up error when unreadable or empty."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ProvenanceConfigError(
            f"c2pa_trust_anchors: cannot read {path}: {exc.strerror or exc}"
        ) from exc
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise ProvenanceConfigError(
            f"c2pa_trust_anchors: {path} holds no valid PEM certificate ({exc})"
        ) from exc
    if not certificates:
        raise ProvenanceConfigError(f"c2pa_trust_anchors: {path} holds no certificate")
    return pem.decode("ascii", "replace")


def manifest_size(data: bytes, fmt: str | None) -> int | None:
    """Bytes of the embedded manifest store where the container says (JPEG, PNG, WebP)."""
    if fmt == "jpeg":
        return sum(s.length for s in containers.jpeg_segments(data) if s.type == b"\xeb")
    if fmt == "png":
        return sum(s.length for s in containers.png_chunks(data) if s.type == b"caBX")
    if fmt == "webp":
        return sum(s.length for s in containers.riff_chunks(data) if s.type == b"C2PA")
    return None


def _actions(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    actions: list[dict[str, Any]] = []
    for assertion in manifest.get("assertions") or []:
        if not isinstance(assertion, dict):
            continue
        if str(assertion.get("label", "")).startswith("c2pa.actions"):
            data = assertion.get("data") or {}
            actions.extend(a for a in data.get("actions") or [] if isinstance(a, dict))
    return actions[:200]


def _agent(action: dict[str, Any]) -> str | None:
    agent = action.get("softwareAgent")
    if isinstance(agent, dict):
        agent = agent.get("name")
    return agent if isinstance(agent, str) else None


def _claim_generator(manifest: dict[str, Any]) -> str:
    info = manifest.get("claim_generator_info")
    if isinstance(info, list) and info and isinstance(info[0], dict):
        name, version = info[0].get("name", ""), info[0].get("version", "")
        return f"{name} {version}".strip()
    generator = manifest.get("claim_generator")
    return generator if isinstance(generator, str) else ""


def _ai_action(manifest: dict[str, Any]) -> dict[str, Any] | None:
    for action in _actions(manifest):
        if source_code(str(action.get("digitalSourceType", ""))) in AI_CODES:
            return action
    return None


def _claim(manifest: dict[str, Any]) -> tuple[Claim, str | None]:
    """What the active manifest's own actions claim, and the source type that says so."""
    actions = _actions(manifest)
    codes = [
        source_code(str(a["digitalSourceType"])) for a in actions if a.get("digitalSourceType")
    ]
    claims = {claim_of(code) for code in codes}
    if "edited" in claims or any(a.get("action") not in _NON_EDITS for a in actions):
        claim: Claim = "edited"
    elif "real" in claims:
        claim = "real"
    else:
        claim = "unknown"
    return claim, next((code for code in codes if claim_of(code) == claim), None)


def interpret(store: dict[str, Any], anchors_configured: bool) -> C2paResult:
    """Evidence from a manifest store as the library reports it (``Reader.json()``)."""
    state_name = str(store.get("validation_state", "")).lower()
    manifests = store.get("manifests") or {}
    active = manifests.get(store.get("active_manifest") or "")
    if not isinstance(active, dict):
        return C2paResult("unreadable", [_unknown("C2PA store without an active manifest")])
    signature = active.get("signature_info") or {}
    signer = " / ".join(
        str(signature[k])[:60] for k in ("issuer", "common_name") if signature.get(k)
    )
    generator_text = _claim_generator(active)
    ingredients = active.get("ingredients") or []
    facts = (
        f"signer {signer or 'unnamed'}; claim generator {generator_text or 'unnamed'}; "
        f"{len(ingredients)} ingredient(s)"
    )
    if state_name not in ("valid", "trusted"):
        failures = [
            str(s.get("code"))
            for s in store.get("validation_status") or []
            if isinstance(s, dict) and s.get("code")
        ][:4]
        detail = f"validation invalid ({', '.join(failures) or 'no code'}); {facts}"
        return C2paResult("invalid", [_unknown(detail)])
    trusted = state_name == "trusted" and anchors_configured
    state: C2paState = "trusted" if trusted else "valid"
    validation = "valid, signer trusted" if trusted else "valid, signer not trusted"

    ai = _ai_action(active)
    if ai is not None:
        code = source_code(str(ai.get("digitalSourceType")))
        generator = generator_name(_agent(ai) or generator_text)
        detail = f"{validation}; {code} ({ai.get('action')}); {facts}"
        return C2paResult(state, [_evidence("ai_generated", generator, trusted, detail)])
    for label, manifest in list(manifests.items())[:50]:
        if label == store.get("active_manifest") or not isinstance(manifest, dict):
            continue
        ai = _ai_action(manifest)
        if ai is not None:
            code = source_code(str(ai.get("digitalSourceType")))
            generator = generator_name(_agent(ai) or _claim_generator(manifest))
            detail = f"{validation}; an ingredient is {code}; {facts}"
            return C2paResult(state, [_evidence("ai_generated", generator, trusted, detail)])
    claim, code = _claim(active)
    detail = f"{validation}; {code or 'no source type'}; {facts}"
    return C2paResult(state, [_evidence(claim, None, trusted, detail)])


def _evidence(claim: Claim, generator: str | None, trusted: bool, detail: str) -> Evidence:
    return Evidence(kind="c2pa", claim=claim, generator=generator, trusted=trusted, detail=detail)


def _unknown(detail: str) -> Evidence:
    return Evidence(kind="c2pa", claim="unknown", trusted=False, detail=detail)


class C2paVerifier:
    """Reads and validates manifests with one library context (settings and trust anchors).

    Thread-safe: the context is shared read-only, each read has its own Reader.
    """

    def __init__(
        self,
        trust_anchors_pem: str | None = None,
        *,
        timeout_s: float = 0.5,
        max_manifest_bytes: int = DEFAULT_MAX_MANIFEST_BYTES,
        watchdog: Watchdog | None = None,
    ) -> None:
        settings: dict[str, Any] = {
            "verify": {
                "verify_after_reading": True,
                "verify_trust": True,
                "remote_manifest_fetch": False,
                "ocsp_fetch": False,
            },
            "core": {"allowed_network_hosts": []},
        }
        if trust_anchors_pem:
            settings["trust"] = {"trust_anchors": trust_anchors_pem}
        try:
            self._context = c2pa_lib.Context.from_dict(settings)
        except c2pa_lib.C2paError as exc:
            message = f"c2pa_trust_anchors: rejected by the C2PA library: {exc}"
            raise ProvenanceConfigError(message) from exc
        self._anchors = bool(trust_anchors_pem)
        self._timeout_s = timeout_s
        self._max_manifest_bytes = max_manifest_bytes
        self._watchdog = watchdog or Watchdog()

    @property
    def watchdog(self) -> Watchdog:
        return self._watchdog

    def _store(self, data: bytes, mime: str) -> dict[str, Any] | None:
        reader = c2pa_lib.Reader.try_create(mime, io.BytesIO(data), context=self._context)
        if reader is None:
            return None
        with reader:
            return json.loads(reader.json())

    def inspect(self, data: bytes) -> C2paResult:
        """Read, validate and interpret the image's manifest store; never raises."""
        try:
            if b"jumb" not in data:  # every embedded manifest store is a JUMBF box
                return C2paResult("absent")
            fmt = containers.sniff(data)
            size = manifest_size(data, fmt)
            if size is not None and size > self._max_manifest_bytes:
                detail = f"manifest of {size} bytes exceeds the {self._max_manifest_bytes}-byte cap"
                return C2paResult("too_large", [_unknown(f"{detail}; not read")])
            mime = containers.MIME_TYPES.get(fmt or "")
            if mime is None or fmt == "bmp":
                return C2paResult("unsupported")
            store = self._watchdog.run(lambda: self._store(data, mime), self._timeout_s)
            if store is None:
                return C2paResult("absent")
            return interpret(store, self._anchors)
        except WatchdogTimeout as exc:
            return C2paResult("timeout", [_unknown(f"C2PA read stopped: {exc}")])
        except c2pa_lib.C2paError as exc:
            reason = str(exc).split("\n", 1)[0][:160]
            return C2paResult("unreadable", [_unknown(f"C2PA manifest unreadable: {reason}")])
        except Exception as exc:  # a reader must never fail the event
            log.debug("c2pa reader failed", exc_info=True)
            return C2paResult("unreadable", [_unknown(f"C2PA unreadable: {type(exc).__name__}")])

    def close(self) -> None:
        self._watchdog.close()


def read(data: bytes, verifier: C2paVerifier) -> list[Evidence]:
    """C2PA evidence for the image; never raises."""
    return verifier.inspect(data).evidence
