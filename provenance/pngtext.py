"""Generator text metadata: PNG tEXt/zTXt/iTXt chunks and JPEG COM segments.

Stable Diffusion front ends and node editors write their settings as PNG text chunks
(``parameters``, ``prompt``/``workflow``, ``invokeai_metadata``, ``Software: NovelAI``);
a few tools write the same text into a JPEG comment. The chunks are parsed from the bytes
here, with every count and size capped, and handed to :mod:`textmeta` to interpret.
(JPEG and WebP files from the same front ends carry the text in EXIF: see :mod:`exif`.)
"""

from __future__ import annotations

import logging

from clipguard.provenance import containers, textmeta
from clipguard.provenance.evidence import Evidence

log = logging.getLogger(__name__)

MAX_TEXT_CHUNKS = 64
MAX_TEXT_BYTES = 256 * 1024
MAX_TOTAL_TEXT_BYTES = 1024 * 1024
_TEXT_TYPES = (b"tEXt", b"zTXt", b"iTXt")
# XMP travels in an iTXt chunk too; the XMP reader handles it.
_SKIP_KEYS = ("XML:com.adobe.xmp",)


def png_items(
    data: bytes, max_chunks: int = MAX_TEXT_CHUNKS, max_bytes: int = MAX_TEXT_BYTES
) -> list[tuple[str, str]]:
    """(key, text) of the first ``max_chunks`` PNG text chunks, each cut to ``max_bytes``."""
    items: list[tuple[str, str]] = []
    total = 0
    for span in containers.png_chunks(data):
        if span.type not in _TEXT_TYPES:
            continue
        text = containers.png_text(span.type, containers.payload(data, span, max_bytes), max_bytes)
        if text is None or text.key in _SKIP_KEYS:
            continue
        items.append((text.key, text.text))
        total += len(text.text)
        if len(items) >= max_chunks or total >= MAX_TOTAL_TEXT_BYTES:
            break
    return items


def jpeg_items(data: bytes, max_bytes: int = MAX_TEXT_BYTES) -> list[tuple[str, str]]:
    """(``comment``, text) of JPEG COM segments."""
    items: list[tuple[str, str]] = []
    for span in containers.jpeg_segments(data):
        if span.type == b"\xfe":
            raw = containers.payload(data, span, max_bytes)
            items.append(("comment", raw.decode("utf-8", "replace")))
            if len(items) >= 8:
                break
    return items


def read(data: bytes) -> list[Evidence]:
    """Evidence from generator text chunks; never raises."""
    try:
        fmt = containers.sniff(data)
        if fmt == "png":
            return textmeta.analyze(png_items(data), "PNG text")
        if fmt == "jpeg":
            return textmeta.analyze(jpeg_items(data), "JPEG comment")
        return []
    except Exception as exc:  # a reader must never fail the event
        log.debug("pngtext reader failed", exc_info=True)
        return [
            Evidence(
                kind="generator_metadata",
                claim="unknown",
                detail=f"text metadata unreadable: {type(exc).__name__}",
            )
        ]
