"""``clipguard train --holdout-sources`` on a dataset and ``--leave-one-out``: the driver.

Kept apart from ``cli/train.py`` (which stays the settings and one run): this module resolves
a holdout against a dataset's generators and runs one training per held-out group, using the
single-run function it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from clipguard.cli.common import read_data
from clipguard.consumer.config import SettingsError, setting_name
from clipguard.training import holdout
from clipguard.training.recipes import TrainedCheckpoint

if TYPE_CHECKING:
    from clipguard.cli.train import TrainSettings

log = logging.getLogger("clipguard.train")


def dataset_generators(classes: list[str], splits: dict[str, Any]) -> list[str]:
    """Generator names of a dataset: its classes, then generators seen only in test."""
    names = list(classes[1:])
    for items in splits.values():
        for item in items:
            if item.is_fake and item.group is not None and item.group not in names:
                names.append(item.group)
    return names


def data_plan(
    requested: tuple[str, ...], classes: list[str], splits: dict[str, Any]
) -> holdout.HoldoutPlan:
    """The holdout plan for a dataset, refused with the flag's name when it cannot hold."""
    try:
        plan = holdout.resolve(requested, dataset_generators(classes, splits))
        if not any(g in plan.seen for g in classes[1:]):
            raise holdout.HoldoutError(
                f"--holdout-sources: that holds out every training generator ({classes[1:]})"
            )
    except holdout.HoldoutError as exc:
        raise SettingsError([f"invalid setting {setting_name('holdout_sources')}: {exc}"]) from None
    return plan


def _generators(settings: TrainSettings) -> list[str]:
    if settings.synthetic:
        return list(settings.synthetic_names()[1:])
    assert settings.data is not None
    dataset = read_data(settings.data, settings.layout, settings.train_generator)
    return list(dataset.classes[1:])  # test-only generators are unseen in every run anyway


def leave_one_out(
    settings: TrainSettings,
    train_one: Callable[[TrainSettings], TrainedCheckpoint | None],
    describe: Callable[[TrainedCheckpoint], dict[str, Any]],
) -> dict[str, Any] | None:
    """One run per held-out generator (or family), each into ``OUT/holdout-NAME``.

    Returns every run's report and the summary (per group and the mean), or ``None`` on
    torchrun ranks other than 0.
    """
    assert settings.leave_one_out is not None
    generators = _generators(settings)
    groups = holdout.groups(generators, settings.leave_one_out)
    if len(groups) < 2:
        raise SettingsError(
            [
                f"invalid setting {setting_name('leave_one_out')}: needs at least two "
                f"{settings.leave_one_out}s to leave out, the data has {generators}"
            ]
        )
    runs: dict[str, Any] = {}
    reports: dict[str, Any] = {}
    for name, members in groups:
        one = settings.model_copy(
            update={
                "holdout_sources": members,
                "leave_one_out": None,
                "out": settings.out / f"holdout-{name}",
            }
        )
        log.info("leave-one-out: holding out %s (%s)", name, ", ".join(members))
        trained = train_one(one)
        if trained is None:
            continue
        reports[name] = trained.manifest.metrics["test"]["seen_unseen"]
        runs[name] = {"held_out": list(members), **describe(trained)}
    if not runs:
        return None
    return {
        "leave_one_out": settings.leave_one_out,
        "summary": holdout.leave_one_out_summary(reports),
        "runs": runs,
    }
