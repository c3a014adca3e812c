"""Where an event's image bytes come from (DESIGN.md "Images"): inline, ``http(s)://``
behind the SSRF guard, or ``file://`` under a configured root. Nothing else.

Every failure is a :class:`SourceError` with a bounded reason; ``permanent=False`` ones
(timeouts, resets, 5xx, 429) were already retried here with backoff before they surface.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from clipguard.consumer.errors import SourceError
from clipguard.consumer.fetch import FetchLimits, HttpFetcher
from clipguard.consumer.netguard import AddressGuard
from clipguard.consumer.records import Upload
from clipguard.consumer.retry import RetryPolicy

if TYPE_CHECKING:
    from clipguard.consumer.config import WorkerSettings

#: Every reason a SourceError from here may carry: a bounded vocabulary for metric labels.
REASONS = frozenset(
    {
        # http(s)
        "scheme_not_enabled",
        "unsupported_scheme",
        "bad_url",
        "ssrf_refused",
        "dns_failed",
        "connection_failed",
        "tls_failed",
        "timeout",
        "http_status",
        "bad_response",
        "too_many_redirects",
        "too_many_bytes",
        # file://
        "file_root_not_set",
        "outside_root",
        "not_a_file",
        "unreadable",
    }
)

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


class ImageSources:
    """``fetch(upload) -> bytes`` for every source an event may name.

    Without an ``http`` fetcher, ``http(s)://`` URLs are refused (``scheme_not_enabled``);
    :meth:`from_settings` builds one unless ``fetch_enabled`` is off.
    """

    def __init__(
        self,
        max_bytes: int,
        file_root: Path | None = None,
        http: HttpFetcher | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.file_root = file_root.resolve() if file_root else None
        self.http = http
        self.retry = retry or RetryPolicy()

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> ImageSources:
        """The worker's sources: byte cap, file root, fetch limits, allow lists and retries."""
        http = None
        if settings.fetch_enabled:
            limits = FetchLimits(
                max_bytes=settings.max_image_bytes,
                connect_timeout_s=settings.fetch_connect_timeout_s,
                total_timeout_s=settings.fetch_total_timeout_s,
                max_redirects=settings.fetch_max_redirects,
            )
            guard = AddressGuard(settings.fetch_allow_cidrs, settings.fetch_allow_hosts)
            http = HttpFetcher(limits, guard)
        retry = RetryPolicy(
            attempts=settings.fetch_retries + 1,
            base_delay=settings.fetch_retry_base_s,
            max_delay=settings.fetch_retry_max_s,
        )
        return cls(settings.max_image_bytes, settings.file_root, http, retry)

    def fetch(self, upload: Upload, deadline: float | None = None) -> bytes:
        """The event's image bytes. ``deadline`` (monotonic seconds) bounds a URL fetch with
        all its retries: no attempt starts or runs past it."""
        if upload.image_bytes is not None:
            return upload.image_bytes
        url = upload.image_url or ""
        try:
            scheme = urlsplit(url).scheme.lower()
        except ValueError as exc:  # e.g. an unbalanced "[" in the host
            raise SourceError(f"malformed URL: {exc}", "bad_url") from exc
        if scheme == "file":
            return self._read_file(url)
        if scheme in ("http", "https"):
            http = self.http
            if http is None:
                raise SourceError(
                    "http(s) image URLs are not enabled on this worker", "scheme_not_enabled"
                )
            return self.retry(lambda: http.get(url, deadline), deadline)
        raise SourceError(f"unsupported image URL scheme {scheme!r}", "unsupported_scheme")

    def _read_file(self, url: str) -> bytes:
        """Read a regular file under ``file_root``: no symlink escapes, no devices or FIFOs."""
        if self.file_root is None:
            raise SourceError("file:// URLs need --file-root", "file_root_not_set")
        parts = urlsplit(url)  # already split once by fetch, so it does not raise
        if parts.netloc not in ("", "localhost"):
            raise SourceError("file:// URLs must not name a host", "bad_url")
        try:
            path = Path(unquote(parts.path)).resolve()
        except (OSError, ValueError) as exc:  # NUL bytes, symlink loops
            raise SourceError(f"bad file:// path: {exc}", "bad_url") from exc
        if not path.is_relative_to(self.file_root):
            raise SourceError("file:// URL outside the configured root", "outside_root")
        try:
            # Check before opening (opening a FIFO would block, a device may have effects),
            # then again on the open descriptor, in case the path changed in between.
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise SourceError(f"{path.name} is not a regular file", "not_a_file")
            fd = os.open(path, _OPEN_FLAGS)
            with os.fdopen(fd, "rb") as handle:
                info = os.fstat(handle.fileno())
                if not stat.S_ISREG(info.st_mode):
                    raise SourceError(f"{path.name} is not a regular file", "not_a_file")
                if info.st_size > self.max_bytes:
                    raise SourceError(
                        f"{info.st_size} bytes exceeds {self.max_bytes}", "too_many_bytes"
                    )
                data = handle.read(self.max_bytes + 1)
        except OSError as exc:
            raise SourceError(f"cannot read {path.name}: {exc.strerror}", "unreadable") from exc
        if len(data) > self.max_bytes:  # the file grew after fstat
            raise SourceError(f"file exceeds {self.max_bytes} bytes", "too_many_bytes")
        return data
