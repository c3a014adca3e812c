"""All enabled readers over one upload, each bounded, the whole read under a time budget.

The worker calls :meth:`ProvenanceReader.read` in its decode stage with the original
bytes (and the decoded image, so the hash list need not decode again). Nothing in here
raises for any input; only construction does, for settings that cannot work (an
unreadable trust-anchor file, a hash list with a bad line): a start-up error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from clipguard.detector.decode import DecodeLimits
from clipguard.provenance import exif, hashlist, pngtext, xmp
from clipguard.provenance.c2pa import C2paState, C2paVerifier, load_trust_anchors
from clipguard.provenance.evidence import Evidence, Kind
from clipguard.provenance.hashlist import HashList
from clipguard.provenance.settings import ProvenanceSettings, ReaderName
from clipguard.provenance.watchdog import Watchdog

log = logging.getLogger(__name__)

#: At most this many evidence items per upload (each detail is at most 300 characters).
MAX_EVIDENCE = 12

_KINDS: dict[ReaderName, Kind] = {
    "c2pa": "c2pa",
    "xmp": "iptc",
    "exif": "exif",
    "pngtext": "generator_metadata",
    "hashlist": "hash_list",
}


@dataclass
class ProvenanceReport:
    """One upload's evidence, plus what the metrics want to know about the read."""

    evidence: list[Evidence] = field(default_factory=list)
    #: What became of the C2PA read (None when that reader is off).
    c2pa_state: C2paState | None = None
    #: Seconds each reader took (for a histogram per reader).
    seconds: dict[str, float] = field(default_factory=dict)
    #: Readers skipped because the budget was spent.
    skipped: list[str] = field(default_factory=list)


Step = Callable[[bytes, Image.Image | None, ProvenanceReport], list[Evidence]]


class ProvenanceReader:
    """Runs the enabled readers in order; thread-safe, so one serves a whole decode pool."""

    def __init__(
        self,
        settings: ProvenanceSettings | None = None,
        *,
        decode_limits: DecodeLimits | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.settings = settings = settings or ProvenanceSettings()
        self._limits = decode_limits
        self._clock = clock
        self._verifier: C2paVerifier | None = None
        self.hash_list: HashList | None = None
        if "c2pa" in settings.readers:
            anchors = None
            if settings.c2pa_trust_anchors is not None:
                anchors = load_trust_anchors(settings.c2pa_trust_anchors)
            self._verifier = C2paVerifier(
                anchors,
                timeout_s=settings.c2pa_timeout_ms / 1000,
                max_manifest_bytes=settings.c2pa_max_manifest_bytes,
                watchdog=Watchdog(settings.c2pa_threads),
            )
        if "hashlist" in settings.readers and settings.hash_list is not None:
            self.hash_list = HashList(settings.hash_list, settings.hash_list_threshold)
        steps: dict[ReaderName, Step] = {
            "c2pa": self._c2pa,
            "xmp": lambda data, _image, _report: xmp.read(data),
            "exif": lambda data, _image, _report: exif.read(data),
            "pngtext": lambda data, _image, _report: pngtext.read(data),
            "hashlist": self._hashlist,
        }
        self._steps = [
            (name, steps[name])
            for name in dict.fromkeys(settings.readers)
            if name != "hashlist" or self.hash_list is not None
        ]

    @property
    def readers(self) -> list[str]:
        """The readers that run, in order."""
        return [name for name, _ in self._steps]

    def _c2pa(
        self, data: bytes, _image: Image.Image | None, report: ProvenanceReport
    ) -> list[Evidence]:
        assert self._verifier is not None
        result = self._verifier.inspect(data)
        report.c2pa_state = result.state
        return result.evidence

    def _hashlist(
        self, data: bytes, image: Image.Image | None, _report: ProvenanceReport
    ) -> list[Evidence]:
        assert self.hash_list is not None
        return hashlist.read(
            data,
            image,
            self.hash_list,
            limits=self._limits,
            min_quality=self.settings.hash_min_quality,
        )

    def inspect(self, data: bytes, image: Image.Image | None = None) -> ProvenanceReport:
        """Every enabled reader's evidence and the read's facts; never raises."""
        report = ProvenanceReport()
        data = bytes(data) if not isinstance(data, bytes) else data
        if len(data) > self.settings.max_bytes:
            report.skipped = self.readers  # larger than any upload the worker decodes
            return report
        started = self._clock()
        for name, step in self._steps:
            begun = self._clock()
            if (begun - started) * 1000 > self.settings.budget_ms:
                report.skipped.append(name)
                detail = "not read: the provenance time budget was spent"
                report.evidence.append(Evidence(kind=_KINDS[name], claim="unknown", detail=detail))
                continue
            try:
                found = step(data, image, report)
            except Exception as exc:  # readers never raise; this is the last line of defence
                log.warning("provenance reader %s failed", name, exc_info=True)
                detail = f"reader failed: {type(exc).__name__}"
                found = [Evidence(kind=_KINDS[name], claim="unknown", detail=detail)]
            report.seconds[name] = self._clock() - begun
            report.evidence.extend(found)
        report.evidence = report.evidence[:MAX_EVIDENCE]
        return report

    def read(self, data: bytes, image: Image.Image | None = None) -> list[Evidence]:
        """The upload's evidence (see :meth:`inspect` for the read's facts); never raises."""
        return self.inspect(data, image).evidence

    def reload(self) -> int | None:
        """Re-read the hash list now (SIGHUP); its entry count, or None without a list.

        Raises :class:`~clipguard.provenance.errors.ProvenanceConfigError` for a bad file;
        the previous list then stays in force.
        """
        return self.hash_list.reload() if self.hash_list is not None else None

    @property
    def overdue_c2pa_calls(self) -> int:
        """C2PA calls past their deadline still holding a thread (0 unless one hung)."""
        return self._verifier.watchdog.overdue if self._verifier is not None else 0

    def close(self) -> None:
        if self._verifier is not None:
            self._verifier.close()
