"""``clipguard import``: a published linear probe scores through the engine exactly as the
probe applied by hand; untrusted pickles and mismatched heads are refused with clear messages."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from clipguard.cli.main import main
from clipguard.detector import EngineConfig, InferenceEngine, read_manifest
from clipguard.detector import checkpoint as checkpoint_module
from clipguard.detector.backbones import BackboneSpec, Encoder, build_encoder, build_vision_tower
from clipguard.detector.errors import CheckpointError
from clipguard.detector.preprocess import preprocess
from clipguard.detector.published import GENERIC_SOURCE, HeadImport, import_head
from clipguard.training import zoo

TINY_DIM = build_encoder(BackboneSpec()).feature_dim
EXECUTED = Path("/tmp/clipguard-import-test-executed")


def _probe(path: Path, dim: int = TINY_DIM, seed: int = 0) -> nn.Linear:
    """Write ``fc_weights.pth`` the way UniversalFakeDetect publishes it: torch.save of a
    Linear's state dict."""
    torch.manual_seed(seed)
    layer = nn.Linear(dim, 1)
    torch.save(layer.state_dict(), path)
    return layer


def _images() -> list[Image.Image]:
    return [s.image for s in zoo.generate(12, size=96, seed=5)]


def test_pth_probe_scores_through_the_engine_as_the_probe_by_hand(tmp_path: Path) -> None:
    head = tmp_path / "fc_weights.pth"
    probe = _probe(head)
    out = tmp_path / "ck"
    argv = ["import", str(head), "--out", str(out), "--preprocess", "crop", "--image-size", "64"]
    assert main([*argv, "--licence", "test-only"]) == 0
    manifest = read_manifest(out)
    assert manifest.classes == ["real", GENERIC_SOURCE]
    assert manifest.backbone_weights == "included" and manifest.feature_norm == "none"
    assert manifest.calibration.temperature == 1.0 and manifest.calibration.threshold == 0.5
    assert manifest.training["imported"]["licence"] == "test-only"
    assert len(manifest.training["imported"]["sha256"]) == 64

    # By hand: a fresh open_clip tower with the checkpoint's encoder weights, the .pth's
    # tensors, torch's linear and sigmoid, on the same preprocessed pixels.
    stored = load_file(str(out / "model.safetensors"))
    tower = build_vision_tower(manifest.backbone)
    tower.load_state_dict({k[len("encoder.") :]: v for k, v in stored.items() if "encoder." in k})
    tower.eval()
    pixels = torch.stack([preprocess(image, manifest.preprocess) for image in _images()])
    raw = torch.load(head, weights_only=True)
    with torch.no_grad():
        by_hand = torch.sigmoid(nn.functional.linear(tower(pixels), raw["weight"], raw["bias"]))
        also = torch.sigmoid(probe(tower(pixels)))
    engine = InferenceEngine.from_checkpoint(out, EngineConfig(dtype="float32", device="cpu"))
    ai, sources = engine.scores(pixels)
    assert torch.allclose(ai, by_hand[:, 0], atol=1e-6), (ai - by_hand[:, 0]).abs().max()
    assert torch.allclose(ai, also[:, 0], atol=1e-6)
    assert torch.allclose(sources[:, 1], ai, atol=1e-6)  # the source head repeats the probe
    predictions = engine.predict_images(_images())
    assert [p.ai_score for p in predictions] == pytest.approx(by_hand[:, 0].tolist(), abs=1e-6)


def test_safetensors_head_with_a_prefix_and_a_single_file_checkpoint(tmp_path: Path) -> None:
    layer = nn.Linear(TINY_DIM, 1)
    head = tmp_path / "head.safetensors"
    save_file({"fc.weight": layer.weight.detach(), "fc.bias": layer.bias.detach()}, str(head))
    out = tmp_path / "single.safetensors"
    manifest = import_head(head, out, HeadImport(backbone="clipguard-tiny", pretrained=None))
    engine = InferenceEngine.from_checkpoint(out, EngineConfig(dtype="float32"))
    assert engine.classes == ["real", GENERIC_SOURCE]
    assert manifest.preprocess.policy == "resize"


class _Executes:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (EXECUTED.touch, ())


class _Evaluates:
    """What a pickled lambda or any code comes down to: a callable named by the stream."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, (f"__import__('pathlib').Path('{EXECUTED}').touch()",))


@pytest.mark.parametrize(
    "payload",
    [
        {"weight": torch.zeros(1, 4), "bias": _Executes()},
        _Executes(),
        {"weight": _Evaluates()},
    ],
    ids=["class-in-dict", "class", "code"],
)
def test_pickled_objects_are_refused_without_running(tmp_path: Path, payload: object) -> None:
    EXECUTED.unlink(missing_ok=True)
    head = tmp_path / "evil.pth"
    torch.save(payload, head, pickle_module=pickle)
    with pytest.raises(Exception, match="not a plain state dict of tensors"):
        import_head(head, tmp_path / "ck", HeadImport(backbone="clipguard-tiny", pretrained=None))
    assert not EXECUTED.exists()
    assert not (tmp_path / "ck").exists()


def test_unexpected_keys_and_non_tensor_values_are_refused(tmp_path: Path) -> None:
    head = tmp_path / "odd.pth"
    torch.save(
        {"weight": torch.zeros(1, TINY_DIM), "bias": torch.zeros(1), "epoch": torch.ones(1)}, head
    )
    with pytest.raises(
        Exception, match=r"expected exactly the keys 'weight'.*found \['bias', 'epoch', 'weight'\]"
    ):
        import_head(head, tmp_path / "ck", HeadImport(backbone="clipguard-tiny", pretrained=None))
    torch.save({"weight": torch.zeros(1, TINY_DIM), "note": "x"}, head)
    with pytest.raises(Exception, match="not tensors: \\['note'\\]"):
        import_head(head, tmp_path / "ck", HeadImport(backbone="clipguard-tiny", pretrained=None))


def test_shape_mismatches_name_both_numbers(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    head = tmp_path / "fc_weights.pth"
    _probe(head, dim=768)
    assert main(["import", str(head), "--out", str(tmp_path / "ck")]) == 1
    err = capsys.readouterr().err
    assert f"768-dim features but clipguard-tiny gives {TINY_DIM}-dim" in err
    torch.save({"weight": torch.zeros(2, TINY_DIM), "bias": torch.zeros(2)}, head)
    assert main(["import", str(head), "--out", str(tmp_path / "ck")]) == 1
    assert "expected weight (1, D) and bias (1,)" in capsys.readouterr().err


def test_ufd_preset_writes_a_heads_only_checkpoint_on_vit_l_14_openai(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No download here: the checkpoint records the tag, holds the head only, and loading
    builds the backbone by that tag (stood in for by the tiny encoder, a 768-dim head on it
    would not fit, so the stand-in reports 768 features through a projection)."""
    head = tmp_path / "fc_weights.pth"
    _probe(head, dim=768)
    out = tmp_path / "ufd"
    assert main(["import", str(head), "--preset", "ufd", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["backbone"] == "ViT-L-14" and printed["pretrained"] == "openai"
    manifest = read_manifest(out)
    assert manifest.backbone_weights == "pretrained" and manifest.feature_dim == 768
    assert manifest.preprocess.policy == "crop" and manifest.preprocess.image_size == 224
    assert manifest.preprocess.mean == (0.48145466, 0.4578275, 0.40821073)
    assert manifest.training["imported"]["source"].startswith("UniversalFakeDetect")
    assert set(load_file(str(out / "model.safetensors"))) == {
        "binary_head.weight",
        "binary_head.bias",
        "source_head.weight",
        "source_head.bias",
    }

    requested: list[BackboneSpec] = []

    def fake_build(spec: BackboneSpec) -> Encoder:
        requested.append(spec)
        tiny = build_encoder(BackboneSpec())
        module = nn.Sequential(tiny.module, nn.Linear(tiny.feature_dim, 768))
        return Encoder(module, 768, tiny.model_config, tiny.preprocess)

    monkeypatch.setattr(checkpoint_module, "build_encoder", fake_build)
    engine = InferenceEngine.from_checkpoint(out, EngineConfig(dtype="float32"))
    assert requested == [BackboneSpec(name="ViT-L-14", pretrained="openai")]
    assert engine.classes == ["real", GENERIC_SOURCE]

    def wrong_dim(spec: BackboneSpec) -> Encoder:
        return build_encoder(BackboneSpec())

    monkeypatch.setattr(checkpoint_module, "build_encoder", wrong_dim)
    with pytest.raises(CheckpointError, match=f"gives {TINY_DIM}-dim features.*expect 768"):
        InferenceEngine.from_checkpoint(out)


def test_unknown_tag_is_refused(tmp_path: Path) -> None:
    head = tmp_path / "fc_weights.pth"
    _probe(head, dim=768)
    spec = HeadImport(backbone="ViT-L-14", pretrained="not-a-tag")
    with pytest.raises(Exception, match="neither a file nor a tag of ViT-L-14"):
        import_head(head, tmp_path / "ck", spec)
