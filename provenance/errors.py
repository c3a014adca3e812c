"""Start-up errors of the provenance readers (runtime problems never raise: see readers)."""

from __future__ import annotations

from clipguard.detector.errors import ClipguardError


class ProvenanceConfigError(ClipguardError):
    """A provenance setting cannot be used: unreadable trust anchors, a bad hash-list line.

    Raised when the readers are built (start-up) or a hash list is reloaded on request;
    the message names the setting and, for a hash list, the file and line.
    """

    stage = "config"
    reason = "provenance_config"
