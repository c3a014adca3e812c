"""Image sources: SSRF guard, HTTP limits and retries, and ``file://`` confinement.

Real sockets only on 127.0.0.1: a threaded local HTTP(S) server plays every kind of image
host, and a spy on ``socket.connect`` fails any test that would reach another address.
Other addresses come from a fake resolver, and the guard must refuse them before connecting.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from clipguard.consumer.config import SettingsError, WorkerSettings
from clipguard.consumer.errors import SourceError
from clipguard.consumer.fetch import FetchLimits, HttpFetcher, parse_target
from clipguard.consumer.netguard import (
    AddressGuard,
    classify,
    parse_cidrs,
    parse_host_patterns,
)
from clipguard.consumer.records import Upload
from clipguard.consumer.retry import RetryPolicy, backoff_delay, retry
from clipguard.consumer.sources import REASONS, ImageSources

pytestmark = pytest.mark.timeout(20)  # a hang is a failure, never a long wait

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 16
CAP = 64 * 1024
LOOPBACK = ("127.0.0.1/32",)


# ------------------------------------------------------------------------ local server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        hits = self.server.count(self.path)
        route = getattr(self, "route_" + url.path.strip("/").replace("-", "_"), None)
        if route is None:
            self._send(404, b"not found")
        else:
            route(query, hits)

    def route_ok(self, query: dict, hits: int) -> None:
        self._send(200, IMAGE, Content_Type="image/png")

    def route_redirect(self, query: dict, hits: int) -> None:
        self._send(int(query.get("status", 302)), Location=query["to"])

    def route_loop(self, query: dict, hits: int) -> None:
        self._send(302, Location="/loop")

    def route_status(self, query: dict, hits: int) -> None:
        self._send(int(query["code"]), b"nope")

    def route_flaky(self, query: dict, hits: int) -> None:
        """500 until the request's ``fail`` count is used up, then the image."""
        if hits <= int(query.get("fail", 1)):
            self._send(500, b"try again")
        else:
            self.route_ok(query, hits)

    def route_huge_declared(self, query: dict, hits: int) -> None:
        self._send(200, b"x" * 1024, Content_Length=str(10**9), Connection="close")

    def route_huge_undeclared(self, query: dict, hits: int) -> None:
        self.close_connection = True
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self._write_until_refused(b"x" * 16384, CAP * 4)

    def route_huge_chunked(self, query: dict, hits: int) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
        self._write_until_refused(chunk, CAP * 4)

    def route_truncated(self, query: dict, hits: int) -> None:
        self.close_connection = True
        self._send(200, IMAGE[:10], Content_Length=str(len(IMAGE)))

    def route_slow_body(self, query: dict, hits: int) -> None:
        """Declares a small body, then drips it one byte every 0.5 s."""
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        self._drip(b"x" * 100)

    def route_slow_headers(self, query: dict, hits: int) -> None:
        self._drip(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def _drip(self, data: bytes) -> None:
        for byte in data:
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.5)

    def _write_until_refused(self, chunk: bytes, limit: int) -> None:
        sent = 0
        while sent < limit:
            try:
                self.wfile.write(chunk)
            except OSError:
                return
            sent += len(chunk)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()

    def count(self, path: str) -> int:
        with self.lock:
            self.hits[path] += 1
            return self.hits[path]

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up mid-body are what several tests are about

    @property
    def port(self) -> int:
        return self.server_address[1]


def _serve(tls: ssl.SSLContext | None = None) -> Iterator[_Server]:
    server = _Server(tls)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    yield from _serve()


@pytest.fixture(autouse=True)
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every address a test connects to; anything but loopback fails the test at once."""
    seen: list[tuple] = []
    real_connect = socket.socket.connect

    def spy(sock: socket.socket, address: tuple) -> None:
        host = str(address[0]).split("%", 1)[0]
        assert ip_address(host).is_loopback, f"tried to connect to {address}"
        seen.append(address)
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", spy)
    return seen


def fake_resolver(table: dict[str, list[str]], calls: list[str] | None = None) -> Callable:
    """getaddrinfo for made-up names; real resolution for everything else."""

    def resolve(host: str, port: int, *args: object, **kwargs: object) -> list[tuple]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            return socket.getaddrinfo(host, port, *args, **kwargs)  # type: ignore[arg-type]
        infos = []
        for text in table[host]:
            family = socket.AF_INET6 if ":" in text else socket.AF_INET
            sockaddr = (text, port, 0, 0) if family == socket.AF_INET6 else (text, port)
            infos.append((family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
        return infos

    return resolve


def make_sources(
    allow: tuple[str, ...] = LOOPBACK,
    hosts: tuple[str, ...] = (),
    resolver: Callable | None = None,
    total: float = 3.0,
    redirects: int = 3,
    attempts: int = 3,
    sleeps: list[float] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> ImageSources:
    guard = AddressGuard(allow, hosts, resolver or socket.getaddrinfo)
    limits = FetchLimits(CAP, connect_timeout_s=1.0, total_timeout_s=total, max_redirects=redirects)
    fetcher = HttpFetcher(limits, guard, ssl_context)
    sleeps = sleeps if sleeps is not None else []
    policy = RetryPolicy(attempts, base_delay=0.1, max_delay=0.4, sleep=sleeps.append)
    return ImageSources(CAP, None, fetcher, policy)


def url_upload(url: str) -> Upload:
    return Upload("e1", None, url, None)


def fetch_error(sources: ImageSources, url: str) -> SourceError:
    with pytest.raises(SourceError) as caught:
        sources.fetch(url_upload(url))
    assert caught.value.reason in REASONS
    return caught.value


# ------------------------------------------------------------------ address classifier


@pytest.mark.parametrize(
    ("address", "category"),
    [
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
        ("172.32.0.1", None),
        ("100.128.0.1", None),
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("::ffff:10.0.0.1", "private"),
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("2002:a00:1::1", "private"),  # 6to4 of 10.0.0.1
        ("fd00::1", "private"),
        ("fc00::1", "private"),
        ("100.64.0.1", "cgnat"),
        ("100.127.255.255", "cgnat"),
        ("169.254.169.254", "metadata"),
        ("::ffff:169.254.169.254", "metadata"),
        ("169.254.170.2", "metadata"),
        ("168.63.129.16", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("169.254.1.1", "link_local"),
        ("fe80::1", "link_local"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "reserved"),
        ("240.0.0.1", "reserved"),
        ("192.0.2.1", "reserved"),
        ("198.18.0.1", "reserved"),
        ("2001:db8::1", "reserved"),
        ("2001::1", "reserved"),  # Teredo
        ("::10.0.0.1", "reserved"),  # IPv4-compatible, deprecated
        ("100::1", "reserved"),
        ("4000::1", "reserved"),  # outside 2000::/3
    ],
)
def test_classify(address: str, category: str | None) -> None:
    assert classify(ip_address(address)) == category


def test_allow_list_readmits_only_what_it_covers() -> None:
    guard = AddressGuard(["127.0.0.1/32", "10.1.0.0/16"])
    assert guard.refusal(ip_address("127.0.0.1")) is None
    assert guard.refusal(ip_address("::ffff:127.0.0.1")) is None
    assert guard.refusal(ip_address("10.1.2.3")) is None
    assert guard.refusal(ip_address("127.0.0.2")) == "loopback"
    assert guard.refusal(ip_address("::1")) == "loopback"
    assert guard.refusal(ip_address("10.2.0.1")) == "private"
    assert guard.refusal(ip_address("169.254.169.254")) == "metadata"


def test_cidr_and_host_pattern_parsing() -> None:
    assert [str(n) for n in parse_cidrs(["10.0.0.0/8", " ::1/128 "])] == ["10.0.0.0/8", "::1/128"]
    for bad in ("10.0.0.1/8", "nonsense", "10.0.0.0/33"):
        with pytest.raises(ValueError, match="not a CIDR"):
            parse_cidrs([bad])
    assert parse_host_patterns(["CDN.Example.com.", "*.img.example"]) == (
        "cdn.example.com",
        "*.img.example",
    )
    with pytest.raises(ValueError):
        parse_host_patterns(["a.*.example"])


# ------------------------------------------------------------------------- SSRF guard


def test_loopback_refused_without_allow_list(server: _Server, connects: list) -> None:
    sources = make_sources(allow=())
    for url in (
        f"http://127.0.0.1:{server.port}/ok",
        f"http://[::1]:{server.port}/ok",
        f"http://[::ffff:127.0.0.1]:{server.port}/ok",
        f"http://2130706433:{server.port}/ok",  # 127.0.0.1 spelled as an integer
        f"http://localhost:{server.port}/ok",
    ):
        error = fetch_error(sources, url)
        assert (error.reason, error.permanent) == ("ssrf_refused", True), url
        assert "loopback" in str(error)
    assert connects == []


def test_allowed_loopback_fetches(server: _Server, connects: list) -> None:
    sources = make_sources()
    assert sources.fetch(url_upload(f"http://127.0.0.1:{server.port}/ok")) == IMAGE
    assert [c[0] for c in connects] == ["127.0.0.1"]


def test_localhost_resolves_and_is_checked(server: _Server) -> None:
    sources = make_sources(allow=("127.0.0.1/32", "::1/128"))
    # The server listens on IPv4 only: if localhost also resolves to ::1, that address
    # is refused by the kernel and the fetch falls through to 127.0.0.1.
    assert sources.fetch(url_upload(f"http://localhost:{server.port}/ok")) == IMAGE


def test_resolved_address_is_checked_not_the_name(connects: list) -> None:
    resolver = fake_resolver({"images.test": ["10.0.0.1"], "v6.test": ["fd00::1"]})
    sources = make_sources(resolver=resolver)
    for url in ("http://images.test/x.jpg", "http://v6.test/x.jpg"):
        error = fetch_error(sources, url)
        assert error.reason == "ssrf_refused"
        assert "private" in str(error)
    assert connects == []


def test_metadata_names_refused_before_dns_even_when_range_allowed() -> None:
    calls: list[str] = []
    sources = make_sources(allow=("169.254.0.0/16",), resolver=fake_resolver({}, calls))
    for url in (
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://METADATA.google.internal./computeMetadata/v1/",
        "http://instance-data/latest/",
    ):
        assert fetch_error(sources, url).reason == "ssrf_refused"
    assert calls == []


def test_only_checked_addresses_are_connected(server: _Server, connects: list) -> None:
    """A name resolving to a refused and an allowed address connects to the allowed one."""
    resolver = fake_resolver({"mixed.test": ["10.0.0.1", "127.0.0.1"]})
    sources = make_sources(resolver=resolver)
    assert sources.fetch(url_upload(f"http://mixed.test:{server.port}/ok")) == IMAGE
    assert [c[0] for c in connects] == ["127.0.0.1"]


def test_rebinding_cannot_move_the_connection(server: _Server, connects: list) -> None:
    """Resolved once per hop: a second, different DNS answer is never asked for."""
    answers = iter([["127.0.0.1"], ["10.0.0.1"]])
    calls: list[str] = []

    def rebinding(host: str, port: int, *args: object, **kwargs: object) -> list[tuple]:
        calls.append(host)
        return fake_resolver({host: next(answers)})(host, port)

    sources = make_sources(resolver=rebinding)
    assert sources.fetch(url_upload(f"http://rebind.test:{server.port}/ok")) == IMAGE
    assert calls == ["rebind.test"]
    assert [c[0] for c in connects] == ["127.0.0.1"]


def test_host_allow_list_narrows(server: _Server) -> None:
    resolver = fake_resolver({"cdn.example": ["127.0.0.1"], "a.img.example": ["127.0.0.1"]})
    sources = make_sources(hosts=("cdn.example", "*.img.example"), resolver=resolver)
    assert sources.fetch(url_upload(f"http://cdn.example:{server.port}/ok")) == IMAGE
    assert sources.fetch(url_upload(f"http://a.img.example:{server.port}/ok")) == IMAGE
    error = fetch_error(sources, f"http://127.0.0.1:{server.port}/ok")
    assert error.reason == "ssrf_refused"
    assert "fetch_allow_hosts" in str(error)


# -------------------------------------------------------------------------- redirects


def _redirect(server: _Server, to: str, status: int = 302) -> str:
    return f"http://127.0.0.1:{server.port}/redirect?status={status}&to={quote(to, safe='')}"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_followed(server: _Server, status: int) -> None:
    sources = make_sources()
    assert sources.fetch(url_upload(_redirect(server, "/ok", status))) == IMAGE
    absolute = f"http://127.0.0.1:{server.port}/ok"
    assert sources.fetch(url_upload(_redirect(server, absolute, status))) == IMAGE


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://10.0.0.1/internal",
        "http://[::ffff:10.0.0.1]/internal",
        "http://[fd00::1]:8080/x",
        "http://192.168.0.1/",
        "http://evil.test/x",  # resolves to 10.0.0.1
    ],
)
def test_redirect_to_refused_address(server: _Server, connects: list, target: str) -> None:
    sources = make_sources(resolver=fake_resolver({"evil.test": ["10.0.0.1"]}))
    error = fetch_error(sources, _redirect(server, target))
    assert (error.reason, error.permanent) == ("ssrf_refused", True)
    assert [c[0] for c in connects] == ["127.0.0.1"]  # the first hop only


@pytest.mark.parametrize("target", ["file:///etc/passwd", "gopher://127.0.0.1:70/", "ftp://x/"])
def test_redirect_to_other_schemes_refused(server: _Server, target: str) -> None:
    error = fetch_error(make_sources(), _redirect(server, target))
    assert (error.reason, error.permanent) == ("unsupported_scheme", True)


def test_redirect_limit(server: _Server) -> None:
    error = fetch_error(make_sources(), f"http://127.0.0.1:{server.port}/loop")
    assert (error.reason, error.permanent) == ("too_many_redirects", True)
    no_redirects = make_sources(redirects=0)
    assert fetch_error(no_redirects, _redirect(server, "/ok")).reason == "too_many_redirects"


# ----------------------------------------------------------------------- size and time


@pytest.mark.parametrize("path", ["huge-declared", "huge-undeclared", "huge-chunked"])
def test_oversize_cut_off(server: _Server, path: str) -> None:
    error = fetch_error(make_sources(), f"http://127.0.0.1:{server.port}/{path}")
    assert (error.reason, error.permanent) == ("too_many_bytes", True)


def test_slow_drip_body_cut_off_by_total_deadline(server: _Server) -> None:
    """Each byte arrives well within any per-read timeout; only the total deadline stops it."""
    sources = make_sources(total=1.0, attempts=1)
    error = fetch_error(sources, f"http://127.0.0.1:{server.port}/slow-body")
    assert (error.reason, error.permanent) == ("timeout", False)


def test_slow_drip_headers_cut_off_by_total_deadline(server: _Server) -> None:
    sources = make_sources(total=1.0, attempts=1)
    error = fetch_error(sources, f"http://127.0.0.1:{server.port}/slow-headers")
    assert (error.reason, error.permanent) == ("timeout", False)


def test_truncated_body_is_transient(server: _Server) -> None:
    error = fetch_error(make_sources(attempts=1), f"http://127.0.0.1:{server.port}/truncated")
    assert (error.reason, error.permanent) == ("connection_failed", False)


def test_connection_refused_is_transient() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = fetch_error(make_sources(attempts=1), f"http://127.0.0.1:{port}/ok")
    assert (error.reason, error.permanent) == ("connection_failed", False)


# -------------------------------------------------------------------- statuses, retries


def test_transient_500_retried_then_succeeds(server: _Server) -> None:
    sleeps: list[float] = []
    sources = make_sources(sleeps=sleeps)
    assert sources.fetch(url_upload(f"http://127.0.0.1:{server.port}/flaky?key=a")) == IMAGE
    assert server.hits["/flaky?key=a"] == 2
    assert len(sleeps) == 1 and 0.05 <= sleeps[0] <= 0.1


def test_transient_errors_give_up_after_the_attempts(server: _Server) -> None:
    sleeps: list[float] = []
    sources = make_sources(sleeps=sleeps)
    url = f"http://127.0.0.1:{server.port}/status?code=503"
    error = fetch_error(sources, url)
    assert (error.reason, error.permanent) == ("http_status", False)
    assert "gave up after 3 attempts" in str(error)
    assert server.hits["/status?code=503"] == 3
    assert len(sleeps) == 2


@pytest.mark.parametrize(("code", "permanent"), [(404, True), (403, True), (429, False)])
def test_status_codes(server: _Server, code: int, permanent: bool) -> None:
    path = f"/status?code={code}"
    error = fetch_error(make_sources(attempts=1), f"http://127.0.0.1:{server.port}{path}")
    assert (error.reason, error.permanent) == ("http_status", permanent)


def test_permanent_status_not_retried(server: _Server) -> None:
    sleeps: list[float] = []
    url = f"http://127.0.0.1:{server.port}/status?code=404&key=once"
    fetch_error(make_sources(sleeps=sleeps), url)
    assert server.hits["/status?code=404&key=once"] == 1
    assert sleeps == []


# ------------------------------------------------------------------------------ URLs


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://user:pw@127.0.0.1/ok", "bad_url"),
        ("http://@169.254.169.254@127.0.0.1/", "bad_url"),
        ("http:///ok", "bad_url"),
        ("http://[::1/ok", "bad_url"),
        ("http://127.0.0.1:99999/ok", "bad_url"),
        ("gopher://127.0.0.1/", "unsupported_scheme"),
        ("data:image/png;base64,AAAA", "unsupported_scheme"),
        ("", "unsupported_scheme"),
    ],
)
def test_bad_urls(url: str, reason: str, connects: list) -> None:
    error = fetch_error(make_sources(), url)
    assert (error.reason, error.permanent) == (reason, True)
    assert connects == []


def test_parse_target_quotes_the_path() -> None:
    target = parse_target("HTTP://Example.COM/a b/é?q=1 2#frag")
    assert (target.scheme, target.host, target.port) == ("http", "example.com", 80)
    assert target.path == "/a%20b/%C3%A9?q=1%202"
    assert parse_target("https://[::1]/").port == 443


def test_http_disabled_without_fetcher() -> None:
    error = fetch_error(ImageSources(CAP), "https://cdn.example/x.jpg")
    assert error.reason == "scheme_not_enabled"


# ------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not available")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=img.test",
         "-addext", "subjectAltName=DNS:img.test",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,digitalSignature,keyCertSign"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def tls_server(tls_files: tuple[Path, Path]) -> Iterator[_Server]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*tls_files)
    yield from _serve(context)


def test_https_pins_the_address_and_verifies_the_name(
    tls_server: _Server, tls_files: tuple[Path, Path], connects: list
) -> None:
    client = ssl.create_default_context(cafile=str(tls_files[0]))
    resolver = fake_resolver({"img.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    sources = make_sources(resolver=resolver, ssl_context=client, attempts=1)
    assert sources.fetch(url_upload(f"https://img.test:{tls_server.port}/ok")) == IMAGE
    error = fetch_error(sources, f"https://other.test:{tls_server.port}/ok")
    assert (error.reason, error.permanent) == ("tls_failed", True)
    assert {c[0] for c in connects} == {"127.0.0.1"}


def test_tls_handshake_cut_off_by_total_deadline() -> None:
    """A peer that accepts TCP but never answers the ClientHello."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        sources = make_sources(total=1.0, attempts=1)
        error = fetch_error(sources, f"https://127.0.0.1:{port}/ok")
    assert (error.reason, error.permanent) == ("timeout", False)


# ---------------------------------------------------------------------------- retries


def test_backoff_schedule_is_bounded_and_jittered() -> None:
    full = [backoff_delay(n, 0.2, 2.0, jitter=1.0) for n in range(1, 7)]
    assert full == pytest.approx([0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    half = [backoff_delay(n, 0.2, 2.0, jitter=0.0) for n in range(1, 7)]
    assert half == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_retry_with_injected_sleep() -> None:
    sleeps: list[float] = []
    outcomes = iter([SourceError("t", "timeout", False), SourceError("t", "timeout", False)])

    def flaky() -> bytes:
        error = next(outcomes, None)
        if error is not None:
            raise error
        return b"ok"

    assert retry(flaky, 3, 0.2, 2.0, sleep=sleeps.append, jitter=lambda: 1.0) == b"ok"
    assert sleeps == pytest.approx([0.2, 0.4])


def test_retry_stops_on_permanent_and_on_other_exceptions() -> None:
    sleeps: list[float] = []
    calls = Counter[str]()

    def permanent() -> None:
        calls["permanent"] += 1
        raise SourceError("no", "http_status", True)

    def bug() -> None:
        calls["bug"] += 1
        raise KeyError("bug")

    with pytest.raises(SourceError):
        retry(permanent, 5, sleep=sleeps.append)
    with pytest.raises(KeyError):
        retry(bug, 5, sleep=sleeps.append)
    assert calls == {"permanent": 1, "bug": 1}
    assert sleeps == []


def test_retry_gives_up_transient() -> None:
    sleeps: list[float] = []

    def always() -> None:
        raise SourceError("slow", "timeout", False)

    with pytest.raises(SourceError) as caught:
        retry(always, 4, 0.5, 1.0, sleep=sleeps.append, jitter=lambda: 0.0)
    assert (caught.value.reason, caught.value.permanent) == ("timeout", False)
    assert sleeps == pytest.approx([0.25, 0.5, 0.5])
    with pytest.raises(ValueError):
        retry(always, 0)


# ---------------------------------------------------------------------------- file://


@pytest.fixture
def file_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(IMAGE)
    (root / "big.bin").write_bytes(b"x" * (CAP + 1))
    (tmp_path / "secret.txt").write_text("outside")
    return root


def _file_sources(root: Path) -> ImageSources:
    return ImageSources(CAP, root)


def test_file_inside_root(file_root: Path) -> None:
    sources = _file_sources(file_root)
    assert sources.fetch(url_upload((file_root / "sub" / "a.png").as_uri())) == IMAGE
    assert sources.fetch(url_upload(f"file://localhost{file_root}/sub/a.png")) == IMAGE


def test_file_escapes_refused(file_root: Path) -> None:
    sources = _file_sources(file_root)
    (file_root / "escape").symlink_to(file_root.parent / "secret.txt")
    (file_root / "zero").symlink_to("/dev/zero")
    for url in (
        f"file://{file_root}/../secret.txt",
        f"file://{file_root}/sub/%2e%2e/%2e%2e/secret.txt",
        f"file://{file_root}/escape",
        f"file://{file_root}/zero",
        "file:///etc/passwd",
    ):
        assert fetch_error(sources, url).reason == "outside_root", url


def test_file_non_regular_refused(file_root: Path) -> None:
    os.mkfifo(file_root / "fifo")  # opening it for reading would block forever
    sources = _file_sources(file_root)
    for name in ("fifo", "sub"):
        assert fetch_error(sources, f"file://{file_root}/{name}").reason == "not_a_file"


def test_file_errors(file_root: Path) -> None:
    sources = _file_sources(file_root)
    assert fetch_error(sources, f"file://{file_root}/big.bin").reason == "too_many_bytes"
    assert fetch_error(sources, f"file://{file_root}/missing.png").reason == "unreadable"
    assert fetch_error(sources, f"file://otherhost{file_root}/sub/a.png").reason == "bad_url"
    assert fetch_error(sources, f"file://{file_root}/a%00b").reason == "bad_url"
    no_root = ImageSources(CAP)
    assert fetch_error(no_root, (file_root / "sub" / "a.png").as_uri()).reason == (
        "file_root_not_set"
    )


def test_inline_bytes_pass_through() -> None:
    assert ImageSources(CAP).fetch(Upload("e", IMAGE, None, None)) == IMAGE


# --------------------------------------------------------------------------- settings


def _settings(tmp_path: Path, **fields: object) -> WorkerSettings:
    return WorkerSettings.load(checkpoint=tmp_path, bootstrap_servers="k:1", **fields)


def test_settings_build_sources(tmp_path: Path, server: _Server) -> None:
    settings = _settings(
        tmp_path,
        fetch_allow_cidrs="127.0.0.1/32, 10.1.0.0/16",
        fetch_total_timeout_s=2,
        fetch_retries=0,
    )
    assert settings.fetch_allow_cidrs == ("127.0.0.1/32", "10.1.0.0/16")
    sources = ImageSources.from_settings(settings)
    assert sources.retry.attempts == 1
    assert sources.fetch(url_upload(f"http://127.0.0.1:{server.port}/ok")) == IMAGE
    disabled = ImageSources.from_settings(_settings(tmp_path, fetch_enabled=False))
    assert fetch_error(disabled, "http://127.0.0.1/ok").reason == "scheme_not_enabled"


def test_settings_defaults_refuse_loopback(tmp_path: Path, server: _Server) -> None:
    sources = ImageSources.from_settings(_settings(tmp_path))
    error = fetch_error(sources, f"http://127.0.0.1:{server.port}/ok")
    assert error.reason == "ssrf_refused"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"fetch_allow_cidrs": ["10.0.0.1/8"]}, "fetch_allow_cidrs"),
        ({"fetch_allow_cidrs": "not-a-cidr"}, "not a CIDR"),
        ({"fetch_allow_hosts": ["bad/host"]}, "fetch_allow_hosts"),
        ({"fetch_total_timeout_s": 0}, "fetch_total_timeout_s"),
        ({"fetch_max_redirects": 11}, "fetch_max_redirects"),
        ({"fetch_retries": -1}, "fetch_retries"),
        ({"fetch_retry_max_s": -1}, "fetch_retry_max_s"),
    ],
)
def test_settings_validation(tmp_path: Path, fields: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        _settings(tmp_path, **fields)
