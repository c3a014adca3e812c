"""Published linear detector heads (plain tensors) -> clipguard checkpoints.

A probe such as UniversalFakeDetect's ``fc_weights.pth`` is one ``nn.Linear(D, 1)`` on an
open_clip backbone's image features. It becomes a checkpoint whose engine computes exactly
``sigmoid(w . features + b)``: the binary head is the probe, and the source head (the probe
cannot attribute) is ``[0, w . f + b]`` over ``real`` and one generic generator class, so its
softmax equals the binary score. Files are untrusted bytes: ``.safetensors`` is read by
safetensors, ``.pth`` only by ``torch.load(weights_only=True)``, never by plain pickle.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError
from safetensors.torch import load_file

from clipguard.detector.backbones import BackboneSpec, build_encoder, open_clip_config
from clipguard.detector.checkpoint import Manifest, new_detector, save_checkpoint
from clipguard.detector.errors import ClipguardError
from clipguard.detector.heads import Detector
from clipguard.detector.preprocess import PreprocessConfig

#: The generic generator class of a one-logit probe (it says AI or not, never which).
GENERIC_SOURCE = "unattributed"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class HeadImportError(ClipguardError):
    """The head file or the requested backbone cannot make a checkpoint."""

    stage = "import"
    reason = "invalid_head"


class HeadImport(BaseModel):
    """What the head sits on and where it came from (recorded in the manifest)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backbone: str
    #: open_clip tag (heads-only checkpoint, fetched at load), local file or None (baked in).
    pretrained: str | None
    preprocess: Literal["resize", "crop", "scale_first"] = "resize"
    image_size: int | None = Field(default=None, gt=0, le=4096)
    source_name: str = "imported linear head"
    licence: str | None = None
    version: str | None = None


#: UniversalFakeDetect (Ojha et al., CVPR 2023): ViT-L/14 OpenAI, centre crop 224.
UFD = {"backbone": "ViT-L-14", "pretrained": "openai", "preprocess": "crop", "image_size": 224}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A flat mapping of tensors from a file, or a clear refusal. Never unpickles objects."""
    try:
        if path.suffix == ".safetensors":
            loaded: Any = load_file(str(path), device="cpu")
        elif path.suffix in PICKLE_SUFFIXES:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise HeadImportError(f"{path}: expected a .safetensors or .pth state dict")
    except HeadImportError:
        raise
    except (OSError, SafetensorError) as exc:
        raise HeadImportError(f"cannot read {path}: {exc}") from exc
    except Exception as exc:  # weights_only refuses classes, lambdas, any non-tensor pickle
        raise HeadImportError(
            f"{path} is not a plain state dict of tensors (refused without executing it): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    if not isinstance(loaded, dict) or not loaded:
        raise HeadImportError(f"{path} holds a {type(loaded).__name__}, not a mapping of tensors")
    odd = sorted(str(k) for k, v in loaded.items() if not isinstance(v, torch.Tensor))
    if odd:
        raise HeadImportError(f"{path}: entries that are not tensors: {odd}")
    return {str(k): v for k, v in loaded.items()}


def linear_head(tensors: dict[str, torch.Tensor], path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (1, D) and ``bias`` (1,), optionally under one shared prefix (``fc.``)."""
    weights = [k for k in tensors if k == "weight" or k.endswith(".weight")]
    prefix = weights[0][: -len("weight")] if len(weights) == 1 else None
    expected = {f"{prefix}weight", f"{prefix}bias"} if prefix is not None else set()
    if set(tensors) != expected:
        raise HeadImportError(
            f"{path}: expected exactly the keys 'weight' (1, D) and 'bias' (1,) of one linear "
            f"layer, found {sorted(tensors)}"
        )
    weight, bias = tensors[f"{prefix}weight"], tensors[f"{prefix}bias"]
    if weight.dim() != 2 or weight.shape[0] != 1 or tuple(bias.shape) != (1,):
        raise HeadImportError(
            f"{path}: expected weight (1, D) and bias (1,) of a one-logit linear layer, found "
            f"weight {tuple(weight.shape)} and bias {tuple(bias.shape)}"
        )
    return weight.float(), bias.float()


def install_probe(detector: Detector, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Binary head = the probe; source head = [0, probe]: softmax equals sigmoid(probe)."""
    with torch.no_grad():
        detector.binary_head.weight.copy_(weight)
        detector.binary_head.bias.copy_(bias)
        detector.source_head.weight.zero_()
        detector.source_head.bias.zero_()
        detector.source_head.weight[1].copy_(weight[0])
        detector.source_head.bias[1].copy_(bias[0])


def _is_tag(backbone: str, pretrained: str | None) -> bool:
    """A published tag (heads-only checkpoint); a file or None is built and baked in."""
    if pretrained is None or Path(pretrained).is_file():
        return False
    tags = open_clip.list_pretrained_tags_by_model(backbone)
    if pretrained not in tags:
        raise HeadImportError(
            f"--pretrained {pretrained!r} is neither a file nor a tag of {backbone} "
            f"(tags: {', '.join(tags) or 'none'})"
        )
    return True


def _published_encoder_facts(spec: HeadImport) -> tuple[dict[str, Any], int, PreprocessConfig]:
    """Config, feature dim and input contract of a tagged backbone, without its weights."""
    assert spec.pretrained is not None
    config = open_clip_config(spec.backbone)
    cfg = open_clip.get_pretrained_cfg(spec.backbone, spec.pretrained)
    config["quick_gelu"] = bool(cfg.get("quick_gelu", config.get("quick_gelu", False)))
    config.pop("text_cfg", None)
    size = config["vision_cfg"]["image_size"]
    preprocess = PreprocessConfig(
        image_size=int(size[0] if isinstance(size, (list, tuple)) else size),
        mean=tuple(cfg.get("mean", PreprocessConfig.model_fields["mean"].default)),
        std=tuple(cfg.get("std", PreprocessConfig.model_fields["std"].default)),
    )
    return {"name": spec.backbone, **config}, int(config["embed_dim"]), preprocess


def import_head(head_path: Path, out: Path, spec: HeadImport) -> Manifest:
    """Read, check and convert one linear head; returns the saved manifest."""
    weight, bias = linear_head(read_tensors(head_path), head_path)
    external = _is_tag(spec.backbone, spec.pretrained)
    if external:
        backbone_cfg, feature_dim, preprocess = _published_encoder_facts(spec)
        detector = Detector(torch.nn.Identity(), feature_dim, 2)
    else:
        encoder = build_encoder(BackboneSpec(name=spec.backbone, pretrained=spec.pretrained))
        backbone_cfg, feature_dim, preprocess = (
            encoder.model_config,
            encoder.feature_dim,
            encoder.preprocess,
        )
        detector = new_detector(encoder, ["real", GENERIC_SOURCE])
    if weight.shape[1] != feature_dim:
        raise HeadImportError(
            f"{head_path}: the head takes {weight.shape[1]}-dim features but {spec.backbone} "
            f"gives {feature_dim}-dim features; pick the backbone the head was trained on"
        )
    update: dict[str, Any] = {"policy": spec.preprocess}
    if spec.image_size is not None:
        update["image_size"] = spec.image_size
    preprocess = PreprocessConfig.model_validate({**preprocess.model_dump(), **update})
    install_probe(detector, weight, bias)
    digest = hashlib.sha256(head_path.read_bytes()).hexdigest()
    manifest = Manifest(
        version=spec.version or f"imported-{spec.backbone}-{digest[:12]}",
        backbone=backbone_cfg,
        pretrained=spec.pretrained,
        backbone_weights="pretrained" if external else "included",
        feature_dim=feature_dim,
        classes=["real", GENERIC_SOURCE],
        preprocess=preprocess,
        training={
            "mode": "imported",
            "imported": {
                "file": head_path.name,
                "sha256": digest,
                "source": spec.source_name,
                "licence": spec.licence,
                "features": "open_clip image features (projected, not normalised)",
                "source_head": f"[0, probe logit] over real/{GENERIC_SOURCE}",
            },
        },
    )
    return save_checkpoint(detector, manifest, out)
