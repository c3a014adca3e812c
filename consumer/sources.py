"""Where an event's image bytes come from: inline, or ``file://`` under a configured root.

Remote ``http(s)://`` fetching (with the SSRF guard from DESIGN.md) plugs in here as one
more source; until it is configured such events are refused with a clear reason.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from clipguard.consumer.errors import SourceError
from clipguard.consumer.records import Upload


class ImageSources:
    def __init__(self, max_bytes: int, file_root: Path | None = None) -> None:
        self.max_bytes = max_bytes
        self.file_root = file_root.resolve() if file_root else None

    def fetch(self, upload: Upload) -> bytes:
        if upload.image_bytes is not None:
            return upload.image_bytes
        url = upload.image_url or ""
        scheme = urlparse(url).scheme.lower()
        if scheme == "file":
            return self._read_file(url)
        if scheme in ("http", "https"):
            raise SourceError(
                "http(s) image URLs are not enabled on this worker", "scheme_not_enabled"
            )
        raise SourceError(f"unsupported image URL scheme {scheme!r}", "unsupported_scheme")

    def _read_file(self, url: str) -> bytes:
        if self.file_root is None:
            raise SourceError("file:// URLs need --file-root", "file_root_not_set")
        path = Path(unquote(urlparse(url).path)).resolve()
        if not path.is_relative_to(self.file_root):
            raise SourceError("file:// URL outside the configured root", "outside_root")
        try:
            size = path.stat().st_size
            if size > self.max_bytes:
                raise SourceError(f"{size} bytes exceeds {self.max_bytes}", "too_many_bytes")
            return path.read_bytes()
        except OSError as exc:
            raise SourceError(f"cannot read {path.name}: {exc.strerror}", "unreadable") from exc
