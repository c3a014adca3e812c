"""EXIF Software, Make and Model, and the generator settings some tools put in EXIF text.

``Software`` names the program that wrote the file: a generator (``NovelAI``,
``Midjourney``) or an editor (``Adobe Photoshop``). ``Make``/``Model`` name a camera.
AUTOMATIC1111 and its forks save JPEG and WebP with their ``parameters`` text in
``UserComment``. All of it is editable by anyone, so nothing here is trusted. The EXIF
block is located in the container (JPEG APP1, PNG eXIf, WebP EXIF; TIFF is EXIF itself),
capped in size, and parsed with Pillow's EXIF reader.
"""

from __future__ import annotations

import logging
import warnings

from PIL import Image

from clipguard.provenance import containers, textmeta
from clipguard.provenance.evidence import Evidence
from clipguard.provenance.generators import identify, is_editor

log = logging.getLogger(__name__)

MAX_EXIF_BYTES = 1024 * 1024
_SOFTWARE, _MAKE, _MODEL, _DESCRIPTION, _ARTIST = 0x0131, 0x010F, 0x0110, 0x010E, 0x013B
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286


def find_block(data: bytes) -> bytes | None:
    """The raw EXIF block (TIFF structure, maybe with an ``Exif\\0\\0`` prefix), capped."""
    fmt = containers.sniff(data)
    if fmt == "jpeg":
        for span in containers.jpeg_segments(data):
            if span.type == b"\xe1" and data.startswith(b"Exif\x00\x00", span.start):
                return containers.payload(data, span, MAX_EXIF_BYTES)
        return None
    if fmt == "png":
        for span in containers.png_chunks(data):
            if span.type == b"eXIf":
                return containers.payload(data, span, MAX_EXIF_BYTES)
            if span.type == b"IDAT":
                return None  # eXIf must come before the image data
        return None
    if fmt == "webp":
        for span in containers.riff_chunks(data):
            if span.type == b"EXIF":
                return containers.payload(data, span, MAX_EXIF_BYTES)
        return None
    if fmt == "tiff":
        return data  # IFD0 of a TIFF file is its EXIF; Pillow reads only the tags it needs
    return None


def _text(value: object) -> str:
    """An ASCII tag as clean text (Pillow gives str, or bytes for odd encodings)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return ""
    return value.replace("\x00", " ").strip()[:512]


def user_comment(value: object) -> str:
    """Decode UserComment: an 8-byte charset prefix, then the text (UTF-16 for UNICODE)."""
    if isinstance(value, str):
        return value[: textmeta.MAX_JSON_CHARS]
    if not isinstance(value, bytes) or len(value) < 8:
        return ""
    prefix, body = value[:8], value[8 : 8 + 2 * textmeta.MAX_JSON_CHARS]
    if prefix.startswith(b"UNICODE"):
        # The byte order is not always the file's; pick the one whose text is plain ASCII.
        big, little = body.decode("utf-16-be", "replace"), body.decode("utf-16-le", "replace")
        return big if sum(c.isascii() for c in big) >= sum(c.isascii() for c in little) else little
    return body.decode("utf-8", "replace").replace("\x00", " ").strip()


def read(data: bytes) -> list[Evidence]:
    """Evidence from EXIF; never raises."""
    try:
        block = find_block(data)
        if not block:
            return []
        exif = Image.Exif()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "possibly corrupt EXIF data" is not our business
            exif.load(block)
            tags = {tag: _text(exif.get(tag)) for tag in (_SOFTWARE, _MAKE, _MODEL)}
            texts = [("ImageDescription", _text(exif.get(_DESCRIPTION)))]
            texts.append(("UserComment", user_comment(exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT))))
        return _evidence(tags[_SOFTWARE], tags[_MAKE], tags[_MODEL], [t for t in texts if t[1]])
    except Exception as exc:  # a reader must never fail the event
        log.debug("exif reader failed", exc_info=True)
        return [
            Evidence(kind="exif", claim="unknown", detail=f"EXIF unreadable: {type(exc).__name__}")
        ]


def _evidence(software: str, make: str, model: str, texts: list[tuple[str, str]]) -> list[Evidence]:
    stated = ", ".join(
        f"{name}={value[:80]}"
        for name, value in (("Software", software), ("Make", make), ("Model", model))
        if value
    )
    out = textmeta.analyze(texts, "EXIF")
    generator = next((g for g in map(identify, (software, make, model)) if g), None)
    if generator:
        out.append(Evidence(kind="exif", claim="ai_generated", generator=generator, detail=stated))
    elif is_editor(software):
        out.append(Evidence(kind="exif", claim="edited", detail=stated))
    elif make or model:
        out.append(Evidence(kind="exif", claim="real", detail=f"camera: {stated}"))
    return out
