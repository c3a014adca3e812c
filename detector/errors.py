"""Typed errors: every way an input can fail has a class, a stage and a short reason code.

The reason code is a bounded vocabulary so it can be a Prometheus label and a
dead-letter header without leaking user data; the message is for humans.
"""

from __future__ import annotations


class ClipguardError(Exception):
    """Base of every error clipguard raises on purpose."""

    stage: str = "internal"
    reason: str = "error"
    #: Permanent errors go straight to the dead-letter topic; transient ones may be retried.
    permanent: bool = True
    #: A failure of clipguard itself (model, output, bug), not of the input it was given:
    #: only these count towards the worker's dead-letter brake.
    internal: bool = False


class ImageError(ClipguardError):
    """The bytes could not be turned into an image the detector may see."""

    stage = "decode"
    reason = "undecodable"


class EmptyImageError(ImageError):
    reason = "empty"


class ImageTooLargeError(ImageError):
    """Too many bytes: refused before Pillow sees them."""

    reason = "too_many_bytes"


class DecompressionBombError(ImageError):
    """Too many pixels: refused from the header, before anything is decompressed."""

    reason = "too_many_pixels"


class UnsupportedFormatError(ImageError):
    reason = "unsupported_format"


class CorruptImageError(ImageError):
    reason = "corrupt"


class CheckpointError(ClipguardError):
    """A checkpoint is missing, malformed, or does not match its manifest."""

    stage = "checkpoint"
    reason = "invalid_checkpoint"


class BackboneError(ClipguardError):
    """An encoder cannot be built (unknown name, weights unavailable offline)."""

    stage = "model"
    reason = "backbone"
