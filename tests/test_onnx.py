"""ONNX export and the ONNX Runtime engine on the tiny model: parity, batches, the extra."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from conftest import image_bytes

from clipguard.cli.export import CALIBRATION_SEED, HELD_OUT_SEED, zoo_pixels
from clipguard.cli.main import main
from clipguard.detector import EngineConfig, InferenceEngine, load_checkpoint
from clipguard.detector.onnx_engine import OnnxEngine
from clipguard.detector.onnx_parity import (
    BATCH_MAX_DELTA,
    FP32_MAX_DELTA,
    INT8_P99_DELTA,
    ParityError,
    batch_independence,
)
from clipguard.detector.onnx_pipeline import export_onnx
from clipguard.detector.onnx_quantize import quantize_int8
from clipguard.detector.onnx_runtime import (
    EXTRA_HINT,
    MissingExtraError,
    open_session,
    require_onnxruntime,
)

PARITY = 24


@pytest.fixture(scope="module")
def exported(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny checkpoint exported once in fp32 and once in static int8, by the command."""
    out = tmp_path_factory.mktemp("onnx")
    files = {"fp32": out / "tiny.onnx", "int8": out / "tiny-int8.onnx"}
    common = ["--checkpoint", str(tiny_checkpoint), "--format", "onnx"]
    sizes = ["--parity-images", str(PARITY), "--calibration-images", "16"]
    assert main(["export", *common, "--out", str(files["fp32"]), *sizes]) == 0
    assert main(["export", *common, "--out", str(files["int8"]), "--quantize", "int8", *sizes]) == 0
    return files


def _held_out(checkpoint: Path, count: int = PARITY) -> torch.Tensor:
    _, manifest = load_checkpoint(checkpoint)
    return torch.from_numpy(zoo_pixels(count, manifest.preprocess, HELD_OUT_SEED))


def test_export_prints_its_parity_and_embeds_the_manifest(
    exported: dict[str, Any], tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnx

    _, manifest = load_checkpoint(tiny_checkpoint)
    model = onnx.load(str(exported["fp32"]))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["clipguard.manifest"]) == json.loads(manifest.model_dump_json())
    record = json.loads(meta["clipguard.export"])
    assert record["quantize"] == "none" and record["source_sha256"] == manifest.sha256
    assert record["parity"]["max_abs_delta_ai_score"] <= FP32_MAX_DELTA
    assert record["parity"]["max_abs_delta_source_prob"] <= FP32_MAX_DELTA
    # Dynamic batch axis in, (N,) and (N,C) out.
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value
    session = open_session(exported["fp32"], threads=1)
    for n in (1, 5):
        ai, probs, *_ = session.run(None, {"pixels": _held_out(tiny_checkpoint, n).numpy()})
        assert ai.shape == (n,) and probs.shape == (n, len(manifest.classes))


def test_export_refuses_to_write_past_the_tolerance(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("clipguard.detector.onnx_parity.FP32_MAX_DELTA", -1.0)  # unreachable
    detector, manifest = load_checkpoint(tiny_checkpoint)
    out = tmp_path / "refused.onnx"
    with pytest.raises(ParityError, match="export refused: fp32 max") as caught:
        export_onnx(detector, manifest, out, _held_out(tiny_checkpoint, 4).numpy())
    assert caught.value.record["parity"]["images"] == 4
    assert not out.exists()


def test_onnx_engine_matches_torch_one_prediction_per_input(
    exported: dict[str, Any], tiny_checkpoint: Path
) -> None:
    config = EngineConfig(device="cpu", dtype="float32", max_batch_size=8, threads=1)
    onnx_engine = InferenceEngine.from_checkpoint(exported["fp32"], config)
    torch_engine = InferenceEngine.from_checkpoint(tiny_checkpoint, config)
    assert isinstance(onnx_engine, OnnxEngine)
    assert onnx_engine.manifest == torch_engine.manifest
    assert (str(onnx_engine.device), onnx_engine.dtype) == ("cpu", torch.float32)
    assert onnx_engine.dtype_reason == "onnx_fp32"
    onnx_engine.warm_up()
    pixels = _held_out(tiny_checkpoint, 19)  # not a multiple of the batch size
    got = onnx_engine.predict_tensors(pixels)
    want = torch_engine.predict_tensors(pixels)
    assert len(got) == len(want) == 19
    for a, b in zip(got, want, strict=True):
        assert abs(a.ai_score - b.ai_score) <= FP32_MAX_DELTA
        assert a.label == b.label and a.source == b.source
    # Several views per image are aggregated by the engine, as on torch.
    views = [pixels[:2], pixels[2:5], pixels[5]]
    a_scores = onnx_engine.scores(views)[0]
    b_scores = torch_engine.scores(views)[0]
    assert a_scores.shape == (3,) and torch.allclose(a_scores, b_scores, atol=FP32_MAX_DELTA)


def test_int8_static_is_close_to_torch_and_batch_independent(
    exported: dict[str, Any], tiny_checkpoint: Path
) -> None:
    engine = InferenceEngine.from_checkpoint(exported["int8"], EngineConfig(threads=1))
    assert engine.dtype == torch.qint8 and engine.dtype_reason == "onnx_int8_static"
    reference = InferenceEngine.from_checkpoint(tiny_checkpoint, EngineConfig(dtype="float32"))
    pixels = _held_out(tiny_checkpoint)
    delta = (engine.scores(pixels)[0] - reference.scores(pixels)[0]).abs()
    assert float(torch.quantile(delta, 0.99)) <= INT8_P99_DELTA
    measured = batch_independence(engine.session, pixels.numpy())
    assert measured["ok"] and measured["max_abs_delta_ai_score"] <= BATCH_MAX_DELTA


def test_int8_weights_use_seven_bits_so_cpus_without_vnni_do_not_saturate(
    exported: dict[str, Any],
) -> None:
    """On x86 without VNNI, u8 x s8 products are summed in pairs with 16-bit saturation;
    weights in [-64, 64] keep every pair in range: 2 x 255 x 64 < 32767 (docs/onnx.md)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(exported["int8"])).graph
    weights = [
        numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8
    ]
    assert weights  # the matrix products were quantised
    assert all(int(abs(w.astype("int16")).max()) <= 64 for w in weights)
    assert max(int(abs(w.astype("int16")).max()) for w in weights) == 64  # the range is used
    record = json.loads(
        {p.key: p.value for p in onnx.load(str(exported["int8"])).metadata_props}[
            "clipguard.export"
        ]
    )
    assert record["weight_bits"] == 7


def test_dynamic_int8_depends_on_the_batch_which_is_why_static_is_used(
    exported: dict[str, Any], tmp_path: Path
) -> None:
    """The measurement behind the choice: per-batch activation scales move scores."""
    dynamic = tmp_path / "dynamic.onnx"
    record = quantize_int8(exported["fp32"], dynamic, "dynamic")
    assert record["mode"] == "dynamic" and record["fp32_nodes"] > 0
    pixels = zoo_pixels(PARITY, OnnxEngine(exported["fp32"]).preprocess, CALIBRATION_SEED)
    measured = batch_independence(open_session(dynamic, threads=1), pixels)
    assert measured["max_abs_delta_ai_score"] > BATCH_MAX_DELTA


def test_a_missing_onnxruntime_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
    exported: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'clipguard\[onnx\]'") as caught:
        require_onnxruntime()
    assert EXTRA_HINT in str(caught.value) and "onnxruntime" in str(caught.value)
    with pytest.raises(MissingExtraError):
        InferenceEngine.from_checkpoint(exported["fp32"])
    image = tmp_path / "x.png"
    image.write_bytes(image_bytes())
    assert main(["predict", "--checkpoint", str(exported["fp32"]), str(image)]) == 1
    assert "clipguard[onnx]" in capsys.readouterr().err


def test_serving_an_onnx_file_with_a_gpu_device_is_refused(exported: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="CPU"):
        OnnxEngine(exported["fp32"], EngineConfig(device="cuda"))
