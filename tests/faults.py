"""Fault-injection helpers: `clipguard serve` processes, traffic, output tallies, probes.

Everything here talks to real processes over loopback: the embedded broker, `clipguard serve`
subprocesses (started with `python -m clipguard.cli serve`), an HTTP server that drips bytes.
Every loop is bounded in count and in time. Nothing imports the worker's internals, so the
suite judges the worker only by what it publishes, commits, answers on its health endpoints
and how its process ends.

Settings go to `serve` as the public flags of DESIGN.md where they exist, the rest as
`CLIPGUARD_<NAME>` environment variables (every setting is one; a name today's worker does
not know yet is only warned about and ignored).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import http.server
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import image_bytes
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka_fixture import create_topics, unique_topic

from clipguard.cli.produce import upload_event

#: Fast group joins on Tansu (DESIGN.md "Real components"): 6 s sessions, 1 s heartbeats.
SESSION_TIMEOUT_S = 6.0
BASE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "CLIPGUARD_SESSION_TIMEOUT_MS": str(int(SESSION_TIMEOUT_S * 1000)),
    "CLIPGUARD_HEARTBEAT_INTERVAL_MS": "1000",
    "CLIPGUARD_METRICS_HOST": "127.0.0.1",
}
#: Settings that have a public `serve` flag (DESIGN.md "Command line"); the rest go by env.
FLAGS = {
    "checkpoint",
    "bootstrap_servers",
    "input_topic",
    "output_topic",
    "dlq_topic",
    "group_id",
    "metrics_port",
    "max_batch_size",
    "max_batch_wait_ms",
}
METRICS_LINE = re.compile(rb"metrics on http://([0-9.]+):(\d+)/metrics")
#: Exit codes of the contract (README "Serving").
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_BRAKE, EXIT_BROKER, EXIT_SIGNAL = 0, 1, 2, 3, 4, 130


# -- topics ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topics:
    input: str
    output: str
    dlq: str
    group: str
    partitions: int

    def create(self, bootstrap: str) -> Topics:
        create_topics(bootstrap, {self.input: self.partitions, self.output: 1, self.dlq: 1})
        return self


def new_topics(bootstrap: str, partitions: int = 3, prefix: str = "f") -> Topics:
    """Fresh input/output/dead-letter topics and a fresh group, created on the broker."""
    return Topics(
        unique_topic(f"{prefix}-uploads"),
        unique_topic(f"{prefix}-verdicts"),
        unique_topic(f"{prefix}-dlq"),
        unique_topic(f"{prefix}-group"),
        partitions,
    ).create(bootstrap)


# -- `clipguard serve` processes ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(url: str, timeout: float = 0.5) -> int | None:
    """The HTTP status of a GET, or None when nothing answered in time."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):  # refused, reset, timed out
        return None


class Serve:
    """One `clipguard serve` subprocess with its stderr in a file; never left running."""

    def __init__(
        self,
        name: str,
        checkpoint: Path,
        bootstrap: str,
        topics: Topics,
        log_dir: Path,
        **settings: Any,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        values: dict[str, Any] = {
            "checkpoint": checkpoint,
            "bootstrap_servers": bootstrap,
            "input_topic": topics.input,
            "output_topic": topics.output,
            "dlq_topic": topics.dlq,
            "group_id": topics.group,
            "metrics_port": 0,
            "max_batch_size": 8,
            "max_batch_wait_ms": 20,
            "client_id": name,
            **settings,
        }
        self.command = [sys.executable, "-m", "clipguard.cli", "serve"]
        self.env = {**os.environ, **BASE_ENV}
        for key, value in values.items():
            if value is None:
                continue
            if key in FLAGS:
                self.command += ["--" + key.replace("_", "-"), str(value)]
            else:
                self.env["CLIPGUARD_" + key.upper()] = str(value)
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._port: int | None = None

    # lifecycle

    def start(self) -> Serve:
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self.started_at = time.monotonic()
        self._port = None
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL and reap (no clean-up of any kind in the worker)."""
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)

    def terminate(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM; (exit code or None if still running after ``timeout``, seconds taken).

        A worker that outlives ``timeout`` is SIGKILLed afterwards (and reported as None).
        """
        assert self.process is not None
        started = time.monotonic()
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
            self.kill()
        return code, time.monotonic() - started

    def wait_exit(self, timeout: float) -> int | None:
        assert self.process is not None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    # endpoints

    def metrics_port(self, timeout: float = 90.0) -> int:
        """The port from the "metrics on http://HOST:PORT/metrics" line of this run's log."""
        deadline = time.monotonic() + timeout
        while self._port is None and time.monotonic() < deadline and self.alive():
            found = METRICS_LINE.findall(self.log_path.read_bytes())
            if found:
                self._port = int(found[-1][1])
                break
            time.sleep(0.1)
        if self._port is None:
            raise AssertionError(
                f"{self.name}: no metrics line (exit {self.returncode}):\n{self.log_tail()}"
            )
        return self._port

    def status(self, path: str, timeout: float = 0.5) -> int | None:
        if self._port is None:
            return None
        return http_status(f"http://127.0.0.1:{self._port}{path}", timeout)

    def metrics_text(self) -> str:
        try:
            url = f"http://127.0.0.1:{self._port}/metrics"
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read().decode()
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Block until /readyz answers 200; returns seconds since start."""
        self.metrics_port(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            if self.status("/readyz") == 200:
                return time.monotonic() - self.started_at
            time.sleep(0.1)
        raise AssertionError(
            f"{self.name} not ready after {timeout:.0f}s (exit {self.returncode}):\n"
            f"{self.log_tail()}"
        )

    # memory

    def memory_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) of the process, in KiB."""
        values: dict[str, int] = {}
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    values[name] = int(rest.split()[0])
        return values


class Fleet:
    """Every `serve` process a test starts; whatever still runs at the end is killed."""

    def __init__(self, checkpoint: Path, bootstrap: str, topics: Topics, log_dir: Path, **base):
        self.checkpoint = checkpoint
        self.bootstrap = bootstrap
        self.topics = topics
        self.log_dir = log_dir
        self.base = base
        self.members: list[Serve] = []

    def spawn(self, name: str, **settings: Any) -> Serve:
        worker = Serve(
            name,
            self.checkpoint,
            self.bootstrap,
            self.topics,
            self.log_dir,
            **{**self.base, **settings},
        )
        self.members.append(worker)
        return worker.start()

    def close(self) -> None:
        for worker in self.members:
            if worker.alive():
                worker.terminate(timeout=5)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- traffic -------------------------------------------------------------------------------------


def small_events(
    count: int, prefix: str, size: tuple[int, int] = (48, 40)
) -> list[tuple[bytes, bytes]]:
    """Valid upload events with tiny PNGs: (key, value) pairs."""
    return [
        (
            f"{prefix}-{i}".encode(),
            upload_event(
                image_bytes(size=size, color=(i % 256, (i * 7) % 256, 90)), f"{prefix}-{i}"
            ),
        )
        for i in range(count)
    ]


def producer(bootstrap: str, **extra: Any) -> KafkaProducer:
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=2,
        max_request_size=64 << 20,
        **extra,
    )


@dataclass
class Sent:
    key: bytes
    partition: int
    offset: int
    at: float  # monotonic time the broker acknowledged it


def produce(
    bootstrap: str, topic: str, messages: Iterable[tuple[bytes | None, bytes]], timeout: float = 60
) -> list[Sent]:
    """Send (key, value) pairs and wait for each acknowledgement."""
    client = producer(bootstrap)
    try:
        futures = [(key, client.send(topic, key=key, value=value)) for key, value in messages]
        client.flush(timeout=timeout)
        sent = []
        for key, future in futures:
            meta = future.get(timeout=timeout)
            sent.append(Sent(key or b"", meta.partition, meta.offset, time.monotonic()))
        return sent
    finally:
        client.close(timeout=5)


class Traffic:
    """A steady stream of valid events at ``rate`` per second on a thread, until stopped.

    Bounded by ``max_seconds``; send failures (a frozen or restarted broker) are counted,
    never raised, and an event only counts as sent once the broker acknowledged it.
    """

    def __init__(
        self, bootstrap: str, topic: str, rate: float, prefix: str, max_seconds: float = 300
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.rate = rate
        self.prefix = prefix
        self.max_seconds = max_seconds
        self.sent: list[Sent] = []
        self.failed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"traffic-{prefix}", daemon=True)
        self._pngs = [image_bytes(size=(48, 40), color=(c, 60, 200 - c)) for c in range(0, 250, 10)]

    def _ack(self, key: bytes) -> Callable[[Any], None]:
        def done(meta: Any) -> None:
            with self._lock:
                self.sent.append(Sent(key, meta.partition, meta.offset, time.monotonic()))

        return done

    def _fail(self, _exc: BaseException) -> None:
        with self._lock:
            self.failed += 1

    def _run(self) -> None:
        client = producer(self.bootstrap, request_timeout_ms=10_000, max_block_ms=10_000)
        started = time.monotonic()
        i = 0
        try:
            while not self._stop.is_set() and time.monotonic() - started < self.max_seconds:
                key = f"{self.prefix}-{i}"
                value = upload_event(self._pngs[i % len(self._pngs)], key)
                try:
                    future = client.send(self.topic, key=key.encode(), value=value)
                    future.add_callback(self._ack(key.encode()))
                    future.add_errback(self._fail)
                except Exception as exc:  # noqa: BLE001 - e.g. metadata timeout while frozen
                    self._fail(exc)
                i += 1
                self._stop.wait(max(0.0, started + i / self.rate - time.monotonic()))
            client.flush(timeout=30)
        finally:
            client.close(timeout=5)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> list[Sent]:
        self._stop.set()
        self._thread.join(timeout=60)
        with self._lock:
            return list(self.sent)

    def __enter__(self) -> Traffic:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- outputs -------------------------------------------------------------------------------------


@dataclass
class DeadLetter:
    key: bytes | None
    value: bytes
    headers: dict[str, str]
    at: float

    @property
    def named(self) -> tuple[int, int]:
        return int(self.headers["clipguard.original.partition"]), int(
            self.headers["clipguard.original.offset"]
        )


@dataclass
class VerdictSeen:
    verdict: dict[str, Any]
    at: float  # monotonic time our reader saw it

    @property
    def named(self) -> tuple[int, int]:
        return self.verdict["input"]["partition"], self.verdict["input"]["offset"]


@dataclass
class Tally:
    sent: int
    verdicts: int
    dead_letters: collections.Counter[str]
    duplicates: int
    lost: list[tuple[int, int]]
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self, title: str) -> str:
        parts = [
            f"events sent {self.sent}",
            f"verdicts {self.verdicts}",
            f"dead letters {sum(self.dead_letters.values())} {dict(self.dead_letters)}",
            f"duplicates {self.duplicates}",
            f"lost {len(self.lost)}",
            *(f"{k} {v}" for k, v in self.extra.items()),
        ]
        return f"[{title}] " + ", ".join(parts)


class Outputs:
    """Reads the verdict and dead-letter topics on a thread from the beginning, as they grow."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        self.topics = topics
        self.verdicts: list[VerdictSeen] = []
        self.dead_letters: list[DeadLetter] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=50,
            max_partition_fetch_bytes=64 << 20,
            fetch_max_bytes=128 << 20,
        )
        self._partitions = [TopicPartition(topics.output, 0), TopicPartition(topics.dlq, 0)]
        self._consumer.assign(self._partitions)
        self._consumer.seek_to_beginning(*self._partitions)
        self._thread = threading.Thread(target=self._run, name="outputs", daemon=True)
        self.errors = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                polled = self._consumer.poll(timeout_ms=100)
            except Exception:  # noqa: BLE001 - a broker outage: keep trying until stopped
                self.errors += 1
                self._stop.wait(0.2)
                continue
            now = time.monotonic()
            for tp, records in polled.items():
                for record in records:
                    if tp.topic == self.topics.output:
                        seen = VerdictSeen(json.loads(record.value), now)
                        with self._lock:
                            self.verdicts.append(seen)
                    else:
                        headers = {k: v.decode("utf-8", "replace") for k, v in record.headers}
                        dead = DeadLetter(record.key, record.value, headers, now)
                        with self._lock:
                            self.dead_letters.append(dead)

    def start(self) -> Outputs:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        with contextlib.suppress(Exception):
            self._consumer.close()

    def __enter__(self) -> Outputs:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def snapshot(self) -> tuple[list[VerdictSeen], list[DeadLetter]]:
        with self._lock:
            return list(self.verdicts), list(self.dead_letters)

    def named(self) -> set[tuple[int, int]]:
        verdicts, dead = self.snapshot()
        names = {v.named for v in verdicts if v.verdict["input"]["topic"] == self.topics.input}
        names |= {
            d.named for d in dead if d.headers.get("clipguard.original.topic") == self.topics.input
        }
        return names

    def wait_for(
        self, expect: set[tuple[int, int]], timeout: float, alive: Callable[[], bool] = lambda: True
    ) -> set[tuple[int, int]]:
        """Block until every expected (partition, offset) is named; returns what is missing."""
        deadline = time.monotonic() + timeout
        missing = expect - self.named()
        while missing and time.monotonic() < deadline and alive():
            time.sleep(0.1)
            missing = expect - self.named()
        return missing

    def ids(self) -> set[str]:
        """Event ids (verdicts) and keys (dead letters) seen so far."""
        verdicts, dead = self.snapshot()
        seen = {v.verdict["event_id"] for v in verdicts}
        return seen | {d.key.decode(errors="replace") for d in dead if d.key}

    def wait_sent(
        self, sent: list[Sent], timeout: float, alive: Callable[[], bool] = lambda: True
    ) -> list[Sent]:
        """Block until every sent event is accounted for; returns the ones that are not.

        An event the broker acknowledged without an offset (offset -1: Tansu answers a
        producer's retried, de-duplicated batch that way) is looked up by its id instead.
        """
        deadline = time.monotonic() + timeout
        while True:
            named, ids = self.named(), self.ids()
            missing = [
                s
                for s in sent
                if (
                    (s.partition, s.offset) not in named
                    if s.offset >= 0
                    else s.key.decode() not in ids
                )
            ]
            if not missing or time.monotonic() >= deadline or not alive():
                return missing
            time.sleep(0.1)

    def wait_until(self, predicate: Callable[[Outputs], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.1)
        return predicate(self)

    def tally(self, sent: Iterable[Sent | tuple[int, int]]) -> Tally:
        """Counts against what was sent: lost = sent but named by no verdict or dead letter.

        An event the broker acknowledged without an offset (-1: Tansu's answer to a
        producer's retried, de-duplicated batch) is accounted for by its event id.
        """
        sent = [s if isinstance(s, Sent) else Sent(b"", s[0], s[1], 0.0) for s in sent]
        verdicts, dead = self.snapshot()
        verdicts = [v for v in verdicts if v.verdict["input"]["topic"] == self.topics.input]
        dead = [d for d in dead if d.headers.get("clipguard.original.topic") == self.topics.input]
        by_verdict = collections.Counter(v.named for v in verdicts)
        by_dead = collections.Counter(d.named for d in dead)
        named = set(by_verdict) | set(by_dead)
        duplicates = sum(max(by_verdict[n], by_dead[n]) - 1 for n in named)
        reasons = collections.Counter(
            f"{d.headers.get('clipguard.error.stage')}/{d.headers.get('clipguard.error.reason')}"
            for d in dead
        )
        ids = {v.verdict["event_id"] for v in verdicts}
        ids |= {d.key.decode(errors="replace") for d in dead if d.key}
        lost = sorted(
            (s.partition, s.offset)
            for s in sent
            if (
                (s.partition, s.offset) not in named
                if s.offset >= 0
                else s.key.decode(errors="replace") not in ids
            )
        )
        tally = Tally(len(sent), len(verdicts), reasons, duplicates, lost)
        unknown = sum(s.offset < 0 for s in sent)
        if unknown:
            tally.extra["acknowledged without offset"] = unknown
        return tally


def longest_gap(times: list[float], start: float, end: float) -> tuple[float, float]:
    """The longest stretch in [start, end] without an output, and where it began."""
    points = sorted(t for t in times if start <= t <= end)
    edges = [start, *points, end]
    gaps = [(b - a, a) for a, b in itertools.pairwise(edges)]
    return max(gaps) if gaps else (end - start, start)


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int | None]:
    """The group's committed positions, read without joining the group."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        consumer.close(autocommit=False)


def ends(sent: Iterable[Sent]) -> dict[int, int]:
    result: dict[int, int] = {}
    for s in sent:
        result[s.partition] = max(result.get(s.partition, 0), s.offset + 1)
    return result


def wait_committed(
    bootstrap: str, topics: Topics, sent: list[Sent], timeout: float
) -> dict[int, int | None]:
    """Poll the group's commits until they reach the end of what was sent (bounded)."""
    want = ends(sent)
    deadline = time.monotonic() + timeout
    seen: dict[int, int | None] = {}
    while time.monotonic() < deadline:
        seen = committed(bootstrap, topics.group, topics.input, topics.partitions)
        if all((seen.get(p) or 0) >= end for p, end in want.items()):
            break
        time.sleep(0.5)
    return seen


# -- health timeline -------------------------------------------------------------------------------


class HealthWatch:
    """Polls /readyz and /livez of one worker with short timeouts and keeps the transitions."""

    def __init__(self, worker: Serve, every: float = 0.25, timeout: float = 0.5) -> None:
        self.worker = worker
        self.every = every
        self.timeout = timeout
        self.samples: list[tuple[float, int | None, int | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health", daemon=True)
        self.origin = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set() and self.worker.alive():
            now = time.monotonic()
            ready = self.worker.status("/readyz", self.timeout)
            live = self.worker.status("/livez", self.timeout)
            self.samples.append((now, ready, live))
            self._stop.wait(max(0.0, now + self.every - time.monotonic()))

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def between(self, start: float, end: float) -> list[tuple[float, int | None, int | None]]:
        return [s for s in self.samples if start <= s[0] <= end]

    def longest_run(
        self, bad: Callable[[int | None, int | None], bool], since: float = 0.0
    ) -> float:
        """Longest stretch (seconds) of consecutive samples (taken from ``since`` on) where
        ``bad(ready, live)`` held."""
        longest, run_start = 0.0, None
        for at, ready, live in self.samples:
            if at < since:
                continue
            if bad(ready, live):
                run_start = at if run_start is None else run_start
                longest = max(longest, at - run_start)
            else:
                run_start = None
        return longest

    def timeline(self, marks: dict[str, float] | None = None) -> str:
        """Transitions only: "+12.3s ready=503 live=200", plus named marks, in time order."""
        rows: list[tuple[float, str]] = []
        last: tuple[int | None, int | None] | None = None
        for at, ready, live in self.samples:
            if (ready, live) != last:
                rows.append((at, f"readyz={ready} livez={live}"))
                last = (ready, live)
        for name, at in (marks or {}).items():
            rows.append((at, f"-- {name}"))
        return "\n".join(f"  +{at - self.origin:6.2f}s {text}" for at, text in sorted(rows))


# -- a slow image server -------------------------------------------------------------------------


class DripServer:
    """Loopback HTTP server: ``/drip/...`` answers 200 and then one byte a second (bounded);
    anything else gets a small PNG at once. Counts the requests per path kind."""

    def __init__(self, drip_seconds: float = 120.0) -> None:
        owner = self
        self.drip_seconds = drip_seconds
        self.hits: collections.Counter[str] = collections.Counter()
        self._closing = threading.Event()
        self.png = image_bytes(size=(64, 64), color=(200, 30, 30))

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                if self.path.startswith("/drip/"):
                    owner.hits["drip"] += 1
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", "10000000")
                    self.end_headers()
                    deadline = time.monotonic() + owner.drip_seconds
                    while time.monotonic() < deadline and not owner._closing.is_set():
                        try:
                            self.wfile.write(b"\xff")
                            self.wfile.flush()
                        except OSError:
                            return
                        owner._closing.wait(1.0)
                    return
                owner.hits["fast"] += 1
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(owner.png)))
                self.end_headers()
                self.wfile.write(owner.png)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> DripServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()


def url_event(url: str, event_id: str) -> bytes:
    return json.dumps({"schema_version": 1, "event_id": event_id, "image_url": url}).encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP a process for the duration of the block; SIGCONT it whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
