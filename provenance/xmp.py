"""IPTC digital source type and creator tool from XMP.

Generators and editors that follow the IPTC guidance write
``Iptc4xmpExt:DigitalSourceType`` (``trainedAlgorithmicMedia`` for generated images) into
the XMP packet, often with ``xmp:CreatorTool`` or the 2025 ``Iptc4xmpExt:AISystemUsed``.
The packet is found in the container (JPEG APP1, PNG iTXt, WebP ``XMP `` chunk, elsewhere
by a bounded scan) and parsed with defusedxml: no DTD, no entity expansion, no external
entities, and a size cap before the parser sees a byte.
"""

from __future__ import annotations

import logging
from xml.etree.ElementTree import Element

from defusedxml import ElementTree as SafeET

from clipguard.provenance import containers
from clipguard.provenance.evidence import Evidence
from clipguard.provenance.generators import generator_name, identify
from clipguard.provenance.sourcetype import claim_of, source_code

log = logging.getLogger(__name__)

MAX_XMP_BYTES = 256 * 1024
MAX_ELEMENTS = 20_000
_SCAN_BYTES = 64 * 1024 * 1024
_JPEG_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"
_PNG_KEY = "XML:com.adobe.xmp"

_IPTC_EXT = "{http://iptc.org/std/Iptc4xmpExt/2008-02-29/}"
_XMP = "{http://ns.adobe.com/xap/1.0/}"
_RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
_WANTED = {
    f"{_IPTC_EXT}DigitalSourceType": "DigitalSourceType",
    f"{_IPTC_EXT}AISystemUsed": "AISystemUsed",
    f"{_XMP}CreatorTool": "CreatorTool",
}


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(f"XMP packet of {size} bytes exceeds the {MAX_XMP_BYTES}-byte cap")


def _scan(data: bytes) -> bytes | None:
    """A packet anywhere in the data: from ``<x:xmpmeta`` to its end tag (GIF, TIFF, ...)."""
    start = data.find(b"<x:xmpmeta", 0, _SCAN_BYTES)
    if start < 0:
        return None
    end = data.find(b"</x:xmpmeta>", start, start + MAX_XMP_BYTES + 64)
    if end < 0:
        more = data.find(b"</x:xmpmeta>", start, _SCAN_BYTES)
        if more >= 0:
            raise _TooLarge(more - start)
        return None
    return data[start : end + len(b"</x:xmpmeta>")]


def find_packet(data: bytes) -> bytes | None:
    """The raw XMP packet of the image, at most :data:`MAX_XMP_BYTES`; raises if larger."""
    fmt = containers.sniff(data)
    if fmt == "jpeg":
        for span in containers.jpeg_segments(data):
            if span.type == b"\xe1" and data.startswith(_JPEG_PREFIX, span.start):
                size = span.length - len(_JPEG_PREFIX)
                if size > MAX_XMP_BYTES:
                    raise _TooLarge(size)
                return data[span.start + len(_JPEG_PREFIX) : span.start + span.length]
        return None
    if fmt == "png":
        for span in containers.png_chunks(data):
            if span.type == b"iTXt" and data.startswith(_PNG_KEY.encode() + b"\x00", span.start):
                text = containers.png_text(
                    span.type, containers.payload(data, span, MAX_XMP_BYTES + 512), MAX_XMP_BYTES
                )
                if text is None:
                    return None
                if text.truncated:
                    raise _TooLarge(span.length)
                return text.text.encode("utf-8")
        return None
    if fmt == "webp":
        for span in containers.riff_chunks(data):
            if span.type == b"XMP ":
                if span.length > MAX_XMP_BYTES:
                    raise _TooLarge(span.length)
                return containers.payload(data, span, MAX_XMP_BYTES)
        return None
    return _scan(data)


def _value(element: Element) -> str:
    """Text of a simple property, its rdf:resource, or the first rdf:li of an Alt/Seq/Bag."""
    resource = element.get(f"{_RDF}resource")
    if resource:
        return resource
    text = (element.text or "").strip()
    if text:
        return text
    for child in element.iter(f"{_RDF}li"):
        if child.text and child.text.strip():
            return child.text.strip()
    return ""


def properties(packet: bytes) -> dict[str, str]:
    """DigitalSourceType, AISystemUsed and CreatorTool from a packet (first value of each)."""
    # Writers pad packets with NULs, and GIF appends a "magic trailer": parse up to the end tag.
    end = packet.rfind(b"</x:xmpmeta>")
    packet = packet[: end + len(b"</x:xmpmeta>")] if end >= 0 else packet.rstrip(b"\x00 \t\r\n")
    root = SafeET.fromstring(packet, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    found: dict[str, str] = {}
    for count, element in enumerate(root.iter()):
        if count >= MAX_ELEMENTS or len(found) == len(_WANTED):
            break
        for attribute, value in element.attrib.items():
            name = _WANTED.get(attribute)
            if name and value.strip():
                found.setdefault(name, value.strip()[:512])
        name = _WANTED.get(element.tag) if isinstance(element.tag, str) else None
        if name:
            value = _value(element)
            if value:
                found.setdefault(name, value[:512])
    return found


def evidence_from(props: dict[str, str]) -> list[Evidence]:
    """IPTC source type as ``iptc`` evidence; a generator named as creator tool as metadata."""
    tool = props.get("AISystemUsed") or props.get("CreatorTool")
    stated = ", ".join(f"{k}={v[:80]}" for k, v in props.items())
    out: list[Evidence] = []
    source_type = props.get("DigitalSourceType")
    claim = claim_of(source_type) if source_type else None
    if source_type:
        out.append(
            Evidence(
                kind="iptc",
                claim=claim,
                generator=generator_name(tool) if claim == "ai_generated" else None,
                detail=f"XMP DigitalSourceType {source_code(source_type)}; {stated}",
            )
        )
    named = identify(tool)
    if named and claim != "ai_generated":
        out.append(
            Evidence(
                kind="generator_metadata",
                claim="ai_generated",
                generator=named,
                detail=f"XMP names a generator: {stated}",
            )
        )
    return out


def read(data: bytes) -> list[Evidence]:
    """Evidence from the image's XMP packet; never raises."""
    try:
        packet = find_packet(data)
        return evidence_from(properties(packet)) if packet else []
    except _TooLarge as exc:
        return [Evidence(kind="iptc", claim="unknown", detail=f"{exc}; not read")]
    except Exception as exc:  # DTD/entities forbidden, malformed XML, anything else
        log.debug("xmp reader failed", exc_info=True)
        return [
            Evidence(kind="iptc", claim="unknown", detail=f"XMP unreadable: {type(exc).__name__}")
        ]
