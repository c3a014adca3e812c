"""Frozen-encoder outputs, computed once and cached: what makes ``linear`` and
``multilayer`` mode fast.

``linear`` caches the encoder's final features (N, D); ``multilayer`` every block's CLS
token (N, blocks, width). The two never share a cache file: the multilayer key hashes a tag
of its own and its files are named ``blocks-*`` (``features-*`` for linear, unchanged).

Under torchrun every rank encodes its share of the images and all ranks receive all
features. Optionally the cache is kept on disk as safetensors, keyed by everything that
determines the features (encoder weights, preprocessing, augmentation, seed, the images),
so a second probe over the same data skips the encoder entirely.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from clipguard.detector.checkpoint import weights_sha256
from clipguard.detector.heads import Detector
from clipguard.training import distributed
from clipguard.training.data import DetectorDataset, collate_valid
from clipguard.training.distributed import DistInfo

log = logging.getLogger(__name__)


@dataclass
class FeatureSet:
    """Encoder outputs with their labels; ``dropped`` counts undecodable images."""

    features: torch.Tensor  # (N, D) float32, or (N, blocks, width) for multilayer
    is_fake: torch.Tensor  # (N,) float32
    source: torch.Tensor  # (N,) long
    dropped: int = 0
    seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.features.shape[0])


def cache_key(detector: Detector, dataset: DetectorDataset) -> str:
    digest = hashlib.sha256()
    if detector.multilayer is not None:
        digest.update(b"multilayer:ln_post(cls) per block|")
    digest.update(weights_sha256(detector.encoder.state_dict()).encode())
    digest.update(dataset.preprocess_cfg.model_dump_json().encode())
    digest.update(dataset.augment_cfg.model_dump_json().encode())
    digest.update(f"{dataset.seed}/{dataset.epoch}".encode())
    for item in dataset.items:
        digest.update(f"{item.source}|".encode())
        if item.path is not None:
            digest.update(str(item.path).encode())
        elif item.image is not None:
            digest.update(item.image.tobytes())
    return digest.hexdigest()[:24]


@torch.inference_mode()
def _encode(
    detector: Detector,
    dataset: DetectorDataset | Subset,
    batch_size: int,
    device: torch.device,
    progress: bool,
    desc: str,
) -> FeatureSet:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_valid)
    feats, fakes, sources, dropped = [], [], [], 0
    detector.eval()
    for pixels, is_fake, source, bad in tqdm(
        loader, desc=desc, disable=not progress, leave=False, unit="batch"
    ):
        dropped += bad
        if len(pixels):
            feats.append(detector.encode(pixels.to(device)).float().cpu())
            fakes.append(is_fake)
            sources.append(source)
    if not feats:
        shape = detector.encoded_shape()
        return FeatureSet(torch.empty(0, *shape), torch.empty(0), torch.empty(0).long(), dropped)
    return FeatureSet(torch.cat(feats), torch.cat(fakes), torch.cat(sources), dropped)


def extract(
    detector: Detector,
    dataset: DetectorDataset,
    *,
    batch_size: int,
    device: torch.device,
    info: DistInfo = distributed.SINGLE,
    cache_dir: Path | None = None,
    progress: bool = True,
    desc: str = "features",
) -> FeatureSet:
    """Encoder outputs of every item of ``dataset`` (at its current epoch's augmentation)."""
    started = time.perf_counter()
    path = None
    if cache_dir is not None:
        kind = "blocks" if detector.multilayer is not None else "features"
        path = Path(cache_dir) / f"{kind}-{cache_key(detector, dataset)}.safetensors"
        if path.is_file():
            try:
                cached = load_file(str(path))
                log.info("features loaded from %s", path)
                return FeatureSet(
                    cached["features"],
                    cached["is_fake"],
                    cached["source"],
                    int(cached["dropped"].item()),
                    time.perf_counter() - started,
                )
            except (OSError, SafetensorError, KeyError) as exc:
                log.warning("ignoring unreadable feature cache %s: %s", path, exc)
    shard = Subset(dataset, list(range(info.rank, len(dataset), info.world_size)))
    part = _encode(detector, shard, batch_size, device, progress and info.is_main, desc)
    parts = distributed.gather_objects(info, part)
    result = FeatureSet(
        torch.cat([p.features for p in parts]),
        torch.cat([p.is_fake for p in parts]),
        torch.cat([p.source for p in parts]),
        sum(p.dropped for p in parts),
    )
    result.seconds = time.perf_counter() - started
    if path is not None and info.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {
                "features": result.features.contiguous(),
                "is_fake": result.is_fake.contiguous(),
                "source": result.source.contiguous(),
                "dropped": torch.tensor([result.dropped]),
            },
            str(path),
        )
    return result
