"""The fine-tuning loop: Adam over the trainable weights and both heads (arXiv 2404.08788).

One loop for every mode. ``full``, ``lora``, ``last-n``, ``layernorm`` and ``svd`` feed pixels
through the model (DistributedDataParallel under torchrun, AMP on CUDA, gradient accumulation);
``linear`` and ``multilayer`` feed encoder outputs cached once from the frozen encoder (final
features, or every block's CLS token) straight into the trained head. Every epoch is
scored on the validation set by average precision (ties broken by accuracy): the best epoch's
weights are kept, ``patience`` epochs without a better one stop the run early, and the state
needed to resume is written after each epoch.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from clipguard.detector.errors import CheckpointError
from clipguard.detector.heads import Detector
from clipguard.training import distributed, feeds, modes, svd
from clipguard.training.data import UNKNOWN_SOURCE, DetectorDataset
from clipguard.training.distributed import DistInfo
from clipguard.training.feeds import Feed, ValOutputs
from clipguard.training.metrics import average_precision
from clipguard.training.modes import Mode
from clipguard.training.state import (
    TrainState,
    frozen_fingerprint,
    load_state,
    save_state,
    trainable_state,
)

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """How to fit: the paper's recipe is Adam for 12 epochs over all weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(default=12, ge=1)
    #: Images per optimizer step before accumulation, over all torchrun processes together.
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    #: ``cosine`` decays to zero over the run (per step); ``constant`` is the paper's Adam.
    schedule: Literal["constant", "cosine"] = "constant"
    source_loss_weight: float = Field(default=1.0, ge=0)
    seed: int = 0
    device: str = "auto"
    num_workers: int = Field(default=0, ge=0)
    progress: bool = True
    mode: Mode = "full"
    lora_rank: int = Field(default=8, ge=1)
    lora_alpha: float = Field(default=16.0, gt=0)
    last_n: int = Field(default=2, ge=1)
    #: SVD mode: singular directions kept frozen per attention weight; None = all but one
    #: (a rank-1 residual, Effort's setting for CLIP ViT-L/14).
    svd_rank: int | None = Field(default=None, ge=0)
    #: SVD mode: weight of the orthogonality regulariser (mean over adapted weights).
    svd_orth_weight: float = Field(default=1.0, ge=0)
    #: SVD mode: weight of the singular-value (energy) regulariser.
    svd_sv_weight: float = Field(default=1.0, ge=0)
    #: Micro-batches per optimizer step (effective batch = batch_size x accumulate).
    accumulate: int = Field(default=1, ge=1)
    #: Mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling).
    amp: bool = True
    #: Stop after this many epochs without a better validation AP; None trains every epoch.
    patience: int | None = Field(default=None, ge=1)
    #: Linear and multilayer modes: keep cached encoder outputs here (safetensors) across runs.
    feature_cache: Path | None = None


@dataclass
class EpochStats:
    epoch: int
    loss: float
    train_accuracy: float
    seconds: float = 0.0
    lr: float = 0.0
    val_loss: float | None = None
    val_ap: float | None = None
    val_accuracy: float | None = None
    val_source_accuracy: float | None = None
    skipped_images: int = 0


@dataclass
class TrainResult:
    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    resumed_from_epoch: int | None = None
    feature_seconds: float | None = None
    world_size: int = 1
    trainable: dict[str, Any] = field(default_factory=dict)
    is_main: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
            "resumed_from_epoch": self.resumed_from_epoch,
            "feature_seconds": self.feature_seconds,
            "world_size": self.world_size,
            **self.trainable,
            "history": [vars(s) for s in self.history],
        }

    @property
    def seconds_per_epoch(self) -> float | None:
        timed = [s.seconds for s in self.history if s.seconds > 0]
        return sum(timed) / len(timed) if timed else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(requested: str) -> torch.device:
    return distributed.device_for(requested, distributed.SINGLE)


def detector_loss(
    binary_logit: torch.Tensor,
    source_logits: torch.Tensor,
    is_fake: torch.Tensor,
    source: torch.Tensor,
    source_weight: float,
) -> torch.Tensor:
    """Binary BCE plus source cross-entropy, the latter only where the source is known."""
    loss = nn.functional.binary_cross_entropy_with_logits(binary_logit.float(), is_fake)
    if source_weight > 0 and bool((source != UNKNOWN_SOURCE).any()):
        return loss + source_weight * nn.functional.cross_entropy(
            source_logits.float(), source, ignore_index=UNKNOWN_SOURCE
        )
    # Keep the source head in the graph: DDP expects a gradient for every trained weight.
    return loss + 0.0 * source_logits.float().sum()


def lr_at(config: TrainConfig, step: int, total_steps: int) -> float:
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return config.lr


# ----------------------------------------------------------------------------- scoring


def val_metrics(out: ValOutputs, source_weight: float) -> dict[str, float | None]:
    if not len(out.is_fake):
        return {"val_loss": None, "val_ap": None, "val_accuracy": None, "val_source_accuracy": None}
    loss = detector_loss(
        out.binary_logit, out.source_logits, out.is_fake, out.source, source_weight
    )
    known = out.source != UNKNOWN_SOURCE
    picked = out.source_logits.argmax(-1)
    return {
        "val_loss": float(loss),
        "val_ap": average_precision(out.is_fake.numpy(), out.binary_logit.numpy()),
        "val_accuracy": float(((out.binary_logit > 0).float() == out.is_fake).float().mean()),
        "val_source_accuracy": (
            float((picked[known] == out.source[known]).float().mean()) if known.any() else None
        ),
    }


def selection_key(stats: EpochStats) -> tuple[float, float]:
    """Higher is better: validation AP first, accuracy to break (saturated) ties."""
    ap = stats.val_ap if stats.val_ap is not None else -1.0
    acc = stats.val_accuracy if stats.val_accuracy is not None else -1.0
    return (round(ap, 4), round(acc, 4))


def describe(stats: EpochStats, epochs: int) -> str:
    text = (
        f"epoch {stats.epoch}/{epochs}: loss {stats.loss:.4f}, train acc {stats.train_accuracy:.3f}"
    )
    if stats.val_accuracy is not None:
        text += f", val AP {stats.val_ap if stats.val_ap is not None else float('nan'):.4f}"
        text += f", val acc {stats.val_accuracy:.3f}"
        if stats.val_source_accuracy is not None:
            text += f", val source acc {stats.val_source_accuracy:.3f}"
    text += f" ({stats.seconds:.1f}s"
    if stats.skipped_images:
        text += f", {stats.skipped_images} undecodable images skipped"
    return text + ")"


# ----------------------------------------------------------------------------- the loop


def _autocast(device: torch.device, config: TrainConfig) -> tuple[Any, Any]:
    """(autocast context factory, grad scaler or None): AMP on CUDA only."""
    if device.type != "cuda" or not config.amp:
        return nullcontext, None
    if torch.cuda.is_bf16_supported():
        return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), None
    return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")


@contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    """Linear heads are tiny matrices: one thread beats a team waiting on a busy CPU."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class _Run:
    """Mutable progress of one fit, saved after each epoch."""

    epoch: int = 0
    step: int = 0
    best_key: tuple[float, float] | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[EpochStats] = field(default_factory=list)
    best: dict[str, torch.Tensor] = field(default_factory=dict)


def _restore(
    detector: Detector,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    expected: dict[str, Any],
) -> _Run:
    for key, value in expected.items():
        stored = state.info.get(key)
        if stored is not None and stored != value:
            raise CheckpointError(
                f"cannot resume: the saved run has {key}={stored!r}, this one {value!r}"
            )
    params = dict(detector.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(state.model) != trainable:
        raise CheckpointError(
            "cannot resume: the saved trainable weights do not match this model "
            f"({len(state.model)} saved, {len(trainable)} here)"
        )
    with torch.no_grad():
        for name, tensor in state.model.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state.optimizer)
    history = [EpochStats(**h) for h in state.info.get("history", [])]
    best_key = state.info.get("best_key")
    return _Run(
        epoch=state.epoch,
        step=state.step,
        best_key=tuple(best_key) if best_key else None,
        best_epoch=int(state.info.get("best_epoch", 0)),
        bad_epochs=int(state.info.get("bad_epochs", 0)),
        history=history,
        best=state.best or trainable_state(detector),
    )


def _train_epoch(
    detector: Detector,
    feed: Feed,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    run: _Run,
    total_steps: int,
    device: torch.device,
    info: DistInfo,
) -> EpochStats:
    autocast, scaler = _autocast(device, config)
    detector.train()
    if config.mode in modes.CACHED_MODES:
        detector.encoder.eval()
    started = time.perf_counter()
    total_loss = hits = seen = skipped = 0.0
    n_batches = feed.batches_per_epoch
    bar = tqdm(
        feed.batches(run.epoch),
        total=n_batches,
        desc=f"epoch {run.epoch + 1}/{config.epochs}",
        disable=not (config.progress and info.is_main),
        leave=False,
        unit="batch",
        file=sys.stderr,
    )
    optimizer.zero_grad(set_to_none=True)
    for index, (inputs, is_fake, source, bad) in enumerate(bar):
        skipped += bad
        weight = 1.0
        if len(inputs) == 0:  # every image of this batch was undecodable: keep DDP in step
            inputs = torch.zeros((1, *inputs.shape[1:]))
            is_fake, source, weight = torch.zeros(1), torch.full((1,), UNKNOWN_SOURCE), 0.0
        inputs, is_fake, source = inputs.to(device), is_fake.to(device), source.to(device)
        last_micro = (index + 1) % config.accumulate == 0 or index + 1 == n_batches
        sync: AbstractContextManager[Any] = (
            feed.ddp.no_sync() if feed.ddp is not None and not last_micro else nullcontext()
        )
        with sync:
            with autocast():
                out = feed.forward(inputs)
                loss = detector_loss(
                    out.binary_logit, out.source_logits, is_fake, source, config.source_loss_weight
                )
            if feed.regulariser is not None:  # fp32, outside autocast
                loss = loss + feed.regulariser()
            scaled = loss * (weight / config.accumulate)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if last_micro:
            lr = lr_at(config, run.step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            run.step += 1
        if weight:
            n = len(is_fake)
            total_loss += float(loss.detach()) * n
            hits += float(((out.binary_logit.detach() > 0).float() == is_fake).sum())
            seen += n
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{hits / seen:.3f}")
    if feed.sharded:
        total_loss, hits, seen, skipped = distributed.all_sum(info, total_loss, hits, seen, skipped)
    return EpochStats(
        epoch=run.epoch + 1,
        loss=total_loss / max(1.0, seen),
        train_accuracy=hits / max(1.0, seen),
        seconds=time.perf_counter() - started,
        lr=lr_at(config, run.step, total_steps),
        skipped_images=int(skipped),
    )


def fit(
    detector: Detector,
    train_set: DetectorDataset,
    val_set: DetectorDataset | None,
    config: TrainConfig,
    *,
    state_dir: Path | None = None,
    resume: Path | None = None,
    state_info: dict[str, Any] | None = None,
) -> TrainResult:
    """Train in place; the detector ends holding its best validation epoch's weights (CPU).

    ``state_dir``: write resumable state there after each epoch (rank 0). ``resume``: a
    state folder (or the checkpoint beside it) to continue from its last completed epoch.
    ``state_info``: facts the saved state must agree with to be resumed (classes, ...).
    """
    device = distributed.device_for(config.device, distributed.env_info())
    info = distributed.init(device)
    seed_everything(config.seed)
    modes.prepare(
        detector,
        config.mode,
        lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha,
        last_n=config.last_n,
        svd_rank=config.svd_rank,
    )
    detector.to(device)
    expected = {"mode": config.mode, **(state_info or {})}
    if state_dir is not None or resume is not None:
        expected["frozen_sha256"] = frozen_fingerprint(detector)
    optimizer = torch.optim.Adam(
        [p for p in detector.parameters() if p.requires_grad],
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    result = TrainResult(
        world_size=info.world_size,
        trainable=modes.trainable_summary(detector),
        is_main=info.is_main,
    )
    run = _Run()
    if resume is not None:
        run = _restore(detector, optimizer, load_state(resume), expected)
        result.resumed_from_epoch = run.epoch
        if info.is_main:
            log.info("resuming after epoch %d (best so far: epoch %d)", run.epoch, run.best_epoch)
    feed = (feeds.cached_feed if config.mode in modes.CACHED_MODES else feeds.pixel_feed)(
        detector, train_set, val_set, config, device, info
    )
    if config.mode == "svd":
        feed.regulariser = lambda: svd.regulariser(
            detector.encoder, config.svd_orth_weight, config.svd_sv_weight
        )
    result.feature_seconds = feed.feature_seconds
    steps_per_epoch = max(1, math.ceil(feed.batches_per_epoch / config.accumulate))
    total_steps = max(1, config.epochs * steps_per_epoch)
    heads_only = config.mode in modes.CACHED_MODES and device.type == "cpu"
    while run.epoch < config.epochs:
        with _intra_op_threads(1 if heads_only else None):
            stats = _train_epoch(detector, feed, optimizer, config, run, total_steps, device, info)
            val = feed.validate()
        if val is not None:
            for key, value in val_metrics(val, config.source_loss_weight).items():
                setattr(stats, key, value)
        run.history.append(stats)
        run.epoch += 1
        key = selection_key(stats)
        if val is None or run.best_key is None or key > run.best_key:
            run.best_key, run.best_epoch, run.bad_epochs = key, stats.epoch, 0
            run.best = trainable_state(detector)
        else:
            run.bad_epochs += 1
        if config.progress and info.is_main:
            tqdm.write(describe(stats, config.epochs), file=sys.stderr)
        stop = (
            val is not None
            and config.patience is not None
            and run.bad_epochs >= config.patience
            and run.epoch < config.epochs
        )
        if state_dir is not None and info.is_main:
            save_state(state_dir, _snapshot(detector, optimizer, run, expected))
        if stop:
            result.stopped_early = True
            if info.is_main:
                log.info("early stop: no better validation AP for %d epochs", run.bad_epochs)
            break
    distributed.barrier(info)
    if run.best:
        params = dict(detector.named_parameters())
        with torch.no_grad():
            for name, tensor in run.best.items():
                params[name].copy_(tensor)
    result.history, result.best_epoch = run.history, run.best_epoch
    result.trainable.update(modes.mode_info(detector))
    detector.eval().to("cpu")
    return result


def _snapshot(
    detector: Detector, optimizer: torch.optim.Optimizer, run: _Run, expected: dict[str, Any]
) -> TrainState:
    return TrainState(
        epoch=run.epoch,
        step=run.step,
        model=trainable_state(detector),
        best=run.best,
        optimizer=optimizer.state_dict(),
        info={
            **expected,
            "best_key": list(run.best_key) if run.best_key else None,
            "best_epoch": run.best_epoch,
            "bad_epochs": run.bad_epochs,
            "history": [vars(s) for s in run.history],
        },
    )
