"""The JPEGs a batch deferred to the model's thread, decoded there in one device call.

With ``jpeg_decode_device`` on a GPU the decode stage only checks a JPEG's header (and reads
its provenance); :meth:`Judge.finish <clipguard.consumer.judge.Judge.finish>` calls
:func:`decode_deferred` first, so every event still leaves the batch with pixels or with its
failure outcome, in order, before the model runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from clipguard.consumer.config import WorkerSettings
from clipguard.detector.decode import DecodeLimits
from clipguard.detector.gpu_decode import BatchJpegDecoder
from clipguard.detector.preprocess import PreprocessConfig

if TYPE_CHECKING:
    from clipguard.consumer.judge import Decoded, Judge

log = logging.getLogger(__name__)


def jpeg_decoder(
    settings: WorkerSettings, cfg: PreprocessConfig, limits: DecodeLimits
) -> BatchJpegDecoder | None:
    """The worker's batch decoder, or None when JPEGs decode on the CPU pool (the default)."""
    if settings.jpeg_decode_device == "cpu":
        return None
    decoder = BatchJpegDecoder.create(settings.jpeg_decode_device, cfg, limits)
    if not decoder.active:
        return None
    if settings.provenance_enabled and settings.hash_list is not None:
        log.warning(
            "the hash list decodes every upload on the CPU for its PDQ hash: with "
            "jpeg_decode_device = %s JPEGs are then decoded twice",
            settings.jpeg_decode_device,
        )
    return decoder


def decode_deferred(judge: Judge, decoded: Sequence[Decoded]) -> list[Decoded]:
    """``decoded`` with every deferred JPEG decoded: pixels, or its failure as a dead letter.

    Each image's ``decode_seconds`` is its header check plus an equal share of the call.
    """
    waiting = [i for i, d in enumerate(decoded) if d.jpeg is not None and d.failure is None]
    out = list(decoded)
    if not waiting:
        return out
    decoder = judge.jpeg_decoder
    started = judge.clock()
    try:
        assert decoder is not None, "a JPEG was deferred without a batch decoder"
        results: list[torch.Tensor | Exception] = decoder.decode_jobs(
            [d.jpeg for d in (decoded[i] for i in waiting) if d.jpeg is not None]
        )
    except Exception as exc:  # noqa: BLE001 - a bug of ours: these events are dead-lettered
        results = [exc] * len(waiting)
    share = (judge.clock() - started) / len(waiting)
    for i, result in zip(waiting, results, strict=True):
        d = decoded[i]
        if isinstance(result, Exception):
            out[i] = judge.failed(d.item, result, d.upload)
            continue
        decode_s = d.decode_s + share
        judge.metrics.decode_seconds.observe(decode_s)
        out[i] = replace(d, pixels=result, decode_s=decode_s, jpeg=None)
    return out
