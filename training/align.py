"""``eval --align``: score every image again after one format, quality and size policy.

A detector can learn the benchmark instead of the task: reals that are all PNG and fakes
that are all JPEG, or reals and fakes of different sizes. Re-encoding every image, real and
generated alike, the same way (a centre square of at most ``size`` pixels, never resampled,
so pixel-level fingerprints survive; then JPEG at one quality) removes those differences. A
detector that learned the task barely moves; one that learned the shortcut falls, and the
report says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from clipguard.detector.engine import InferenceEngine
from clipguard.training.augment import jpeg_roundtrip
from clipguard.training.data import LabelledImage
from clipguard.training.evaluate import Scored, score_items, summarize

#: A drop larger than this (accuracy, balanced accuracy or AUC) is reported as a shortcut.
WARN_GAP = 0.05


class AlignPolicy(BaseModel):
    """What every image becomes before the aligned scoring."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str = "JPEG"
    quality: int = Field(default=75, ge=1, le=100)
    #: Centre square of at most this many pixels (cropped, never resampled).
    size: int = Field(default=256, ge=16)

    def __call__(self, image: Image.Image) -> Image.Image:
        side = min(self.size, image.width, image.height)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        return jpeg_roundtrip(image.crop((left, top, left + side, top + side)), self.quality)


def gaps(plain: dict[str, Any], aligned: dict[str, Any]) -> dict[str, float | None]:
    """Plain minus aligned, per metric (positive = the detector did worse when aligned)."""
    out: dict[str, float | None] = {}
    for key in ("accuracy", "balanced_accuracy", "auc", "ap"):
        p, a = plain.get(key), aligned.get(key)
        out[key] = None if p is None or a is None else round(p - a, 6)
    return out


def warnings_for(plain: dict[str, Any], aligned: dict[str, Any], policy: AlignPolicy) -> list[str]:
    """One line per row (overall, each generator) whose metrics fall by more than WARN_GAP."""
    rows = [("overall", plain, aligned)]
    rows += [
        (f"generator {name}", metrics, aligned.get("per_generator", {}).get(name, {}))
        for name, metrics in plain.get("per_generator", {}).items()
    ]
    found = []
    for name, p, a in rows:
        drops = {k: v for k, v in gaps(p, a).items() if v is not None and v > WARN_GAP}
        if drops:
            worst = ", ".join(f"{k} {p[k]:.3f} -> {a[k]:.3f}" for k in drops)
            found.append(
                f"{name}: {worst} once every image is a {policy.format} q{policy.quality} "
                f"centre square <= {policy.size} px: the detector may have learned a format "
                f"or size shortcut rather than real-vs-generated{_direction(p, a)}"
            )
    return found


def _direction(plain: dict[str, Any], aligned: dict[str, Any]) -> str:
    """Which class moved: reals newly flagged point at the format/size itself; fakes newly
    missed at traces (or a fake-only format) that the re-encoding removed."""
    hints = []
    for key, what in (
        ("real_accuracy", "reals newly flagged (their new format or size reads as generated)"),
        ("fake_accuracy", "fakes newly missed (what it detects does not survive the re-encoding)"),
    ):
        p, a = plain.get(key), aligned.get(key)
        if p is not None and a is not None and p - a > WARN_GAP:
            hints.append(f"{what}: {key} {p:.3f} -> {a:.3f}")
    return f"; {'; '.join(hints)}" if hints else ""


def aligned_report(
    engine: InferenceEngine,
    items: Sequence[LabelledImage],
    plain: dict[str, Any],
    policy: AlignPolicy,
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> tuple[dict[str, Any], Scored]:
    """The aligned metrics, their gaps to ``plain`` and the shortcut warnings."""
    scored = score_items(
        engine, items, batch_size=batch_size, transform=policy, progress=progress, desc="aligned"
    )
    overall = summarize(scored, engine.classes, engine.threshold)
    report = {
        "policy": policy.model_dump(),
        "overall": overall,
        "gap": gaps(plain, overall),
        "warnings": warnings_for(plain, overall, policy),
    }
    return report, scored
