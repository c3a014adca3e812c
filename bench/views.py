"""The cost of views: images/s of the model and of decode+views at 1 view and at the default.

Each image costs the model V forward passes (one batch of all views, aggregated after), and
the decode stage V crops instead of one; the bench puts both side by side on the same mix.
Under a ``resize`` checkpoint a square image has one view whatever the count, so the views
are measured under ``crop`` (native crops) there, and the report says so.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from clipguard.bench.mix import ImageMix
from clipguard.detector import DecodeLimits, InferenceEngine, decode_image
from clipguard.detector.preprocess import PreprocessConfig, preprocess_views


def _config(engine: InferenceEngine, views: int) -> PreprocessConfig:
    base = engine.preprocess.model_dump()
    policy = "crop" if base["policy"] == "resize" else base["policy"]
    return PreprocessConfig.model_validate({**base, "policy": policy, "views": views})


def _model_rate(engine: InferenceEngine, batch: list[torch.Tensor], duration_s: float) -> float:
    engine.scores(batch)  # warm: allocations for this many views
    times: list[float] = []
    while len(times) < 3 or sum(times) < duration_s:
        started = time.perf_counter()
        engine.scores(batch)
        times.append(time.perf_counter() - started)
    return len(batch) / statistics.median(times)


def _decode_rate(mix: ImageMix, cfg: PreprocessConfig, duration_s: float) -> float:
    count, started = 0, time.perf_counter()
    limits = DecodeLimits()
    while count < 10 or time.perf_counter() - started < duration_s:
        preprocess_views(decode_image(mix.jpegs[count % len(mix.jpegs)], limits), cfg)
        count += 1
    return count / (time.perf_counter() - started)


def measure_views(
    engine: InferenceEngine,
    mix: ImageMix,
    batch_size: int,
    counts: tuple[int, ...],
    duration_s: float,
) -> dict[str, Any]:
    """Per view count: views per image really cut, model images/s, decode+views images/s
    per core; ratios against one view."""
    images = [decode_image(jpeg) for jpeg in mix.jpegs[:batch_size]]
    rows: dict[str, Any] = {}
    for count in dict.fromkeys(counts):
        cfg = _config(engine, count)
        batch = [preprocess_views(images[i % len(images)], cfg) for i in range(batch_size)]
        rows[str(count)] = {
            "views_per_image": sum(v.shape[0] for v in batch) / len(batch),
            "model_images_per_s": _model_rate(engine, batch, duration_s),
            "decode_images_per_s_per_core": _decode_rate(mix, cfg, duration_s),
        }
    one = rows[str(counts[0])]
    for row in rows.values():
        row["model_ratio"] = row["model_images_per_s"] / one["model_images_per_s"]
        row["decode_ratio"] = (
            row["decode_images_per_s_per_core"] / one["decode_images_per_s_per_core"]
        )
    return {
        "policy": _config(engine, 1).policy,
        "aggregate": engine.preprocess.aggregate,
        "counts": rows,
    }


def views_lines(views: dict[str, Any] | None) -> list[str]:
    """Table rows for the bench's summary."""
    if not views:
        return []
    lines = [f"{'  views (' + views['policy'] + ')':<30}{'model/s':>10}  decode+views per core"]
    for count, row in views["counts"].items():
        lines.append(
            f"{'    ' + count + ' view(s), ' + format(row['views_per_image'], '.1f') + ' cut':<30}"
            f"{row['model_images_per_s']:>10.1f}  {row['decode_images_per_s_per_core']:.1f} "
            f"images/s ({row['model_ratio']:.2f}x / {row['decode_ratio']:.2f}x one view)"
        )
    return lines
