"""``clipguard calibrate``: a new checkpoint with the same weights and a threshold fitted on
the platform's own images (training/recalibrate.py). The before/after report goes to stderr
as a table and to stdout as JSON."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from clipguard.cli.common import EXIT_OK, add_flag, flag_values
from clipguard.consumer.config import CheckpointPath, ClipguardSettings, SettingsError
from clipguard.detector.checkpoint import load_checkpoint, save_checkpoint
from clipguard.detector.engine import EngineConfig, InferenceEngine
from clipguard.training.data import LabelledImage
from clipguard.training.evaluate import remap_sources
from clipguard.training.folders import DatasetError, list_images
from clipguard.training.layouts import LAYOUTS, read_dataset
from clipguard.training.recalibrate import CalibrationDataError, data_summary, recalibrate

log = logging.getLogger("clipguard.calibrate")

Layout = Literal["auto", "wang2020", "ufd", "genimage", "cifake", "imagefolder", "zoo", "manifest"]


class CalibrateSettings(ClipguardSettings):
    checkpoint: CheckpointPath
    data: Path
    out: Path
    target_fpr: float = Field(default=0.01, gt=0, lt=0.5)
    #: Every image under --data is real (uploads from before generators existed).
    all_real: bool = False
    layout: Layout = "auto"
    split: Literal["all", "train", "val", "test"] = "all"
    #: Override the minimum number of reals (default: max(100, 5 / target FPR)).
    min_real_images: int | None = Field(default=None, ge=1)
    version: str | None = None
    json_path: Path | None = None
    batch_size: int = Field(default=64, ge=1, le=4096)
    device: str = "auto"

    @field_validator("data")
    @classmethod
    def _exists(cls, value: Path) -> Path:
        if not value.exists():
            raise ValueError(f"not found: {value}")
        return value

    @model_validator(mode="after")
    def _not_the_parent(self) -> CalibrateSettings:
        if self.out.resolve() == Path(self.checkpoint).resolve():
            raise ValueError(
                "--out must differ from --checkpoint: the parent checkpoint stays as it was"
            )
        return self


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="re-fit a checkpoint's threshold on your own images (same weights)",
        description="Write a new checkpoint with the same weights (same sha256) whose "
        "calibration and policy are fitted on --data: labelled data refits temperature, bias "
        "and the threshold; real-only data (--all-real, or a dataset without fakes) sets the "
        "threshold for --target-fpr. Table on stderr, JSON on stdout.",
    )
    add_flag(parser, "--checkpoint", type=Path, help="the parent checkpoint")
    add_flag(parser, "--data", type=Path, help="dataset folder or manifest, or a folder of reals")
    add_flag(parser, "--out", type=Path, help="the new checkpoint (directory or .safetensors)")
    add_flag(
        parser,
        "--target-fpr",
        dest="target_fpr",
        type=float,
        help="false-positive rate on the reals (default 0.01)",
    )
    parser.add_argument(
        "--all-real",
        dest="all_real",
        action="store_const",
        const=True,
        default=None,
        help="every image under --data is real (e.g. uploads from before generators)",
    )
    add_flag(parser, "--layout", choices=LAYOUTS, help="dataset layout (default: detect)")
    add_flag(parser, "--split", choices=("all", "train", "val", "test"), help="default all")
    add_flag(
        parser,
        "--min-real-images",
        dest="min_real_images",
        type=int,
        help="override the minimum number of reals (default max(100, 5 / target FPR))",
    )
    add_flag(parser, "--version", help="version of the new checkpoint (default parent+calSTAMP)")
    add_flag(parser, "--json", dest="json_path", type=Path, metavar="FILE")
    add_flag(parser, "--batch-size", dest="batch_size", type=int)
    add_flag(parser, "--device", help="auto, cpu, cuda")
    parser.add_argument("--config", help="TOML file with settings")
    parser.set_defaults(func=run)


def _items(settings: CalibrateSettings, classes: list[str]) -> list[LabelledImage]:
    if settings.all_real:
        skipped: list[Path] = []
        return [LabelledImage(source=0, path=p) for p in list_images(settings.data, skipped)]
    try:
        dataset = read_dataset(settings.data, settings.layout)
    except DatasetError as exc:
        raise SettingsError(
            [
                f"invalid setting data (--data / CLIPGUARD_DATA): {exc} (a folder of real "
                "images only: add --all-real)"
            ]
        ) from None
    if settings.split == "all":
        items = [item for split in dataset.splits.values() for item in split]
    elif settings.split in dataset.splits:
        items = dataset.splits[settings.split]
    else:
        raise SettingsError(
            [f"invalid setting split (--split): the dataset has {sorted(dataset.splits)}"]
        )
    return remap_sources(items, dataset.classes, classes)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:.4f}" for v in value) + "]"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def render(report: dict[str, Any]) -> str:
    """Before/after, row per measure."""
    rows = [
        "threshold",
        "temperature",
        "bias",
        "fpr",
        "fpr_95ci",
        "tpr",
        "accuracy",
        "balanced_accuracy",
        "auc",
        "ece",
        "nll",
    ]
    before, after = report["before"], report["after"]
    rows = [r for r in rows if r in before or r in after]
    lines = [
        f"calibrate ({report['method']}, target FPR {report['target_fpr']:g}, "
        f"{report['n_scored']} images)",
        f"{'':<18}{'before':>22}{'after':>22}",
    ]
    lines += [f"{r:<18}{_cell(before.get(r)):>22}{_cell(after.get(r)):>22}" for r in rows]
    if "tpr_at_target_fpr" in report:
        lines.append(f"TPR at the target FPR (ranking): {_cell(report['tpr_at_target_fpr'])}")
    if "expected_flag_rate" in report:
        rate = report["expected_flag_rate"]
        lines.append(
            f"expected flag rate on uploads like these: {_cell(rate['rate'])} "
            f"(95% interval {_cell(rate['95ci'])})"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    settings = CalibrateSettings.load(args.config, **flag_values(args))
    detector, manifest = load_checkpoint(settings.checkpoint)
    # fp32, the reference arithmetic; the engine may move and convert its module in place, so
    # the weights written come from a second, untouched copy.
    engine = InferenceEngine(
        detector,
        manifest,
        EngineConfig(
            device=settings.device,
            dtype="float32",
            max_batch_size=settings.batch_size,
            warmup_batches=0,
        ),
    )
    items = _items(settings, list(engine.classes))
    data = data_summary(items, engine.classes, settings.data)
    try:
        new_manifest, report = recalibrate(
            engine,
            items,
            settings.target_fpr,
            data,
            min_real=settings.min_real_images,
            version=settings.version,
        )
    except CalibrationDataError as exc:
        raise SettingsError(
            [
                f"invalid setting data (--data / CLIPGUARD_DATA): {exc}; give more real "
                "images, a larger --target-fpr, or --min-real-images"
            ]
        ) from None
    untouched, _ = load_checkpoint(settings.checkpoint)
    saved = save_checkpoint(untouched, new_manifest, settings.out)
    if saved.sha256 != manifest.sha256:  # the contract: weights bit-identical
        raise RuntimeError(f"weights changed while re-calibrating ({saved.sha256[:12]}…)")
    print(render(report), file=sys.stderr)
    out = {
        "checkpoint": str(settings.out),
        "parent": {"path": str(settings.checkpoint), "version": manifest.version},
        "version": saved.version,
        "sha256": saved.sha256,
        "calibration": saved.calibration.model_dump(),
        "policy": saved.policy.model_dump(),
        "data": data,
        "report": report,
    }
    text = json.dumps(out, indent=2, default=str)
    if settings.json_path is not None:
        settings.json_path.parent.mkdir(parents=True, exist_ok=True)
        settings.json_path.write_text(text + "\n", encoding="utf-8")
    print(text)
    return EXIT_OK
