"""``http(s)://`` image downloads behind the SSRF guard, with hard time and size limits.

Standard library only (``http.client``), so nothing between us and the socket reads proxy
variables or follows redirects on its own. Per hop: parse the URL, resolve the host once,
refuse addresses the guard refuses, connect to an address that passed (TLS SNI and
certificate check still use the host name), send one GET, and either follow a redirect
(re-checked as a new hop) or stream the body under the byte cap. One total deadline covers
the whole chain: connect, TLS handshake, headers and body, so a server that drips one byte
at a time is cut off when the deadline passes, not after a per-read timeout per byte.
"""

from __future__ import annotations

import http.client
import io
import select
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from clipguard.consumer.errors import SourceError
from clipguard.consumer.netguard import AddressGuard, Resolved, normalize_host

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: Worth retrying: the server or a proxy says "not now".
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
USER_AGENT = "clipguard-fetch/1"
_CHUNK = 64 * 1024
_PATH_SAFE = "!#$%&'()*+,/:;=?@[]~"


@dataclass(frozen=True)
class FetchLimits:
    """How long and how much one download may take; redirects count inside the deadline."""

    max_bytes: int
    connect_timeout_s: float = 3.0
    total_timeout_s: float = 10.0
    max_redirects: int = 3

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.connect_timeout_s <= 0 or self.total_timeout_s <= 0:
            raise ValueError("fetch limits must be positive")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must be >= 0")


@dataclass(frozen=True)
class Target:
    """One hop's request: where to connect and what to ask for."""

    scheme: str
    host: str
    port: int
    path: str

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def parse_target(url: str) -> Target:
    """Split an http(s) URL; anything else, or anything ambiguous, is a permanent error."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise SourceError(f"malformed URL: {exc}", "bad_url") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise SourceError(f"scheme {scheme!r} is not fetched over HTTP", "unsupported_scheme")
    if parts.username is not None or parts.password is not None:
        raise SourceError("URLs with credentials are refused", "bad_url")
    if not parts.hostname:
        raise SourceError("URL has no host", "bad_url")
    try:
        host = normalize_host(parts.hostname)
    except ValueError as exc:
        raise SourceError(str(exc), "bad_url") from exc
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    default_port = 443 if scheme == "https" else 80
    return Target(scheme, host, port or default_port, quote(path, safe=_PATH_SAFE))


class Deadline:
    """A point in monotonic time; ``remaining`` raises once it has passed."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.at = clock() + seconds
        self.seconds = seconds

    def remaining(self) -> float:
        left = self.at - self.clock()
        if left <= 0:
            raise TimeoutError(f"total fetch deadline of {self.seconds:g} s passed")
        return left


class _DeadlineRaw(io.RawIOBase):
    """The response's byte stream: every ``recv`` may wait only for what is left of the deadline.

    Wraps the socket's own ``makefile`` stream, so the socket's reference counting (which
    keeps it open until the response is read even after ``http.client`` closes the
    connection) works as usual.
    """

    def __init__(self, sock: socket.socket, deadline: Deadline) -> None:
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:  # type: ignore[override]
        self._sock.settimeout(self._deadline.remaining())
        return self._raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _DeadlineSocket:
    """What ``http.client.HTTPResponse`` needs of a socket: a ``makefile`` under the deadline."""

    def __init__(self, sock: socket.socket, deadline: Deadline) -> None:
        self._sock = sock
        self._deadline = deadline

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        return io.BufferedReader(_DeadlineRaw(self._sock, self._deadline), _CHUNK)


class _PinnedConnectionMixin:
    """Connects to the addresses the guard passed, never to whatever DNS says now."""

    host: str
    port: int
    sock: socket.socket | None

    def __init__(
        self,
        host: str,
        port: int,
        addresses: list[Resolved],
        deadline: Deadline,
        connect_timeout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(host, port, **kwargs)  # type: ignore[call-arg]
        self._addresses = addresses
        self._deadline = deadline
        self._connect_timeout = connect_timeout

        def response(sock: socket.socket, *args: Any, **kw: Any) -> http.client.HTTPResponse:
            return http.client.HTTPResponse(_DeadlineSocket(sock, deadline), *args, **kw)

        self.response_class = response

    def _open_socket(self, resolved: Resolved, timeout: float) -> socket.socket:
        sock = socket.socket(resolved.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(resolved.sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        return sock

    def _connect_pinned(self) -> socket.socket:
        last: OSError | None = None
        for resolved in self._addresses:
            timeout = min(self._connect_timeout, self._deadline.remaining())
            try:
                return self._open_socket(resolved, timeout)
            except OSError as exc:  # try the next address, like create_connection does
                last = exc
        raise last or ConnectionError("no address to connect to")

    def connect(self) -> None:
        self.sock = self._connect_pinned()
        self.sock.settimeout(self._deadline.remaining())  # for sending the request


class PinnedHTTPConnection(_PinnedConnectionMixin, http.client.HTTPConnection):
    pass


class PinnedHTTPSConnection(_PinnedConnectionMixin, http.client.HTTPSConnection):
    """TLS to a pinned address; SNI and certificate verification use the URL's host name."""

    def __init__(
        self,
        host: str,
        port: int,
        addresses: list[Resolved],
        deadline: Deadline,
        connect_timeout: float,
        context: ssl.SSLContext,
    ) -> None:
        super().__init__(host, port, addresses, deadline, connect_timeout, context=context)
        self._tls_context = context

    def connect(self) -> None:
        raw = self._connect_pinned()
        raw.setblocking(False)
        try:
            tls = self._tls_context.wrap_socket(
                raw, server_hostname=self.host, do_handshake_on_connect=False
            )
        except BaseException:
            raw.close()
            raise
        try:
            _handshake(tls, self._deadline)
            tls.settimeout(self._deadline.remaining())
        except BaseException:
            tls.close()
            raise
        self.sock = tls


def _handshake(tls: ssl.SSLSocket, deadline: Deadline) -> None:
    """A non-blocking TLS handshake that cannot outlive the deadline, however slow the peer."""
    while True:
        try:
            tls.do_handshake()
            return
        except ssl.SSLWantReadError:
            ready = select.select([tls], [], [], deadline.remaining())[0]
        except ssl.SSLWantWriteError:
            ready = select.select([], [tls], [], deadline.remaining())[1]
        if not ready:
            deadline.remaining()  # raises once the deadline has passed
            raise TimeoutError("TLS handshake timed out")


class HttpFetcher:
    """GETs one image URL under :class:`FetchLimits`, refusing what the guard refuses.

    Thread-safe: holds no per-request state, so a pool may share one instance.
    """

    def __init__(
        self,
        limits: FetchLimits,
        guard: AddressGuard | None = None,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.guard = guard or AddressGuard()
        self.ssl_context = ssl_context or ssl.create_default_context()
        self.clock = clock

    def get(self, url: str, until: float | None = None) -> bytes:
        """The body of ``url`` after at most ``max_redirects`` checked redirects, within
        ``total_timeout_s`` and, when given, before the monotonic time ``until``."""
        budget = self.limits.total_timeout_s
        if until is not None:
            budget = min(budget, until - self.clock())
            if budget <= 0:
                raise SourceError("the event's fetch deadline has passed", "timeout")
        deadline = Deadline(budget, self.clock)
        for _hop in range(self.limits.max_redirects + 1):
            target = parse_target(url)
            addresses = self.guard.resolve(target.host, target.port)
            try:
                location = self._request(target, addresses, deadline)
            except (OSError, http.client.HTTPException, UnicodeError) as exc:
                raise _as_source_error(exc, target) from exc
            if isinstance(location, bytes):
                return location
            url = urljoin(url, location)
        raise SourceError(f"more than {self.limits.max_redirects} redirects", "too_many_redirects")

    def _connection(
        self, target: Target, addresses: list[Resolved], deadline: Deadline
    ) -> http.client.HTTPConnection:
        timeout = self.limits.connect_timeout_s
        if target.scheme == "https":
            return PinnedHTTPSConnection(
                target.host, target.port, addresses, deadline, timeout, self.ssl_context
            )
        return PinnedHTTPConnection(target.host, target.port, addresses, deadline, timeout)

    def _request(
        self, target: Target, addresses: list[Resolved], deadline: Deadline
    ) -> bytes | str:
        """The body (bytes) or a redirect's Location (str)."""
        conn = self._connection(target, addresses, deadline)
        try:
            conn.putrequest("GET", target.path, skip_accept_encoding=True)
            conn.putheader("Accept", "image/*")
            conn.putheader("Accept-Encoding", "identity")
            conn.putheader("User-Agent", USER_AGENT)
            conn.putheader("Connection", "close")
            conn.endheaders()
            response = conn.getresponse()
            status = response.status
            if status in REDIRECT_STATUSES:
                location = response.getheader("Location")
                if not location:
                    raise SourceError(f"HTTP {status} without a Location", "http_status")
                return location
            if status != 200:
                raise SourceError(
                    f"HTTP {status} from {target.host}",
                    "http_status",
                    permanent=status not in TRANSIENT_STATUSES,
                )
            return self._read_body(response)
        finally:
            conn.close()

    def _read_body(self, response: http.client.HTTPResponse) -> bytes:
        """Stream the body, refusing it as soon as it would exceed the byte cap."""
        cap = self.limits.max_bytes
        declared = response.length  # None when chunked or close-delimited
        if declared is not None and declared > cap:
            raise SourceError(f"Content-Length {declared} exceeds {cap}", "too_many_bytes")
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = response.read1(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > cap:
                raise SourceError(f"body exceeds {cap} bytes", "too_many_bytes")
            chunks.append(chunk)
        if declared is not None and total < declared:
            raise http.client.IncompleteRead(b"", declared - total)
        return b"".join(chunks)


def _as_source_error(
    exc: OSError | http.client.HTTPException | UnicodeError, target: Target
) -> SourceError:
    """Map what sockets, TLS and http.client raise onto bounded, typed reasons."""
    where = f"{target.host}:{target.port}"
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError since 3.10
        return SourceError(f"{where}: timed out ({exc})", "timeout", permanent=False)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return SourceError(f"{where}: TLS certificate rejected: {exc.verify_message}", "tls_failed")
    if isinstance(exc, ssl.SSLError):
        return SourceError(f"{where}: TLS failed: {exc}", "tls_failed", permanent=False)
    if isinstance(exc, http.client.InvalidURL):
        return SourceError(f"invalid URL: {exc}", "bad_url")
    if isinstance(exc, (http.client.IncompleteRead, http.client.RemoteDisconnected)):
        return SourceError(f"{where}: connection closed early", "connection_failed", False)
    if isinstance(exc, http.client.HTTPException):
        return SourceError(f"{where}: bad HTTP response: {type(exc).__name__}", "bad_response")
    if isinstance(exc, ConnectionRefusedError):
        return SourceError(f"{where}: connection refused", "connection_failed", permanent=False)
    if isinstance(exc, OSError):
        reason = exc.strerror or type(exc).__name__
        return SourceError(f"{where}: {reason}", "connection_failed", permanent=False)
    return SourceError(f"invalid URL: {exc}", "bad_url")  # UnicodeError: not ASCII-safe
