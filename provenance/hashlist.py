"""Perceptual hash lists: PDQ hashes of the image against the operator's own lists.

PDQ (Meta's open perceptual hash, 256 bits) stays within a small Hamming distance of
itself under re-encoding, resizing and light edits, so a list of images the operator has
already ruled on (known generated, known real) catches their copies. The list is a text
file, one ``<64 hex digits> <ai_generated|real> [generator name]`` per line, with ``#``
comments; a bad line is an error naming the file and line. A list is the operator's own
ruling, so a match is trusted evidence. It is re-read when the file changes (checked at most once a
second) or on :meth:`HashList.reload` (the worker calls it on SIGHUP).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import pdqhash
from PIL import Image

from clipguard.detector.decode import DecodeLimits, decode_image
from clipguard.detector.errors import ImageError
from clipguard.provenance.errors import ProvenanceConfigError
from clipguard.provenance.evidence import Evidence
from clipguard.provenance.generators import generator_name

log = logging.getLogger(__name__)

Label = Literal["ai_generated", "real"]
#: PDQ's documentation suggests a distance of 31 or less (of 256 bits) as a match.
DEFAULT_THRESHOLD = 31
#: Below this PDQ quality (0-100) an image has too little structure for a reliable hash.
DEFAULT_MIN_QUALITY = 50
#: Images are scaled to fit this square before hashing: PDQ works on a 64x64 downsample
#: anyway, and the hash of a 12-megapixel photo costs 100x more at full size.
WORK_SIZE = 512
_HEX = re.compile(r"[0-9a-fA-F]{64}")


def pdq_hash(image: Image.Image) -> tuple[bytes, int]:
    """The PDQ hash (32 bytes, most significant bit first, as ThreatExchange writes it in
    hex) and its quality (0-100) of an image as displayed (orientation applied)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    scale = WORK_SIZE / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    bits, quality = pdqhash.compute(np.asarray(image))
    return np.packbits(bits.astype(np.uint8)).tobytes(), int(quality)


def hash_file(path: Path, limits: DecodeLimits | None = None) -> str:
    """``<hex> `` of an image file, decoded as the worker decodes uploads (to build lists)."""
    digest, _quality = pdq_hash(decode_image(path.read_bytes(), limits))
    return digest.hex()


class HashMatch(NamedTuple):
    label: Label
    generator: str | None
    distance: int
    line: int


@dataclass(frozen=True)
class _Snapshot:
    """One parsed version of the list: hashes as (n, 4) uint64 rows, labels beside them."""

    hashes: np.ndarray
    labels: tuple[Label, ...]
    generators: tuple[str | None, ...]
    lines: tuple[int, ...]
    stamp: tuple[int, int, int]


def parse(text: str, source: str) -> tuple[np.ndarray, list[Label], list[str | None], list[int]]:
    """Parse list text; :class:`ProvenanceConfigError` names ``source:line`` of a bad line."""
    rows: list[bytes] = []
    labels: list[Label] = []
    generators: list[str | None] = []
    lines: list[int] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split(maxsplit=2)
        problem = None
        if len(fields) < 2:
            problem = "expected '<64 hex digits> <ai_generated|real> [generator name]'"
        elif not _HEX.fullmatch(fields[0]):
            problem = "the hash must be 64 hex digits (a PDQ hash)"
        elif fields[1] not in ("ai_generated", "real"):
            problem = "the label must be ai_generated or real"
        if problem:
            raise ProvenanceConfigError(f"hash_list: {source}:{number}: {problem}: {raw[:100]!r}")
        rows.append(bytes.fromhex(fields[0]))
        labels.append(fields[1])  # type: ignore[arg-type]  # checked just above
        generators.append(generator_name(fields[2]) if len(fields) == 3 else None)
        lines.append(number)
    hashes = np.frombuffer(b"".join(rows), dtype=">u8").reshape(-1, 4).astype(np.uint64)
    return hashes, labels, generators, lines


def _popcount(values: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    as_bytes = values.view(np.uint8)
    return np.unpackbits(as_bytes, axis=-1).reshape(*values.shape, 64).sum(axis=-1)


class HashList:
    """An operator's PDQ hash list, re-read when its file changes.

    Thread-safe: lookups read an immutable snapshot; a reload swaps in a new one.
    """

    def __init__(
        self,
        path: Path,
        threshold: int = DEFAULT_THRESHOLD,
        *,
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= threshold <= 256:
            raise ProvenanceConfigError(f"hash_list_threshold: {threshold} is not in 0..256")
        self.path = Path(path)
        self.threshold = threshold
        self._interval = check_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._snapshot = self._load()
        self._checked_at = clock()
        self._failed_stamp: tuple[int, int, int] | None = None

    def __len__(self) -> int:
        return len(self._snapshot.labels)

    def _stamp(self) -> tuple[int, int, int]:
        stat = os.stat(self.path)
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def _load(self) -> _Snapshot:
        try:
            stamp = self._stamp()
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ProvenanceConfigError(f"hash_list: cannot read {self.path}: {exc}") from exc
        hashes, labels, generators, lines = parse(text, str(self.path))
        return _Snapshot(hashes, tuple(labels), tuple(generators), tuple(lines), stamp)

    def reload(self) -> int:
        """Re-read the file now; returns the entry count. On a bad file the old list stays
        in force and :class:`ProvenanceConfigError` says why."""
        with self._lock:
            snapshot = self._load()
            self._snapshot = snapshot
            self._failed_stamp = None
            self._checked_at = self._clock()
        log.info("hash list %s: %d entries", self.path, len(snapshot.labels))
        return len(snapshot.labels)

    def maybe_reload(self) -> None:
        """Re-read the file if it changed since the last look (at most once an interval).

        Never raises: a bad new version is logged once and the old list stays in force.
        """
        now = self._clock()
        if now - self._checked_at < self._interval or not self._lock.acquire(blocking=False):
            return
        try:
            self._checked_at = now
            try:
                stamp = self._stamp()
            except OSError:
                return  # mid-replace or removed: keep what we have
            if stamp in (self._snapshot.stamp, self._failed_stamp):
                return
            try:
                self._snapshot = self._load()
                log.info("hash list %s reloaded: %d entries", self.path, len(self))
            except ProvenanceConfigError as exc:
                self._failed_stamp = stamp
                log.error("%s (the previous list stays in force)", exc)
        finally:
            self._lock.release()

    def match(self, digest: bytes) -> HashMatch | None:
        """The nearest entry within the threshold (ties: ``ai_generated`` first), or None."""
        snapshot = self._snapshot
        if not snapshot.labels:
            return None
        query = np.frombuffer(digest, dtype=">u8").astype(np.uint64)
        distances = _popcount(np.bitwise_xor(snapshot.hashes, query)).sum(axis=1)
        best = int(distances.min())
        if best > self.threshold:
            return None
        nearest = np.flatnonzero(distances == best)
        index = next((int(i) for i in nearest if snapshot.labels[i] == "ai_generated"), None)
        index = int(nearest[0]) if index is None else index
        return HashMatch(
            snapshot.labels[index], snapshot.generators[index], best, snapshot.lines[index]
        )


def read(
    data: bytes,
    image: Image.Image | None,
    hash_list: HashList,
    *,
    limits: DecodeLimits | None = None,
    min_quality: int = DEFAULT_MIN_QUALITY,
) -> list[Evidence]:
    """Evidence of a hash-list match; never raises. Decodes ``data`` when no image is given."""
    try:
        hash_list.maybe_reload()
        if image is None:
            image = decode_image(data, limits)
        digest, quality = pdq_hash(image)
        if quality < min_quality:
            return []
        found = hash_list.match(digest)
        if found is None:
            return []
        return [
            Evidence(
                kind="hash_list",
                claim=found.label,
                generator=found.generator if found.label == "ai_generated" else None,
                trusted=True,
                detail=(
                    f"PDQ distance {found.distance} (threshold {hash_list.threshold}) to "
                    f"{hash_list.path.name} line {found.line}; quality {quality}"
                ),
            )
        ]
    except ImageError:
        return []  # undecodable: the decode stage reports it, a hash would prove nothing
    except Exception as exc:  # a reader must never fail the event
        log.debug("hash list reader failed", exc_info=True)
        return [
            Evidence(kind="hash_list", claim="unknown", detail=f"not hashed: {type(exc).__name__}")
        ]


def main(argv: list[str] | None = None) -> int:
    """``python -m clipguard.provenance --label ai_generated FILES``: hash-list lines."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m clipguard.provenance",
        description="Print hash-list lines (PDQ hash, label) for image files.",
    )
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--label", choices=("ai_generated", "real"), required=True)
    parser.add_argument("--generator", default="", help="generator name to append to each line")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.files:
        try:
            digest = hash_file(path)
        except (OSError, ImageError) as exc:
            print(f"# {path}: {exc}")
            failed += 1
            continue
        print(f"{digest} {args.label} {args.generator}".rstrip() + f"  # {path.name}")
    return 1 if failed else 0
