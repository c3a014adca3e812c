"""``clipguard eval``: measure a checkpoint through the serving engine.

Accuracy at the stored threshold, AP, ROC-AUC, real and fake accuracy, per generator;
source attribution and its confusion matrix; optionally a robustness sweep and PNG plots.
A table goes to stderr, the JSON report to stdout (and ``--json FILE``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from clipguard.cli.common import EXIT_OK, add_flag, flag_values, read_data
from clipguard.consumer.config import (
    CheckpointPath,
    ClipguardSettings,
    SettingsError,
    comma_separated,
    setting_name,
)
from clipguard.detector.engine import EngineConfig, InferenceEngine
from clipguard.detector.preprocess import MAX_VIEWS
from clipguard.training import zoo, zoo_families
from clipguard.training.align import AlignPolicy, aligned_report
from clipguard.training.data import UNKNOWN_SOURCE, LabelledImage
from clipguard.training.evaluate import remap_sources, score_items, seen_unseen, summarize
from clipguard.training.folders import FolderDataset
from clipguard.training.layouts import LAYOUTS
from clipguard.training.plots import write_plots
from clipguard.training.report import render
from clipguard.training.robustness import sweep

log = logging.getLogger("clipguard.eval")

Layout = Literal["auto", "wang2020", "ufd", "genimage", "cifake", "imagefolder", "zoo", "manifest"]


class EvalSettings(ClipguardSettings):
    checkpoint: CheckpointPath
    data: Path | None = None
    synthetic: int | None = Field(default=None, ge=10)
    layout: Layout = "auto"
    train_generator: str | None = None
    split: Literal["auto", "train", "val", "test", "all"] = "auto"
    json_path: Path | None = None
    robustness: bool = False
    plots: Path | None = None
    batch_size: int = Field(default=64, ge=1, le=4096)
    device: str = "auto"
    seed: int = 0
    progress: bool = True
    #: Views per image and their aggregation; default: the checkpoint's input contract.
    views: int | None = Field(default=None, ge=1, le=MAX_VIEWS)
    view_aggregation: Literal["mean", "max"] | None = None
    #: Also score every image re-encoded one way (training/align.py): format-shortcut check.
    align: bool = False
    align_quality: int = Field(default=75, ge=1, le=100)
    align_size: int = Field(default=256, ge=16)
    #: Generators the checkpoint never saw (added to its manifest's ``training.holdout``).
    holdout_sources: Annotated[tuple[str, ...], NoDecode] = ()
    #: --synthetic: zoo generators/families to draw (default: what the checkpoint recorded).
    synthetic_sources: Annotated[tuple[str, ...], NoDecode] | None = None

    @field_validator("holdout_sources", "synthetic_sources", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return comma_separated(value)

    @field_validator("synthetic_sources")
    @classmethod
    def _known_sources(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            zoo_families.expand(value)  # ValueError lists the known names
        return value

    @field_validator("data")
    @classmethod
    def _exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.exists():
            raise ValueError(f"not found: {value}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> EvalSettings:
        if (self.data is None) == (self.synthetic is None):
            raise ValueError("give exactly one of --data DIR and --synthetic N")
        return self


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint through the serving engine",
        description="Accuracy at the stored threshold, AP, ROC-AUC, real/fake accuracy per "
        "generator, source attribution; --robustness adds JPEG/blur/downscale/thumbnail "
        "sweeps. Table on stderr, JSON on stdout.",
    )
    add_flag(parser, "--checkpoint", type=Path, help="checkpoint directory or .safetensors file")
    add_flag(parser, "--data", type=Path, help="dataset folder or CSV/JSONL manifest")
    add_flag(parser, "--synthetic", type=int, metavar="N", help="evaluate on N fresh zoo images")
    add_flag(parser, "--layout", choices=LAYOUTS, help="dataset layout (default: detect)")
    add_flag(parser, "--train-generator", dest="train_generator", help="wang2020 only")
    add_flag(
        parser,
        "--split",
        choices=("auto", "train", "val", "test", "all"),
        help="default: test, else val, else everything",
    )
    add_flag(
        parser,
        "--json",
        dest="json_path",
        type=Path,
        metavar="FILE",
        help="also write the report here",
    )
    parser.add_argument(
        "--robustness",
        action="store_const",
        const=True,
        default=None,
        help="JPEG 95/75/50/30, blur 1/2/3, downscale 0.75/0.5, 128-px thumbnail round trip",
    )
    parser.add_argument(
        "--align",
        action="store_const",
        const=True,
        default=None,
        help="also score every image as one JPEG quality and size; warn on a large gap",
    )
    add_flag(parser, "--align-quality", dest="align_quality", type=int, help="default 75")
    add_flag(
        parser,
        "--align-size",
        dest="align_size",
        type=int,
        help="centre square of at most N px, never resampled (default 256)",
    )
    add_flag(parser, "--plots", type=Path, help="write ROC, confusion and robustness PNGs here")
    add_flag(parser, "--batch-size", dest="batch_size", type=int)
    add_flag(parser, "--device", help="auto (CUDA when present), cpu, cuda")
    add_flag(parser, "--seed", type=int, help="--synthetic only")
    add_flag(parser, "--views", type=int, help="views per image (default: the checkpoint's)")
    add_flag(parser, "--view-aggregation", dest="view_aggregation", choices=("mean", "max"))
    add_flag(
        parser,
        "--holdout-sources",
        dest="holdout_sources",
        help="comma list of generators the checkpoint never saw, reported as unseen (also "
        "read from the checkpoint's manifest; generators that are no class are unseen too)",
    )
    add_flag(
        parser,
        "--synthetic-sources",
        dest="synthetic_sources",
        help="--synthetic: zoo generators or families (default: those the checkpoint was "
        "trained and tested on)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_const", const=False, default=None
    )
    parser.add_argument("--config", help="TOML file with settings")
    parser.set_defaults(func=run)


def _choose_split(dataset: FolderDataset, split: str) -> tuple[str, list[LabelledImage]]:
    if split == "all":
        return "all", [item for items in dataset.splits.values() for item in items]
    if split != "auto":
        if split not in dataset.splits:
            raise SettingsError(
                [f"invalid setting split (--split): the dataset has {sorted(dataset.splits)}"]
            )
        return split, dataset.splits[split]
    for name in ("test", "val"):
        if dataset.splits.get(name):
            return name, dataset.splits[name]
    return "all", [item for items in dataset.splits.values() for item in items]


def _items(
    settings: EvalSettings, classes: list[str], training: dict[str, Any]
) -> tuple[dict[str, Any], list[LabelledImage]]:
    if settings.synthetic is not None:
        recorded = settings.synthetic_sources or training.get("synthetic_sources")
        if recorded is None:
            names = [c for c in classes if c in zoo.SOURCES]
            samples = zoo.generate(settings.synthetic, seed=settings.seed + 1000, sources=names)
        else:
            names = list(zoo_families.expand([zoo.REAL, *recorded]))
            samples = zoo_families.generate(
                settings.synthetic, seed=settings.seed + 1000, sources=names
            )
        items = [
            LabelledImage(
                source=classes.index(s.source) if s.source in classes else UNKNOWN_SOURCE,
                image=s.image,
                group=s.source if s.is_fake else None,
            )
            for s in samples
        ]
        data = {"synthetic": settings.synthetic, "seed": settings.seed + 1000, "sources": names}
        return data, items
    assert settings.data is not None
    dataset = read_data(settings.data, settings.layout, settings.train_generator)
    split, items = _choose_split(dataset, settings.split)
    if dataset.skipped:
        log.warning("skipped %d files that are not images or not readable", len(dataset.skipped))
    items = remap_sources(items, dataset.classes, classes)
    return {**dataset.summary(), "split": split, "n_images": len(items)}, items


def _unseen(
    settings: EvalSettings,
    classes: list[str],
    training: dict[str, Any],
    items: list[LabelledImage],
) -> list[str]:
    """Generators the checkpoint never saw: the flag, its manifest's holdout, non-classes."""
    present = sorted(
        {item.group for item in items if item.is_fake and item.group}
        | {classes[item.source] for item in items if 0 < item.source < len(classes)}
    )
    known = list(dict.fromkeys([*classes[1:], *present]))
    unknown = [s for s in settings.holdout_sources if s not in known]
    trained = [s for s in settings.holdout_sources if s in classes[1:]]
    name = setting_name("holdout_sources")
    if unknown:
        raise SettingsError(
            [f"invalid setting {name}: unknown source(s) {unknown}; the known sources are {known}"]
        )
    if trained:
        raise SettingsError(
            [f"invalid setting {name}: {trained} are classes of the checkpoint (it saw them)"]
        )
    recorded = (training.get("holdout") or {}).get("held_out") or []
    never_classes = [g for g in present if g not in classes]
    return sorted({*settings.holdout_sources, *recorded, *never_classes})


def evaluate_checkpoint(settings: EvalSettings) -> dict[str, Any]:
    engine = InferenceEngine.from_checkpoint(
        settings.checkpoint,
        EngineConfig(
            device=settings.device,
            max_batch_size=settings.batch_size,
            views=settings.views,
            aggregate=settings.view_aggregation,
        ),
    )
    manifest = engine.manifest
    data, items = _items(settings, list(engine.classes), manifest.training)
    unseen = _unseen(settings, list(engine.classes), manifest.training, items)
    progress = settings.progress
    scored = score_items(
        engine, items, batch_size=settings.batch_size, progress=progress, desc="evaluating"
    )
    overall = summarize(scored, engine.classes, engine.threshold)
    report: dict[str, Any] = {
        "checkpoint": str(settings.checkpoint),
        "model": {
            "name": manifest.model_name,
            "version": manifest.version,
            "sha256": manifest.sha256,
        },
        "classes": list(engine.classes),
        "data": data,
        "calibration": manifest.calibration.model_dump(),
        "policy": manifest.policy.model_dump(),
        "preprocess": engine.preprocess.model_dump(),
        "overall": overall,
        "seen_unseen": {**seen_unseen(overall["per_generator"], unseen), "unseen_sources": unseen},
    }
    if settings.align:
        policy = AlignPolicy(quality=settings.align_quality, size=settings.align_size)
        report["aligned"], _ = aligned_report(
            engine, items, overall, policy, batch_size=settings.batch_size, progress=progress
        )
        for warning in report["aligned"]["warnings"]:
            log.warning("%s", warning)
    robustness = None
    if settings.robustness:
        robustness = sweep(
            engine, items, clean=scored, batch_size=settings.batch_size, progress=progress
        )
        report["robustness"] = robustness
    if settings.plots is not None:
        written = write_plots(settings.plots, scored, engine.classes, overall, robustness)
        report["plots"] = [str(p) for p in written]
    return report


def run(args: argparse.Namespace) -> int:
    settings = EvalSettings.load(args.config, **flag_values(args))
    report = evaluate_checkpoint(settings)
    print(render(report), file=sys.stderr)
    text = json.dumps(report, indent=2, default=str)
    if settings.json_path is not None:
        settings.json_path.parent.mkdir(parents=True, exist_ok=True)
        settings.json_path.write_text(text + "\n", encoding="utf-8")
    print(text)
    return EXIT_OK
