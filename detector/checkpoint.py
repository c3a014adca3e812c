"""Checkpoints: safetensors weights plus a JSON manifest, the detector's input contract.

Two equivalent forms: a directory holding ``model.safetensors`` and ``manifest.json``,
or a single ``.safetensors`` file with the manifest in its metadata. Loading rebuilds the
encoder from the open_clip config stored in the manifest, so it needs no network, and
checks the weights against the manifest's sha256. Never pickle.

An imported head on a published backbone (``clipguard import``) may leave the encoder out:
``backbone_weights: pretrained`` means the file holds the heads only and loading builds the
encoder from the manifest's open_clip ``pretrained`` tag (open_clip fetches and caches it:
the one case where loading needs the network, once).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clipguard.detector.backbones import BackboneSpec, Encoder, build_encoder, rebuild_encoder
from clipguard.detector.errors import BackboneError, CheckpointError
from clipguard.detector.heads import Detector, FeatureNorm
from clipguard.detector.multilayer import MultilayerSpec
from clipguard.detector.policy import Policy
from clipguard.detector.preprocess import PreprocessConfig

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
METADATA_KEY = "clipguard.manifest"
FORMAT_VERSION = 1


def clipguard_version() -> str:
    try:
        return importlib_metadata.version("clipguard")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


class Calibration(BaseModel):
    """``ai_score = sigmoid(logit / temperature + bias)`` and the score at which the label
    flips to AI. ``bias`` 0 is what checkpoints written before ``clipguard calibrate`` mean."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(default=1.0, gt=0.0)
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    target_fpr: float | None = None
    bias: float = 0.0


class Recalibration(BaseModel):
    """Where a re-calibrated checkpoint came from (``clipguard calibrate``): same weights,
    new calibration and policy, fitted on the platform's own images."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    parent_version: str
    parent_sha256: str
    calibrated_at: str
    #: ``labelled`` (both classes: temperature, bias, threshold) or ``real-only``.
    method: Literal["labelled", "real-only"]
    target_fpr: float
    #: Counts, folders and digests of the calibration images (never the images).
    data: dict[str, Any]
    report: dict[str, Any] = Field(default_factory=dict)


class Manifest(BaseModel):
    """Everything needed to rebuild, run and judge a detector, next to its weights."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["clipguard-detector"] = "clipguard-detector"
    format_version: int = FORMAT_VERSION
    version: str
    backbone: dict[str, Any]
    pretrained: str | None = None
    feature_dim: int = Field(gt=0)
    head: Literal["binary+source"] = "binary+source"
    #: ``l2``: features are L2-normalised before the heads (``--mode layernorm``).
    feature_norm: FeatureNorm = "none"
    #: RINE's head over every block's CLS token (``--mode multilayer``); absent: the heads
    #: read the encoder's final features (every checkpoint before it loads unchanged).
    multilayer: MultilayerSpec | None = None
    #: ``included``: the encoder's weights are in the file. ``pretrained``: heads only, the
    #: encoder comes from open_clip's ``pretrained`` tag at load (imported published heads).
    backbone_weights: Literal["included", "pretrained"] = "included"
    classes: list[str]
    preprocess: PreprocessConfig
    calibration: Calibration = Calibration()
    policy: Policy = Policy()
    #: The chain of re-calibrations, oldest first; empty for a checkpoint fresh from training.
    recalibrations: list[Recalibration] = Field(default_factory=list)
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    sha256: str = ""
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    clipguard_version: str = Field(default_factory=clipguard_version)

    @field_validator("classes")
    @classmethod
    def _real_first(cls, classes: list[str]) -> list[str]:
        if len(classes) < 2 or classes[0] != "real":
            raise ValueError("classes must start with 'real' and name at least one generator")
        if len(set(classes)) != len(classes):
            raise ValueError("class names must be unique")
        return classes

    @model_validator(mode="after")
    def _tag_for_external_backbone(self) -> Manifest:
        if self.backbone_weights == "pretrained" and not self.pretrained:
            raise ValueError("backbone_weights 'pretrained' needs the open_clip pretrained tag")
        return self

    @field_validator("format_version")
    @classmethod
    def _supported(cls, value: int) -> int:
        if value > FORMAT_VERSION:
            raise ValueError(
                f"checkpoint format {value} is newer than this clipguard supports "
                f"({FORMAT_VERSION}); upgrade clipguard"
            )
        return value

    @property
    def model_name(self) -> str:
        return str(self.backbone.get("name", "unknown"))

    @property
    def generators(self) -> list[str]:
        return self.classes[1:]


def new_detector(
    encoder: Encoder,
    classes: list[str],
    feature_norm: FeatureNorm = "none",
    multilayer: MultilayerSpec | None = None,
) -> Detector:
    return Detector(encoder.module, encoder.feature_dim, len(classes), feature_norm, multilayer)


HEAD_PREFIXES = ("binary_head.", "source_head.", "block_head.")


def _stored_state(detector: Detector, manifest: Manifest) -> dict[str, torch.Tensor]:
    """What the file holds: everything, or the heads alone over a fetched backbone."""
    state = _state_dict(detector)
    if manifest.backbone_weights == "pretrained":
        state = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIXES)}
    return state


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Content hash over names, dtypes, shapes and bytes: the same for both file forms."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # reshape(-1): a "contiguous" tensor with a size-1 dim may keep an odd stride there.
        flat = tensor.reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _state_dict(detector: Detector) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in detector.state_dict().items()}


def save_checkpoint(detector: Detector, manifest: Manifest, path: str | Path) -> Manifest:
    """Write weights and manifest; returns the manifest with its sha256 filled in."""
    path = Path(path)
    if detector.feature_norm != manifest.feature_norm:
        raise CheckpointError(
            f"the detector normalises features {detector.feature_norm!r}, the manifest says "
            f"{manifest.feature_norm!r}: they must agree"
        )
    if manifest.multilayer is not None and detector.multilayer != manifest.multilayer:
        raise CheckpointError(
            f"the detector's multilayer head is {detector.multilayer!r}, the manifest says "
            f"{manifest.multilayer!r}: they must agree"
        )
    state = _stored_state(detector, manifest)
    # The head's shape comes from the model itself, like the weights' hash.
    update = {"sha256": weights_sha256(state), "multilayer": detector.multilayer}
    manifest = manifest.model_copy(update=update)
    manifest_json = manifest.model_dump_json(indent=2)
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path), metadata={METADATA_KEY: manifest_json})
    else:
        path.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path / WEIGHTS_FILE))
        (path / MANIFEST_FILE).write_text(manifest_json + "\n", encoding="utf-8")
    return manifest


def _read_single_file_manifest(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if METADATA_KEY not in meta:
        raise CheckpointError(
            f"{path} has no {METADATA_KEY!r} metadata: not a clipguard checkpoint"
        )
    return meta[METADATA_KEY]


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate the manifest alone (cheap: no weights loaded)."""
    path = Path(path)
    try:
        if path.is_dir():
            raw = (path / MANIFEST_FILE).read_text(encoding="utf-8")
        elif path.is_file():
            raw = _read_single_file_manifest(path)
        else:
            raise CheckpointError(f"checkpoint not found: {path}")
        return Manifest.model_validate_json(raw)
    except CheckpointError:
        raise
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is not a checkpoint: {exc.filename} is missing") from exc
    except ValidationError as exc:
        raise CheckpointError(f"invalid manifest in {path}: {exc}") from exc
    except (OSError, SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def load_checkpoint(path: str | Path) -> tuple[Detector, Manifest]:
    """Rebuild a detector from a checkpoint on the CPU, verifying its weights."""
    path = Path(path)
    manifest = read_manifest(path)
    weights_path = path / WEIGHTS_FILE if path.is_dir() else path
    try:
        state = load_file(str(weights_path), device="cpu")
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read weights {weights_path}: {exc}") from exc
    actual = weights_sha256(state)
    if manifest.sha256 and actual != manifest.sha256:
        raise CheckpointError(
            f"weights in {weights_path} do not match the manifest (sha256 {actual[:12]}… != "
            f"{manifest.sha256[:12]}…): the checkpoint is corrupt or was edited"
        )
    encoder = _encoder_for(manifest, path)
    detector = Detector(
        encoder,
        manifest.feature_dim,
        len(manifest.classes),
        manifest.feature_norm,
        manifest.multilayer,
    )
    _load_weights(detector, state, manifest, path)
    detector.eval()
    if not manifest.sha256:
        manifest = manifest.model_copy(update={"sha256": actual})
    return detector, manifest


def _encoder_for(manifest: Manifest, path: Path) -> torch.nn.Module:
    """The stored config rebuilt offline, or the published backbone fetched by its tag."""
    try:
        if manifest.backbone_weights == "included":
            return rebuild_encoder(manifest.backbone)
        spec = BackboneSpec(name=manifest.model_name, pretrained=manifest.pretrained)
        encoder = build_encoder(spec)
    except BackboneError as exc:
        raise CheckpointError(f"cannot rebuild the encoder of {path}: {exc}") from exc
    if encoder.feature_dim != manifest.feature_dim:
        raise CheckpointError(
            f"{manifest.model_name}/{manifest.pretrained} gives {encoder.feature_dim}-dim "
            f"features, the heads of {path} expect {manifest.feature_dim}"
        )
    return encoder.module


def _load_weights(
    detector: Detector, state: dict[str, torch.Tensor], manifest: Manifest, path: Path
) -> None:
    """Strict for a full checkpoint; for a heads-only one, strict on the heads."""
    try:
        if manifest.backbone_weights == "included":
            detector.load_state_dict(state, strict=True)
            return
        missing, unexpected = detector.load_state_dict(state, strict=False)
        stray = [k for k in missing if k.startswith(HEAD_PREFIXES)] + list(unexpected)
        if stray:
            raise RuntimeError(f"missing or unexpected head weights: {sorted(stray)}")
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {path} do not fit the manifest's model: {exc}") from exc
