"""Process probes for the bench: wall and CPU time, resident memory, the commit measured."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cores() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _proc_status_kb(key: str, pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size; falls back to the peak where /proc is missing."""
    kb = _proc_status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """The process's lifetime peak RSS (VmHWM, or ru_maxrss)."""
    kb = _proc_status_kb("VmHWM")
    if kb is None:
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return kb * 1024


def process_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of another process (the embedded broker), from /proc."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Span:
    """Wall time, this process's CPU time and the broker's CPU time over one measurement."""

    broker_pid: int | None = None
    wall: float = 0.0
    cpu: float = 0.0
    broker_cpu: float | None = None
    _start: tuple[float, float, float | None] = field(default=(0.0, 0.0, None), repr=False)

    def __enter__(self) -> Span:
        self._start = (
            time.perf_counter(),
            time.process_time(),
            process_cpu_seconds(self.broker_pid),
        )
        return self

    def __exit__(self, *exc: object) -> None:
        wall0, cpu0, broker0 = self._start
        self.wall = time.perf_counter() - wall0
        self.cpu = time.process_time() - cpu0
        broker1 = process_cpu_seconds(self.broker_pid)
        if broker0 is not None and broker1 is not None:
            self.broker_cpu = broker1 - broker0

    def usage(self) -> dict[str, Any]:
        """CPU cores kept busy on average: this process, and the broker where known."""
        wall = max(self.wall, 1e-9)
        usage: dict[str, Any] = {"process_cpu_cores": round(self.cpu / wall, 2)}
        if self.broker_cpu is not None:
            usage["broker_cpu_cores"] = round(self.broker_cpu / wall, 2)
        return usage


class RssSampler:
    """Samples this process's RSS on a thread; ``peak`` is the largest sample seen."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.peak = rss_bytes()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())
            self.samples += 1

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def source_commit() -> str | None:
    """The git commit of the clipguard source being measured, ``+dirty`` when edited."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None
