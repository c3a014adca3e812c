"""The fine-tuning loop: Adam over encoder and both heads (arXiv 2404.08788), CPU or GPU."""

from __future__ import annotations

import copy
import math
import random
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from clipguard.detector.heads import Detector
from clipguard.training.data import UNKNOWN_SOURCE, DetectorDataset


class TrainConfig(BaseModel):
    """How to fit: the paper's recipe is Adam for 12 epochs over all weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(default=12, ge=1)
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
    #: False freezes the encoder: a linear probe on CLIP features (UniversalFakeDetect).
    train_encoder: bool = True


@dataclass
class EpochStats:
    epoch: int
    loss: float
    train_accuracy: float
    val_accuracy: float | None = None
    val_source_accuracy: float | None = None


@dataclass
class TrainResult:
    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "history": [vars(s) for s in self.history]}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def detector_loss(
    binary_logit: torch.Tensor,
    source_logits: torch.Tensor,
    is_fake: torch.Tensor,
    source: torch.Tensor,
    source_weight: float,
) -> torch.Tensor:
    """Binary BCE plus source cross-entropy, the latter only where the source is known."""
    loss = nn.functional.binary_cross_entropy_with_logits(binary_logit, is_fake)
    if source_weight > 0 and bool((source != UNKNOWN_SOURCE).any()):
        loss = loss + source_weight * nn.functional.cross_entropy(
            source_logits, source, ignore_index=UNKNOWN_SOURCE
        )
    return loss


@torch.inference_mode()
def quick_accuracy(
    detector: Detector, dataset: DetectorDataset, batch_size: int, device: torch.device
) -> tuple[float, float]:
    """Binary and source accuracy at logit 0 (uncalibrated): for model selection only."""
    detector.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    binary_hits = source_hits = source_total = total = 0
    for pixels, is_fake, source in loader:
        out = detector(pixels.to(device))
        binary_hits += int(((out.binary_logit.cpu() > 0).float() == is_fake).sum())
        known = source != UNKNOWN_SOURCE
        source_hits += int((out.source_logits.cpu().argmax(-1)[known] == source[known]).sum())
        source_total += int(known.sum())
        total += len(is_fake)
    return binary_hits / max(1, total), source_hits / max(1, source_total)


def fit(
    detector: Detector,
    train_set: DetectorDataset,
    val_set: DetectorDataset | None,
    config: TrainConfig,
) -> TrainResult:
    """Train in place; the detector ends holding the weights of its best validation epoch."""
    seed_everything(config.seed)
    device = pick_device(config.device)
    detector.to(device)
    detector.encoder.requires_grad_(config.train_encoder)
    optimizer = torch.optim.Adam(
        [p for p in detector.parameters() if p.requires_grad],
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=config.num_workers,
        drop_last=len(train_set) > config.batch_size,
    )
    total_steps = max(1, config.epochs * len(loader))
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        if config.schedule == "cosine"
        else None
    )
    result = TrainResult()
    best_score, best_state = -math.inf, None
    for epoch in range(config.epochs):
        train_set.set_epoch(epoch)
        detector.train()
        total_loss = hits = seen = 0.0
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not config.progress,
            leave=False,
            unit="batch",
        )
        for pixels, is_fake, source in bar:
            pixels, is_fake, source = pixels.to(device), is_fake.to(device), source.to(device)
            out = detector(pixels)
            loss = detector_loss(
                out.binary_logit, out.source_logits, is_fake, source, config.source_loss_weight
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total_loss += float(loss.detach()) * len(is_fake)
            hits += float(((out.binary_logit.detach() > 0).float() == is_fake).sum())
            seen += len(is_fake)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{hits / seen:.3f}")
        stats = EpochStats(epoch + 1, total_loss / max(1, seen), hits / max(1, seen))
        if val_set is not None and len(val_set):
            stats.val_accuracy, stats.val_source_accuracy = quick_accuracy(
                detector, val_set, config.batch_size * 2, device
            )
        result.history.append(stats)
        score = stats.val_accuracy if stats.val_accuracy is not None else -stats.loss
        if score > best_score:
            best_score, result.best_epoch = score, epoch + 1
            best_state = copy.deepcopy(detector.state_dict())
        if config.progress:
            tqdm.write(_describe(stats), file=sys.stderr)
    if best_state is not None:
        detector.load_state_dict(best_state)
    detector.eval().to("cpu")
    return result


def _describe(stats: EpochStats) -> str:
    text = f"epoch {stats.epoch}: loss {stats.loss:.4f}, train acc {stats.train_accuracy:.3f}"
    if stats.val_accuracy is not None:
        text += f", val acc {stats.val_accuracy:.3f}"
        text += f", val source acc {stats.val_source_accuracy:.3f}"
    return text
