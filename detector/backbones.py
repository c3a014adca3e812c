"""Image encoders: any open_clip model, built by name through one factory.

Backbones are data (open_clip's JSON model configs); ``clipguard-tiny`` is one more
config, registered at run time, small enough for CPU tests and the demo. The open_clip
config travels inside every checkpoint, so loading one needs neither the network nor the
registry.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import QuickGELU, _build_vision_tower
from pydantic import BaseModel, ConfigDict
from torch import nn

from clipguard.detector.errors import BackboneError
from clipguard.detector.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PreprocessConfig

TINY_BACKBONE = "clipguard-tiny"
_CONFIG_DIR = Path(__file__).parent / "model_configs"


@functools.cache
def register_builtin_configs() -> None:
    """Make ``clipguard-tiny`` (and any future config of ours) known to open_clip."""
    open_clip.add_model_config(_CONFIG_DIR)


class BackboneSpec(BaseModel):
    """Which encoder to build: an open_clip model name and where its weights come from.

    ``pretrained`` is an open_clip tag (downloaded on first use, e.g. ``openai``), a
    local weights file (an open_clip checkpoint, ``.safetensors`` preferred), or ``None``
    for random initialisation.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = TINY_BACKBONE
    pretrained: str | None = None


@dataclass
class Encoder:
    """A built image tower plus the facts a checkpoint needs to rebuild it offline."""

    module: nn.Module
    feature_dim: int
    model_config: dict[str, Any]
    preprocess: PreprocessConfig


def available_backbones() -> list[str]:
    register_builtin_configs()
    return sorted(open_clip.list_models())


def _model_config(name: str) -> dict[str, Any]:
    register_builtin_configs()
    config = open_clip.get_model_config(name)
    if config is None:
        raise BackboneError(
            f"unknown backbone {name!r}; choose an open_clip model name such as "
            f"{TINY_BACKBONE!r}, 'ViT-B-32' or 'ViT-L-14' (see `open_clip.list_models()`)"
        )
    return copy.deepcopy(config)


def open_clip_config(name: str) -> dict[str, Any]:
    """A copy of an open_clip model config by name (``clipguard-tiny`` included)."""
    return _model_config(name)


def build_vision_tower(model_config: dict[str, Any]) -> nn.Module:
    """Build only the image tower from an open_clip config: no text tower, no download."""
    try:
        return _build_vision_tower(
            embed_dim=model_config["embed_dim"],
            vision_cfg=model_config["vision_cfg"],
            quick_gelu=bool(model_config.get("quick_gelu", False)),
        )
    except (KeyError, TypeError) as exc:
        raise BackboneError(f"malformed open_clip model config: {exc}") from exc


def _feature_dim(visual: nn.Module, image_size: int) -> int:
    output_dim = getattr(visual, "output_dim", None)
    if isinstance(output_dim, int) and output_dim > 0:
        return output_dim
    with torch.inference_mode():
        probe = visual(torch.zeros(1, 3, image_size, image_size))
    return int(probe.shape[-1])


def _image_size(value: Any) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise BackboneError(f"non-square input size {tuple(value)} is not supported")
        return int(value[0])
    return int(value)


def _preprocess_from_open_clip(model: nn.Module) -> PreprocessConfig:
    cfg = open_clip.get_model_preprocess_cfg(model)
    interpolation = cfg.get("interpolation", "bicubic")
    return PreprocessConfig(
        image_size=_image_size(cfg.get("size", 224)),
        mean=tuple(cfg.get("mean", OPENAI_CLIP_MEAN)),
        std=tuple(cfg.get("std", OPENAI_CLIP_STD)),
        interpolation=interpolation if interpolation in ("bicubic", "bilinear") else "bicubic",
        jpeg_draft=True,  # new detectors train on what they serve: see decode_min_side
    )


def _load_pretrained(spec: BackboneSpec) -> nn.Module:
    """Full open_clip model with weights; only its image tower is kept."""
    assert spec.pretrained is not None
    if Path(spec.pretrained).suffix and not Path(spec.pretrained).exists():
        raise BackboneError(f"pretrained weights file not found: {spec.pretrained}")
    try:
        model = open_clip.create_model(spec.name, pretrained=spec.pretrained)
    except RuntimeError as exc:
        raise BackboneError(
            f"could not load pretrained weights {spec.pretrained!r} for {spec.name!r}: {exc}. "
            "Offline, pass a local open_clip weights file instead of a tag."
        ) from exc
    except Exception as exc:
        raise BackboneError(
            f"could not fetch pretrained weights {spec.pretrained!r} for {spec.name!r} "
            f"({type(exc).__name__}: {exc}). Offline, pass a local weights file."
        ) from exc
    return model


def build_encoder(spec: BackboneSpec) -> Encoder:
    """The one factory: name + weights source -> image encoder with its input contract."""
    model_config = _model_config(spec.name)
    if spec.pretrained is None:
        visual = build_vision_tower(model_config)
        preprocess = PreprocessConfig(
            image_size=_image_size(model_config["vision_cfg"]["image_size"]), jpeg_draft=True
        )
    else:
        full_model = _load_pretrained(spec)
        visual = full_model.visual
        preprocess = _preprocess_from_open_clip(full_model)
        del full_model
    # The effective activation decides whether rebuilt towers match these weights.
    model_config["quick_gelu"] = any(isinstance(m, QuickGELU) for m in visual.modules())
    model_config.pop("text_cfg", None)
    return Encoder(
        module=visual,
        feature_dim=_feature_dim(visual, preprocess.image_size),
        model_config={"name": spec.name, **model_config},
        preprocess=preprocess,
    )


def rebuild_encoder(model_config: dict[str, Any]) -> nn.Module:
    """Rebuild an image tower from the config stored in a checkpoint (offline)."""
    return build_vision_tower(model_config)
