"""Where the loop's batches come from: pixels through the model (``full``, ``lora``, ``last-n``,
``layernorm``, ``svd``; sharded under torchrun) or encodings cached once from a frozen encoder
(``linear``, ``multilayer``), which the heads then train on in milliseconds per epoch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from clipguard.detector.heads import Detector, DetectorOutput
from clipguard.training import distributed, features
from clipguard.training.data import DetectorDataset, collate_valid
from clipguard.training.distributed import DistInfo

if TYPE_CHECKING:
    from clipguard.training.loop import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class ValOutputs:
    binary_logit: torch.Tensor
    source_logits: torch.Tensor
    is_fake: torch.Tensor
    source: torch.Tensor


@dataclass
class Feed:
    """Where the loop's batches come from and how they reach the model."""

    batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]]
    batches_per_epoch: int
    forward: Callable[[torch.Tensor], DetectorOutput]
    validate: Callable[[], ValOutputs | None]
    #: True when every rank sees its own shard (stats are summed over ranks).
    sharded: bool
    ddp: DistributedDataParallel | None = None
    feature_seconds: float | None = None
    #: Extra loss on the weights, added to every step's (``svd`` mode's regularisers).
    regulariser: Callable[[], torch.Tensor] | None = None


@torch.inference_mode()
def _outputs(
    detector: Detector, dataset: DetectorDataset | Subset, batch_size: int, device: torch.device
) -> ValOutputs:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_valid)
    parts: list[tuple[torch.Tensor, ...]] = []
    for pixels, is_fake, source, _bad in loader:
        if len(pixels):
            out = detector(pixels.to(device))
            parts.append(
                (out.binary_logit.float().cpu(), out.source_logits.float().cpu(), is_fake, source)
            )
    if not parts:
        n = detector.source_head.out_features
        return ValOutputs(torch.empty(0), torch.empty(0, n), torch.empty(0), torch.empty(0).long())
    return ValOutputs(*(torch.cat(column) for column in zip(*parts, strict=True)))


def _gather_outputs(info: DistInfo, part: ValOutputs) -> ValOutputs:
    parts = distributed.gather_objects(info, part)
    return ValOutputs(
        torch.cat([p.binary_logit for p in parts]),
        torch.cat([p.source_logits for p in parts]),
        torch.cat([p.is_fake for p in parts]),
        torch.cat([p.source for p in parts]),
    )


def pixel_feed(
    detector: Detector,
    train_set: DetectorDataset,
    val_set: DetectorDataset | None,
    config: TrainConfig,
    device: torch.device,
    info: DistInfo,
) -> Feed:
    per_rank = max(1, config.batch_size // info.world_size)
    if config.batch_size % info.world_size:
        log.warning(
            "batch size %d is not a multiple of %d processes: %d per process",
            config.batch_size,
            info.world_size,
            per_rank,
        )
    sampler = DistributedSampler(
        train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=config.seed
    )
    loader = DataLoader(
        train_set,
        batch_size=per_rank,
        sampler=sampler,
        num_workers=config.num_workers,
        collate_fn=collate_valid,
        drop_last=len(sampler) > per_rank,
    )
    ddp = None
    if info.enabled:
        ddp = DistributedDataParallel(
            detector, device_ids=[device.index] if device.type == "cuda" else None
        )

    def batches(epoch: int) -> DataLoader:
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        return loader

    def validate() -> ValOutputs | None:
        if val_set is None or not len(val_set):
            return None
        shard = Subset(val_set, list(range(info.rank, len(val_set), info.world_size)))
        detector.eval()
        return _gather_outputs(info, _outputs(detector, shard, per_rank * 2, device))

    return Feed(
        batches=batches,
        batches_per_epoch=len(loader),
        forward=ddp if ddp is not None else detector,
        validate=validate,
        sharded=True,
        ddp=ddp,
    )


def cached_feed(
    detector: Detector,
    train_set: DetectorDataset,
    val_set: DetectorDataset | None,
    config: TrainConfig,
    device: torch.device,
    info: DistInfo,
) -> Feed:
    """Encode once (a fixed augmented copy of the training set), then train the head on it."""
    common = {
        "batch_size": max(8, config.batch_size),
        "device": device,
        "info": info,
        "cache_dir": config.feature_cache,
        "progress": config.progress,
    }
    train_set.set_epoch(0)
    train = features.extract(detector, train_set, desc="encoding train", **common)
    val = (
        features.extract(detector, val_set, desc="encoding val", **common)
        if val_set is not None and len(val_set)
        else None
    )
    seconds = train.seconds + (val.seconds if val is not None else 0.0)
    if info.is_main:
        log.info(
            "%s mode: %d train and %d val encodings cached in %.1fs (%d undecodable)",
            config.mode,
            len(train),
            len(val) if val is not None else 0,
            seconds,
            train.dropped + (val.dropped if val is not None else 0),
        )
    on_device = train.features.to(device)
    n = len(train)
    size = config.batch_size
    full_batches = n // size if n > size else 1

    def batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=generator)
        for b in range(full_batches):
            index = order[b * size : (b + 1) * size]
            yield on_device[index], train.is_fake[index], train.source[index], 0

    def validate() -> ValOutputs | None:
        if val is None:
            return None
        with torch.inference_mode():
            out = detector.classify(detector.embed(val.features.to(device)))
        return ValOutputs(
            out.binary_logit.float().cpu(), out.source_logits.float().cpu(), val.is_fake, val.source
        )

    return Feed(
        batches=batches,
        batches_per_epoch=full_batches,
        forward=lambda encoded: detector.classify(detector.embed(encoded)),
        validate=validate,
        sharded=False,
        feature_seconds=seconds,
    )
