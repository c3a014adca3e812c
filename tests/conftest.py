"""Shared fixtures: an offline environment, tiny checkpoints, and a real broker."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from clipguard.detector import (  # noqa: E402 - the environment above must come first
    BackboneSpec,
    Manifest,
    build_encoder,
    new_detector,
    save_checkpoint,
)

CLASSES = ["real", "gan_a", "diffusion_b"]
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "pillow-test-images"


def make_checkpoint(path: Path, seed: int = 0, classes: list[str] | None = None) -> Manifest:
    """An untrained tiny detector saved as a checkpoint: weights are random but fixed."""
    torch.manual_seed(seed)
    encoder = build_encoder(BackboneSpec())
    classes = classes or CLASSES
    detector = new_detector(encoder, classes)
    manifest = Manifest(
        version=f"test-{seed}",
        backbone=encoder.model_config,
        feature_dim=encoder.feature_dim,
        classes=classes,
        preprocess=encoder.preprocess,
    )
    return save_checkpoint(detector, manifest, path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    make_checkpoint(path)
    return path


def image_bytes(
    size: tuple[int, int] = (80, 64),
    color: tuple[int, int, int] = (10, 120, 200),
    fmt: str = "PNG",
) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    from kafka_fixture import kafka_bootstrap as broker

    with broker() as bootstrap:
        yield bootstrap
