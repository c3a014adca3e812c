"""Robustness sweep: the same evaluation after the degradations uploads really go through.

JPEG re-encoding (quality 95/75/50/30), Gaussian blur (sigma 1/2/3), downscaling (x0.5,
x0.75) and a 128-pixel thumbnail round trip (shrunk to fit 128 px, then scaled back up, as
a re-upload of a preview would be). Each is applied to the decoded image before the
checkpoint's preprocessing, then scored by the serving engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from clipguard.detector.engine import InferenceEngine
from clipguard.training.augment import gaussian_blur, jpeg_roundtrip
from clipguard.training.data import LabelledImage
from clipguard.training.evaluate import Scored, binary_metrics, score_items

KEPT_METRICS = ("accuracy", "real_accuracy", "fake_accuracy", "ap", "auc")


@dataclass(frozen=True)
class Perturbation:
    name: str
    family: str
    severity: float
    apply: Callable[[Image.Image], Image.Image]


def downscale(image: Image.Image, factor: float) -> Image.Image:
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return image.resize(size, Image.Resampling.BICUBIC)


def thumbnail_roundtrip(image: Image.Image, side: int = 128) -> Image.Image:
    small = image.copy()
    small.thumbnail((side, side), Image.Resampling.BICUBIC)
    return small.resize(image.size, Image.Resampling.BICUBIC)


def _jpeg(quality: int) -> Perturbation:
    return Perturbation(f"jpeg_q{quality}", "jpeg", quality, lambda im: jpeg_roundtrip(im, quality))


def _blur(sigma: float) -> Perturbation:
    return Perturbation(f"blur_sigma{sigma:g}", "blur", sigma, lambda im: gaussian_blur(im, sigma))


def _scale(factor: float) -> Perturbation:
    return Perturbation(
        f"downscale_{factor:g}", "downscale", factor, lambda im: downscale(im, factor)
    )


PERTURBATIONS: tuple[Perturbation, ...] = (
    *(_jpeg(q) for q in (95, 75, 50, 30)),
    *(_blur(s) for s in (1.0, 2.0, 3.0)),
    *(_scale(f) for f in (0.75, 0.5)),
    Perturbation("thumbnail_128", "thumbnail", 128, thumbnail_roundtrip),
)


def sweep(
    engine: InferenceEngine,
    items: Sequence[LabelledImage],
    *,
    clean: Scored | None = None,
    perturbations: Sequence[Perturbation] = PERTURBATIONS,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Binary metrics per perturbation (plus ``clean``), at the stored threshold."""
    results: dict[str, dict[str, Any]] = {}
    runs: list[tuple[str, str, float | None, Scored]] = []
    if clean is None:
        clean = score_items(engine, items, batch_size=batch_size)
    runs.append(("clean", "clean", None, clean))
    for p in perturbations:
        scored = score_items(
            engine, items, batch_size=batch_size, transform=p.apply, progress=progress, desc=p.name
        )
        runs.append((p.name, p.family, p.severity, scored))
    for name, family, severity, scored in runs:
        metrics = binary_metrics(scored.is_fake, scored.ai_scores.numpy(), engine.threshold)
        results[name] = {
            "family": family,
            "severity": severity,
            **{k: metrics[k] for k in KEPT_METRICS},
        }
    return results
