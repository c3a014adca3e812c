"""Checkpoints: round trips, integrity, offline loading, and pretrained weight files."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import CLASSES, make_checkpoint
from safetensors.torch import save_file

from clipguard.detector import BackboneSpec, build_encoder, load_checkpoint, read_manifest
from clipguard.detector.backbones import available_backbones
from clipguard.detector.errors import BackboneError, CheckpointError


@pytest.mark.parametrize("name", ["tiny", "tiny.safetensors"])
def test_round_trip_gives_identical_outputs(tmp_path: Path, name: str) -> None:
    from clipguard.detector.heads import Detector  # noqa: F401 - type only

    torch.manual_seed(3)
    manifest = make_checkpoint(tmp_path / name, seed=3)
    detector, loaded = load_checkpoint(tmp_path / name)
    torch.manual_seed(3)
    reference_manifest = make_checkpoint(tmp_path / "again", seed=3)
    reference, _ = load_checkpoint(tmp_path / "again")
    pixels = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        a, b = detector(pixels), reference(pixels)
    assert torch.equal(a.binary_logit, b.binary_logit)
    assert torch.equal(a.source_logits, b.source_logits)
    assert loaded.sha256 == manifest.sha256 == reference_manifest.sha256
    assert loaded.classes == CLASSES


def test_save_load_save_keeps_weights(tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "a")
    detector, manifest = load_checkpoint(tmp_path / "a")
    from clipguard.detector import save_checkpoint

    resaved = save_checkpoint(detector, manifest, tmp_path / "b.safetensors")
    assert resaved.sha256 == manifest.sha256
    assert read_manifest(tmp_path / "b.safetensors").sha256 == manifest.sha256


def test_manifest_is_json_with_contract_fields(tiny_checkpoint: Path) -> None:
    data = json.loads((tiny_checkpoint / "manifest.json").read_text())
    for key in ("backbone", "classes", "preprocess", "calibration", "policy", "sha256", "version"):
        assert key in data
    assert data["classes"][0] == "real"
    assert data["backbone"]["name"] == "clipguard-tiny"


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    detector, _ = load_checkpoint(tmp_path / "ck")
    state = {k: v.clone() for k, v in detector.state_dict().items()}
    state["binary_head.bias"] += 1.0
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="do not match the manifest"):
        load_checkpoint(tmp_path / "ck")


def test_missing_and_malformed_checkpoints_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "empty")
    make_checkpoint(tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    manifest["classes"] = ["ai", "real"]
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="real"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "junk.safetensors")


def test_loads_with_the_network_unavailable(tiny_checkpoint: Path, monkeypatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    detector, manifest = load_checkpoint(tiny_checkpoint)
    with torch.inference_mode():
        out = detector(torch.zeros(1, 3, 64, 64))
    assert out.source_logits.shape == (1, len(manifest.classes))


def test_pretrained_local_weights_file_is_loaded(tmp_path: Path) -> None:
    """An open_clip checkpoint on disk is the offline stand-in for a pretrained tag."""
    torch.manual_seed(11)
    source = open_clip.create_model("clipguard-tiny")
    weights = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    encoder = build_encoder(BackboneSpec(name="clipguard-tiny", pretrained=str(weights)))
    expected = {k: v for k, v in source.visual.state_dict().items()}
    got = encoder.module.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    fresh = build_encoder(BackboneSpec(name="clipguard-tiny"))
    assert not torch.equal(fresh.module.conv1.weight, got["conv1.weight"])


def test_backbone_errors_are_actionable(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="unknown backbone"):
        build_encoder(BackboneSpec(name="no-such-model"))
    with pytest.raises(BackboneError, match="not found"):
        build_encoder(BackboneSpec(name="clipguard-tiny", pretrained=str(tmp_path / "x.pt")))


@pytest.mark.parametrize("name", ["clipguard-tiny", "ViT-B-32", "RN50"])
def test_registered_backbones_build_without_weights(name: str) -> None:
    """timm's habit: every backbone we name builds and runs a forward pass."""
    assert name in available_backbones()
    encoder = build_encoder(BackboneSpec(name=name))
    size = encoder.preprocess.image_size
    with torch.inference_mode():
        features = encoder.module(torch.zeros(1, 3, size, size))
    assert features.shape == (1, encoder.feature_dim)
