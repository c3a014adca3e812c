"""Bounded walks over the metadata containers of JPEG, PNG and WebP files.

Readers look for metadata in the raw upload bytes, never trusting a length field: every
walk stops at the end of the data, after a fixed number of steps, or at the first
malformed header, and yields offsets (not copies) so a reader copies only what it caps.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from typing import NamedTuple

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: MIME types the C2PA library is told, by sniffed format.
MIME_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "tiff": "image/tiff",
    "heif": "image/heif",
    "bmp": "image/bmp",
}


class Span(NamedTuple):
    """One chunk or segment: its type and where its payload lies in the data."""

    type: bytes
    start: int
    length: int


def sniff(data: bytes) -> str | None:
    """The container format from the magic bytes (the upload's content type is never trusted)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == PNG_SIGNATURE:
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if data[4:8] == b"ftyp":
        return "heif"
    if data[:2] == b"BM":
        return "bmp"
    return None


def payload(data: bytes, span: Span, cap: int) -> bytes:
    """The first ``cap`` bytes of a span's payload."""
    return data[span.start : span.start + min(span.length, cap)]


def png_chunks(data: bytes, max_chunks: int = 10_000) -> Iterator[Span]:
    """PNG chunks up to IEND; a truncated chunk ends the walk."""
    if data[:8] != PNG_SIGNATURE:
        return
    pos, size = 8, len(data)
    for _ in range(max_chunks):
        if pos + 8 > size:
            return
        (length,) = struct.unpack_from(">I", data, pos)
        ctype = data[pos + 4 : pos + 8]
        start = pos + 8
        if length > size - start:
            return
        yield Span(ctype, start, length)
        if ctype == b"IEND":
            return
        pos = start + length + 4  # skip the CRC


def jpeg_segments(data: bytes, max_segments: int = 1_000) -> Iterator[Span]:
    """JPEG marker segments before the first scan (where all metadata lives).

    The span type is the one-byte marker (``b"\\xe1"`` for APP1, ``b"\\xfe"`` for COM).
    """
    if data[:2] != b"\xff\xd8":
        return
    pos, size = 2, len(data)
    for _ in range(max_segments):
        if pos + 2 > size or data[pos] != 0xFF:
            return
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        if marker in (0xD9, 0xDA) or pos + 4 > size:  # end of image, start of scan
            return
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2 or pos + 2 + length > size:
            return
        yield Span(bytes([marker]), pos + 4, length - 2)
        pos += 2 + length


def riff_chunks(data: bytes, max_chunks: int = 1_000) -> Iterator[Span]:
    """Chunks of a RIFF/WebP file; a truncated chunk ends the walk."""
    if data[:4] != b"RIFF" or len(data) < 12:
        return
    (riff_size,) = struct.unpack_from("<I", data, 4)
    end = min(len(data), 8 + riff_size)
    pos = 12
    for _ in range(max_chunks):
        if pos + 8 > end:
            return
        fourcc = data[pos : pos + 4]
        (length,) = struct.unpack_from("<I", data, pos + 4)
        start = pos + 8
        if length > end - start:
            return
        yield Span(fourcc, start, length)
        pos = start + length + (length & 1)


def inflate(compressed: bytes, cap: int) -> tuple[bytes, bool] | None:
    """zlib-decompress at most ``cap`` bytes (a zip bomb stops there).

    Returns the bytes and whether more were left, or None when the stream is corrupt.
    """
    try:
        inflater = zlib.decompressobj()
        out = inflater.decompress(compressed, cap)
    except zlib.error:
        return None
    return out, bool(inflater.unconsumed_tail)


class PngText(NamedTuple):
    """One decoded tEXt / zTXt / iTXt chunk."""

    key: str
    text: str
    truncated: bool


def png_text(ctype: bytes, raw: bytes, cap: int) -> PngText | None:
    """Decode a PNG text chunk's payload (``raw``); None when it is malformed.

    ``raw`` may already be cut to a cap: the text is then marked truncated.
    """
    sep = raw.find(b"\x00", 0, 80)
    if sep <= 0:
        return None
    key = raw[:sep].decode("latin-1")
    rest = raw[sep + 1 :]
    if ctype == b"tEXt":
        return PngText(key, rest[:cap].decode("latin-1"), len(rest) > cap)
    if ctype == b"zTXt":
        if not rest or rest[0] != 0:
            return None
        inflated = inflate(rest[1:], cap)
        if inflated is None:
            return None
        return PngText(key, inflated[0].decode("latin-1"), inflated[1])
    if ctype == b"iTXt":
        if len(rest) < 2:
            return None
        compressed, method = rest[0], rest[1]
        parts = rest[2:].split(b"\x00", 2)
        if len(parts) != 3:
            return None
        body = parts[2]
        if compressed:
            inflated = inflate(body, cap) if method == 0 else None
            if inflated is None:
                return None
            return PngText(key, inflated[0].decode("utf-8", "replace"), inflated[1])
        return PngText(key, body[:cap].decode("utf-8", "replace"), len(body) > cap)
    return None
