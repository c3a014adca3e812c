"""Event-level failures: each becomes a dead letter (and a review verdict if the id is known)."""

from __future__ import annotations

from clipguard.detector.errors import ClipguardError


class InvalidEventError(ClipguardError):
    """The message is not a usable upload event; permanent."""

    stage = "parse"

    def __init__(self, message: str, reason: str = "invalid_event", event_id: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.event_id = event_id


class SourceError(ClipguardError):
    """The image bytes could not be obtained from the event's source."""

    stage = "fetch"

    def __init__(self, message: str, reason: str = "fetch_failed", permanent: bool = True):
        super().__init__(message)
        self.reason = reason
        self.permanent = permanent


class DeadLetterRateExceeded(ClipguardError):
    """Too many dead letters in a row: stop rather than drain a topic into the DLQ."""

    stage = "worker"
    reason = "dead_letter_rate"


class BrokerUnavailableError(ClipguardError):
    """The broker stayed unreachable past ``broker_retry_timeout_s``: exit code 4."""

    stage = "worker"
    reason = "broker_unavailable"
