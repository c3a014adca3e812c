"""Settings of the provenance readers: one frozen object, built once and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from clipguard.provenance.c2pa import DEFAULT_MAX_MANIFEST_BYTES
from clipguard.provenance.hashlist import DEFAULT_MIN_QUALITY, DEFAULT_THRESHOLD

ReaderName = Literal["c2pa", "xmp", "exif", "pngtext", "hashlist"]
ALL_READERS: tuple[ReaderName, ...] = ("c2pa", "xmp", "exif", "pngtext", "hashlist")


class ProvenanceSettings(BaseModel):
    """What to read, what to trust, and how much time and memory reading may take."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Readers to run, in this order. ``hashlist`` runs only when ``hash_list`` is set.
    readers: tuple[ReaderName, ...] = ALL_READERS
    #: PEM file of C2PA trust anchors: a signer is trusted only if it chains to one of them.
    c2pa_trust_anchors: Path | None = None
    #: Manifest stores larger than this are not read (reported as ``unknown``).
    c2pa_max_manifest_bytes: int = Field(default=DEFAULT_MAX_MANIFEST_BYTES, gt=0)
    #: Operator hash list: ``<64 hex PDQ> <ai_generated|real> [generator]`` per line.
    hash_list: Path | None = None
    #: PDQ Hamming distance (of 256 bits) at or under which two images match.
    hash_list_threshold: int = Field(default=DEFAULT_THRESHOLD, ge=0, le=256)
    #: PDQ quality (0-100) under which an image is not matched (flat images hash poorly).
    hash_min_quality: int = Field(default=DEFAULT_MIN_QUALITY, ge=0, le=100)
    #: Hard deadline of the native C2PA call, per image.
    c2pa_timeout_ms: float = Field(default=500.0, gt=0)
    #: Readers not yet started when this much time has passed are skipped for the image.
    budget_ms: float = Field(default=1000.0, gt=0)
    #: Uploads larger than this are not read at all.
    max_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    #: Daemon threads that run C2PA calls under the deadline.
    c2pa_threads: int = Field(default=2, ge=1, le=64)
