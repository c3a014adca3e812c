"""The prepare stage: records in, model-ready pixels (or failure outcomes) out, as they finish.

Two pools, so a slow image server can only hold back its own event:

- the CPU pool parses events and decodes images (Pillow releases the GIL while decoding);
- the I/O pool fetches ``http(s)://`` and ``file://`` images, each event within
  ``fetch_deadline_s`` of its consumption, all retries included.

Every submitted record ends in exactly one call of ``deliver`` (pixels or failure), in
whatever order the work finishes: the next stage batches what is ready, and the offset
tracker turns out-of-order acknowledgements into in-order commits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from clipguard.consumer.batching import Pending
from clipguard.consumer.judge import Decoded, Judge
from clipguard.consumer.records import Upload

log = logging.getLogger(__name__)

Deliver = Callable[[Decoded], None]


class PrepareStage:
    def __init__(
        self,
        judge: Judge,
        deliver: Deliver,
        decode_workers: int,
        fetch_workers: int,
        fetch_deadline_s: float,
    ) -> None:
        self.judge = judge
        self.deliver = deliver
        self.fetch_deadline_s = fetch_deadline_s
        self._cpu = ThreadPoolExecutor(decode_workers, thread_name_prefix="clipguard-decode")
        self._io = ThreadPoolExecutor(fetch_workers, thread_name_prefix="clipguard-fetch")

    def submit(self, item: Pending) -> None:
        self._cpu.submit(self._step, item, None, self._parse, item)

    def close(self) -> None:
        """Stop at once: queued work is dropped, its records stay uncommitted (redelivered)."""
        self._io.shutdown(wait=False, cancel_futures=True)
        self._cpu.shutdown(wait=False, cancel_futures=True)

    # -- steps (pool threads) -------------------------------------------------------------

    def _step(self, item: Pending, upload: Upload | None, fn: Callable[..., Any], *args: Any):
        try:
            fn(*args)
        except RuntimeError as exc:
            if "shutdown" in str(exc):  # a pool closed under us: the worker is stopping
                return
            self.deliver(self.judge.failed(item, exc, upload))
        except Exception as exc:  # noqa: BLE001 - every failure becomes this record's outcome
            self.deliver(self.judge.failed(item, exc, upload))

    def _parse(self, item: Pending) -> None:
        upload = self.judge.parse(item)
        if upload.image_bytes is not None:
            self.deliver(self.judge.decode(item, upload, upload.image_bytes))
        else:
            self._io.submit(self._step, item, upload, self._fetch, item, upload)

    def _fetch(self, item: Pending, upload: Upload) -> None:
        data = self.judge.sources.fetch(upload, item.received_at + self.fetch_deadline_s)
        self._cpu.submit(self._step, item, upload, self._decode, item, upload, data)

    def _decode(self, item: Pending, upload: Upload, data: bytes) -> None:
        self.deliver(self.judge.decode(item, upload, data))
