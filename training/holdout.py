"""The unseen-generator protocol: train on some sources, report the others as unseen.

What matters to a moderation platform is accuracy on generators that appeared after
training. A holdout run trains (train *and* val: validation picks the epoch and the
threshold, so it is training data too) on ``real`` plus the generators not held out, and
tests on fresh reals plus every generator, seen and held out alike. The source head's
classes are ``real`` + the seen generators only: a held-out generator is no class of the
checkpoint (its images carry ``UNKNOWN_SOURCE`` and their name as the group), and the
binary head is what is scored on it.

:func:`check_no_leak` is run on the very item lists handed to the loop: a held-out
generator in train or val, or a test real that is also a train/val real, stops the run.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from clipguard.training import zoo_families
from clipguard.training.data import UNKNOWN_SOURCE, LabelledImage
from clipguard.training.zoo import REAL

FLAG = "--holdout-sources"
Split = dict[str, list[LabelledImage]]
LeaveOut = Literal["generator", "family"]


class HoldoutError(ValueError):
    """A holdout that cannot be honoured: unknown names, nothing left to train on, a leak."""


@dataclass(frozen=True)
class HoldoutPlan:
    """Which generators train and which are held out (never in train or val)."""

    generators: tuple[str, ...]
    held_out: tuple[str, ...]

    @property
    def seen(self) -> tuple[str, ...]:
        return tuple(g for g in self.generators if g not in self.held_out)

    @property
    def classes(self) -> list[str]:
        """The source head's classes: ``real`` (index 0) + the seen generators."""
        return [REAL, *self.seen]

    def manifest_info(self) -> dict[str, Any]:
        """Recorded under ``training.holdout``: what ``clipguard eval`` reads back."""
        return {
            "held_out": list(self.held_out),
            "seen": list(self.seen),
            "source_head": "real + seen generators; held-out generators are no class",
        }


def resolve(
    requested: Sequence[str],
    generators: Sequence[str],
    *,
    families: Mapping[str, Sequence[str]] | None = None,
    flag: str = FLAG,
) -> HoldoutPlan:
    """Check the held-out names against the known generators (family names expand).

    Raises :class:`HoldoutError` naming ``flag`` for an unknown name, for ``real``, and when
    nothing would be left to train on.
    """
    known = list(dict.fromkeys(generators))
    families = families or {}
    chosen: list[str] = []
    unknown: list[str] = []
    for name in requested:
        if name in known:
            chosen.append(name)
        elif name in families and any(g in known for g in families[name]):
            chosen += [g for g in families[name] if g in known]
        else:
            unknown.append(name)
    if REAL in unknown:
        raise HoldoutError(f"{flag}: 'real' cannot be held out (every run trains on reals)")
    if unknown:
        extra = [f for f, members in families.items() if any(g in known for g in members)]
        raise HoldoutError(
            f"{flag}: unknown source(s) {unknown}; the known sources are {known}"
            + (f" (or a family: {extra})" if extra else "")
        )
    held = tuple(g for g in known if g in chosen)
    if held and len(held) == len(known):
        raise HoldoutError(
            f"{flag}: that holds out every generator ({', '.join(known)}); "
            "at least one must stay in training"
        )
    return HoldoutPlan(tuple(known), held)


def _name(item: LabelledImage, classes: Sequence[str]) -> str | None:
    """A fake item's generator name (its group, else its class); None for reals/unknowns."""
    if not item.is_fake:
        return None
    if item.group is not None:
        return item.group
    return classes[item.source] if 0 < item.source < len(classes) else None


def apply(plan: HoldoutPlan, classes: Sequence[str], splits: Split) -> Split:
    """A dataset's splits under the plan: held-out fakes leave train/val for test.

    Items are re-indexed onto :attr:`HoldoutPlan.classes`; held-out fakes (from any split:
    none of them was trained on) get ``UNKNOWN_SOURCE`` and keep their name as the group.
    """
    target = plan.classes
    out: Split = {split: [] for split in splits}
    out.setdefault("test", [])
    for split, items in splits.items():
        for item in items:
            name = _name(item, classes)
            if name in plan.held_out:
                moved = LabelledImage(UNKNOWN_SOURCE, item.image, item.path, name)
                out["test"].append(moved)
                continue
            source = item.source
            if item.is_fake and source != UNKNOWN_SOURCE:
                source = target.index(name) if name in target else UNKNOWN_SOURCE
            out[split].append(LabelledImage(source, item.image, item.path, item.group))
    return out


def synthetic_splits(
    plan: HoldoutPlan, *, n_train: int, n_val: int, n_test: int, size: int = 64, seed: int = 0
) -> Split:
    """Zoo splits for the plan: train/val from real + seen, test from real + every generator.

    Each split draws from its own seed (train ``seed``, val ``seed + 1``, test ``seed + 2``),
    so no scene, real or generated, appears in two splits. Fakes are named by their group.
    """
    classes = plan.classes

    def items(n: int, split_seed: int, sources: Sequence[str]) -> list[LabelledImage]:
        samples = zoo_families.generate(n, size=size, seed=split_seed, sources=[REAL, *sources])
        return [
            LabelledImage(
                source=(classes.index(s.source) if s.source in classes else UNKNOWN_SOURCE),
                image=s.image,
                group=s.source if s.is_fake else None,
            )
            for s in samples
        ]

    return {
        "train": items(n_train, seed, plan.seen),
        "val": items(n_val, seed + 1, plan.seen),
        "test": items(n_test, seed + 2, plan.generators),
    }


def _identity(item: LabelledImage) -> str:
    """A file's resolved path, or an in-memory image's pixel digest."""
    if item.path is not None:
        return f"path:{item.path.resolve()}"
    assert item.image is not None
    pixels = np.asarray(item.image)
    return "pixels:" + hashlib.sha256(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()


def check_no_leak(plan: HoldoutPlan, classes: Sequence[str], splits: Mapping[str, Any]) -> None:
    """Refuse item lists where a held-out generator trains, or a test real is also trained on."""
    trained_reals: set[str] = set()
    for split in ("train", "val"):
        for item in splits.get(split) or []:
            name = _name(item, classes)
            if name in plan.held_out:
                raise HoldoutError(
                    f"held-out generator {name!r} found in {split}: {item.describe()}"
                )
            if not item.is_fake:
                trained_reals.add(_identity(item))
    shared = [
        i for i in splits.get("test") or [] if not i.is_fake and _identity(i) in trained_reals
    ]
    if shared:
        raise HoldoutError(
            f"{len(shared)} test real(s) also in train/val (e.g. {shared[0].describe()}): "
            "the unseen numbers would be measured on trained images"
        )


def groups(generators: Sequence[str], by: LeaveOut) -> list[tuple[str, tuple[str, ...]]]:
    """Leave-one-out groups: one per generator, or one per family present (name, members)."""
    if by == "generator":
        return [(g, (g,)) for g in generators]
    out: dict[str, list[str]] = {}
    for g in generators:
        family = zoo_families.family_of(g) if g in zoo_families.GENERATORS else g
        out.setdefault(family, []).append(g)
    return [(family, tuple(members)) for family, members in out.items()]


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def leave_one_out_summary(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per held-out group: its unseen rows and means; then the mean over groups.

    ``runs`` maps a group name to that run's ``seen_unseen`` report.
    """
    per_group: dict[str, Any] = {}
    for name, report in runs.items():
        per_group[name] = {
            "unseen_rows": [r for r in report["rows"] if r["status"] == "unseen"],
            "unseen": report["unseen"],
            "seen": report["seen"],
        }
    fields = ("mean_balanced_accuracy", "mean_accuracy", "mean_auc", "mean_ap")
    mean = {
        status: {f: _mean([g[status].get(f) for g in per_group.values()]) for f in fields}
        for status in ("unseen", "seen")
    }
    return {"groups": per_group, "mean": mean}
