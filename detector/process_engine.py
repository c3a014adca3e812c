"""The model in a process of its own, so decode threads and Kafka clients never hold its GIL.

In one process the forward pass competes for the interpreter lock with JSON parsing, base64,
the Kafka clients' Python code and the decode pool: every Python step between two kernels
waits for it (docs/bench.md, "the model off the GIL"). :class:`ProcessEngine` builds the real
engine in a spawned child and feeds it through shared memory: the parent copies a batch's
views into a shared tensor the child already maps, sends their count over a pipe and gets
the predictions back. The child owns the weights; the parent only keeps the facts the worker
reports (manifest, input contract, device, dtype).

It has the engine's serving surface (``manifest``, ``preprocess``, ``predict_tensors``,
``warm_up``, ``device``, ``dtype``, ``dtype_reason``), so the worker runs either unchanged:
one call at a time, one prediction per image, the same numbers.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.connection
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as torch_mp

from clipguard.detector.aggregate import Pixels, flatten_views
from clipguard.detector.checkpoint import Manifest
from clipguard.detector.engine import InferenceEngine, Prediction
from clipguard.detector.errors import ClipguardError
from clipguard.detector.preprocess import PreprocessConfig

log = logging.getLogger(__name__)

EngineFactory = Callable[[], InferenceEngine]
#: How often a waiting parent checks that the child is still alive.
POLL_S = 0.5


class ModelProcessError(ClipguardError):
    """The model's process failed to start, died, or failed on a batch."""

    stage = "inference"
    reason = "model_failed"
    internal = True


@dataclass(frozen=True)
class EngineFacts:
    """What the parent needs to know of the engine the child built."""

    manifest: Manifest
    preprocess: PreprocessConfig
    device: torch.device
    dtype: torch.dtype
    dtype_reason: str
    max_batch_size: int


def _serve(factory: EngineFactory, conn: multiprocessing.connection.Connection) -> None:
    """The child: build and warm the engine, then answer batches until the pipe closes."""
    # Ctrl-C and SIGTERM go to the whole process group; the parent drains its in-flight
    # batches through us before it stops, so only the parent's pipe may end this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine = factory()
        engine.warm_up()
        conn.send(
            (
                "ready",
                EngineFacts(
                    engine.manifest,
                    engine.preprocess,
                    engine.device,
                    engine.dtype,
                    engine.dtype_reason,
                    engine.config.max_batch_size,
                ),
            )
        )
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    views = torch.empty(0)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        kind = message[0]
        if kind == "stop":
            return
        if kind == "buffer":
            views = message[1]
            continue
        counts: list[int] = message[1]
        try:
            parts = list(torch.split(views[: sum(counts)], counts))
            conn.send(("ok", engine.predict_tensors(parts)))
        except Exception as exc:  # noqa: BLE001 - this batch fails, the process goes on
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class ProcessEngine:
    """An :class:`InferenceEngine` served from a spawned process; call from one thread."""

    def __init__(self, factory: EngineFactory, start_timeout_s: float = 600.0) -> None:
        self._factory = factory
        self._start_timeout_s = start_timeout_s
        self._context = torch_mp.get_context("spawn")
        self._process: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._views = torch.empty(0)
        self.restarts = 0
        self.facts = self._start()

    # -- the engine's serving surface ----------------------------------------------------

    @property
    def manifest(self) -> Manifest:
        return self.facts.manifest

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.facts.preprocess

    @property
    def device(self) -> torch.device:
        return self.facts.device

    @property
    def dtype(self) -> torch.dtype:
        return self.facts.dtype

    @property
    def dtype_reason(self) -> str:
        return self.facts.dtype_reason

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def warm_up(self) -> None:
        """The child warmed up before it reported ready; restart it if it died since."""
        if not self.alive():
            self._restart()

    def predict_tensors(self, pixels: Pixels) -> list[Prediction]:
        """Like :meth:`InferenceEngine.predict_tensors`, run by the child."""
        if not self.alive():
            self._restart()  # the last batch failed with it; this one gets a fresh child
        views, counts = flatten_views(pixels, self.preprocess.image_size)
        if not counts:
            return []
        self._ensure_capacity(views)
        self._views[: views.shape[0]].copy_(views)
        status, payload = self._call(("predict", counts))
        if status != "ok":
            raise ModelProcessError(f"the model process failed on a batch: {payload}")
        predictions: list[Prediction] = payload
        if len(predictions) != len(counts):  # one output per input, always
            raise RuntimeError(f"{len(counts)} inputs gave {len(predictions)} predictions")
        return predictions

    # -- the child's lifecycle -----------------------------------------------------------

    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the child (it finishes no batch: the caller has none outstanding)."""
        process, conn = self._process, self._conn
        self._process, self._conn = None, None
        if conn is not None:
            with contextlib.suppress(OSError, ValueError):  # already gone: nothing to stop
                conn.send(("stop",))
            conn.close()
        if process is not None:
            process.join(timeout_s)
            if process.is_alive():
                process.kill()
                process.join(timeout_s)

    def __enter__(self) -> ProcessEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> EngineFacts:
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_serve, args=(self._factory, child), name="clipguard-model", daemon=True
        )
        process.start()
        child.close()
        self._process, self._conn = process, parent
        self._views = torch.empty(0)  # the new child maps nothing yet
        status, payload = self._receive(self._start_timeout_s)
        if status != "ready":
            self.close()
            raise ModelProcessError(f"the model process did not start: {payload}")
        facts: EngineFacts = payload
        log.info("model process %d ready: %s on %s", process.pid, str(facts.dtype), facts.device)
        return facts

    def _restart(self) -> None:
        self.close()
        self.restarts += 1
        log.warning("restarting the model process (restart %d)", self.restarts)
        self.facts = self._start()

    def _ensure_capacity(self, views: torch.Tensor) -> None:
        """A shared tensor the child maps, big enough for this batch's views."""
        needed = views.shape[0]
        if (
            self._views.shape[0] >= needed
            and self._views.shape[1:] == views.shape[1:]
            and self._views.dtype == views.dtype
        ):
            return
        rows = max(needed, self.facts.max_batch_size)
        self._views = torch.empty((rows, *views.shape[1:]), dtype=views.dtype).share_memory_()
        assert self._conn is not None
        self._conn.send(("buffer", self._views))

    def _call(self, message: tuple[Any, ...]) -> tuple[str, Any]:
        assert self._conn is not None
        try:
            self._conn.send(message)
        except (OSError, ValueError) as exc:
            raise ModelProcessError(f"the model process is gone: {exc}") from exc
        return self._receive(None)

    def _receive(self, timeout_s: float | None) -> tuple[str, Any]:
        """The child's answer; raises when it dies (or, with a timeout, never answers)."""
        assert self._conn is not None and self._process is not None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._conn.poll(POLL_S):
            if not self._process.is_alive():
                code = self._process.exitcode
                raise ModelProcessError(f"the model process died (exit code {code})")
            if deadline is not None and time.monotonic() > deadline:
                raise ModelProcessError(f"the model process did not answer in {timeout_s:g}s")
        try:
            return self._conn.recv()
        except (EOFError, OSError) as exc:
            raise ModelProcessError(f"the model process died: {exc}") from exc
