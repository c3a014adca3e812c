"""Batched JPEG decode behind ``jpeg_decode_device``: the CPU fallback is today's path to the
bit, and the device pipeline (run here on the CPU through torchvision's decoder, as no GPU is
present) matches it within the tolerance docs/bench.md states."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import image_bytes
from PIL import Image
from streams import fresh_topics, produce, read_outputs, running_worker, worker_settings

from clipguard.cli.produce import upload_event
from clipguard.consumer.batching import Pending
from clipguard.consumer.config import SettingsError, WorkerSettings
from clipguard.consumer.judge import Judge
from clipguard.consumer.metrics import WorkerMetrics
from clipguard.consumer.records import RecordRef
from clipguard.consumer.sources import ImageSources
from clipguard.detector.decode import DecodeLimits, decode_image
from clipguard.detector.engine import EngineConfig, InferenceEngine
from clipguard.detector.errors import (
    CorruptImageError,
    DecompressionBombError,
    EmptyImageError,
    ImageTooLargeError,
)
from clipguard.detector.gpu_decode import BatchJpegDecoder, draft_scale
from clipguard.detector.policy import Policy
from clipguard.detector.preprocess import PreprocessConfig, decode_min_side, preprocess_views

# torchvision 0.29 deprecates its codecs (in favour of TorchCodec); the module filters this.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")

#: Tolerances in 8-bit levels (|diff| x std x 255), measured on the cases below with the
#: CPU emulation: resampled views mean <= 0.20, max 3 levels; DCT-scaled (jpeg_draft) decodes,
#: approximated by a box average, mean <= 0.75, max 9 levels. Bounds leave a little room.
RESAMPLED = (0.3, 4.0)
DCT_SCALED = (1.0, 12.0)


def _photo(width: int, height: int, orientation: int = 1, fmt: str = "JPEG") -> bytes:
    """Gradients plus noise (resampling differences show), EXIF orientation in the header."""
    rng = np.random.default_rng(width * 7 + height)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, quality=90, exif=exif)
    return buffer.getvalue()


def _reference(data: bytes, cfg: PreprocessConfig) -> torch.Tensor:
    return preprocess_views(decode_image(data, DecodeLimits(), decode_min_side(cfg)), cfg)


def _levels(a: torch.Tensor, b: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """|a - b| in 8-bit levels of the source pixels."""
    return (a - b).abs() * torch.tensor(cfg.std).view(1, 3, 1, 1) * 255


def _emulated(cfg: PreprocessConfig, limits: DecodeLimits | None = None) -> BatchJpegDecoder:
    return BatchJpegDecoder(cfg, limits or DecodeLimits(), emulate_on_cpu=True)


def test_the_cpu_decoder_is_exactly_todays_path() -> None:
    cfg = PreprocessConfig(image_size=96, views=3, jpeg_draft=True)
    decoder = BatchJpegDecoder(cfg, DecodeLimits())
    inputs = [_photo(400, 300, 6), _photo(200, 260, fmt="PNG"), _photo(300, 120, 3, "WEBP")]
    assert not decoder.active and decoder.plan(inputs[0]) is None
    for data, pixels in zip(inputs, decoder.decode_batch(inputs), strict=True):
        assert isinstance(pixels, torch.Tensor)
        assert torch.equal(pixels, _reference(data, cfg))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_native_crops_match_pillow_exactly_in_every_orientation(orientation: int) -> None:
    """No resampling involved: the tensor path must give the same bits, so the flips and
    transpositions of the eight EXIF orientations are the ones Pillow applies."""
    cfg = PreprocessConfig(image_size=64, policy="crop", views=4, grid=8)
    data = _photo(160, 112, orientation)
    [pixels] = _emulated(cfg).decode_batch([data])
    expected = _reference(data, cfg)
    assert isinstance(pixels, torch.Tensor) and pixels.shape == expected.shape == (4, 3, 64, 64)
    assert torch.equal(pixels, expected)


def test_orientation_from_xmp_or_a_broken_exif_block_as_pillow_applies_it() -> None:
    cfg = PreprocessConfig(image_size=64, policy="crop", views=4, grid=8)
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/'
        b'22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
        b'tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    )
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 255, (112, 160, 3), dtype=np.uint8))
    with_xmp, broken_exif = io.BytesIO(), io.BytesIO()
    image.save(with_xmp, format="JPEG", xmp=xmp)
    image.save(broken_exif, format="JPEG", exif=b"Exif\x00\x00MM\x00*\xff\xff\xff\xff")
    decoder = _emulated(cfg)
    for data, orientation in [(with_xmp.getvalue(), 6), (broken_exif.getvalue(), 1)]:
        job = decoder.plan(data)
        assert job is not None and job.orientation == orientation
        [pixels] = decoder.decode_batch([data])
        assert isinstance(pixels, torch.Tensor) and torch.equal(pixels, _reference(data, cfg))


@pytest.mark.parametrize(
    ("mode", "options", "on_device"),
    [
        ("L", {}, True),
        ("RGB", {"progressive": True}, True),
        ("RGB", {"subsampling": 2}, True),
        ("CMYK", {}, False),
    ],
)
def test_greyscale_progressive_subsampled_and_cmyk_jpegs(mode, options, on_device) -> None:
    """Greyscale, progressive and 4:2:0 JPEGs take the device path; CMYK stays on the CPU."""
    cfg = PreprocessConfig(image_size=64, policy="crop", views=4, grid=8)
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (113, 161, 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    data = buffer.getvalue()
    decoder = _emulated(cfg)
    assert (decoder.plan(data) is not None) == on_device
    [pixels] = decoder.decode_batch([data])
    assert isinstance(pixels, torch.Tensor) and torch.equal(pixels, _reference(data, cfg))


@pytest.mark.parametrize(
    ("size", "orientation", "cfg", "bound"),
    [
        ((640, 480), 6, PreprocessConfig(image_size=224, views=3), RESAMPLED),
        ((480, 640), 8, PreprocessConfig(image_size=224, policy="both", views=3), RESAMPLED),
        ((150, 100), 5, PreprocessConfig(image_size=224, policy="crop"), RESAMPLED),
        (
            (1200, 300),
            2,
            PreprocessConfig(image_size=224, views=3, interpolation="bilinear"),
            RESAMPLED,
        ),
        ((1000, 700), 3, PreprocessConfig(image_size=224, views=2, jpeg_draft=True), DCT_SCALED),
        ((2000, 1500), 1, PreprocessConfig(image_size=224, jpeg_draft=True), DCT_SCALED),
    ],
)
def test_the_tensor_pipeline_matches_pillow_within_tolerance(size, orientation, cfg, bound):
    data = _photo(*size, orientation)
    [pixels] = _emulated(cfg).decode_batch([data])
    expected = _reference(data, cfg)
    assert isinstance(pixels, torch.Tensor) and pixels.shape == expected.shape
    diff = _levels(pixels, expected, cfg)
    mean_bound, max_bound = bound
    assert float(diff.mean()) <= mean_bound and float(diff.max()) <= max_bound
    assert float(diff.max()) > 0  # resampled by torch, not by Pillow: the test compares paths


def test_draft_scale_is_pillows() -> None:
    for width, height in [(4000, 3000), (1000, 700), (640, 480), (300, 200), (100, 50)]:
        image = Image.open(io.BytesIO(_photo(width, height)))
        image.draft("RGB", (224, 224))
        scale = draft_scale(width, height, 224)
        assert image.size == (-(-width // scale), -(-height // scale))
    assert draft_scale(4000, 3000, None) == 1


def _oversize_header(data: bytes, width: int, height: int) -> bytes:
    """``data`` with the frame header claiming another size (the scan stays as it was)."""
    at = data.index(b"\xff\xc0") + 5  # marker, length (2), precision (1)
    return data[:at] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[at + 4 :]


def test_limits_are_enforced_from_the_header_before_decoding() -> None:
    limits = DecodeLimits(max_bytes=200_000, max_pixels=1_000_000)
    decoder = _emulated(PreprocessConfig(image_size=64), limits)
    small = _photo(320, 240)
    # 8000 x 8000 claimed by a small file: refused from the header, never decoded (a decode
    # would fail as corrupt, the scan being far too short).
    bomb = _oversize_header(small, 8000, 8000)
    big = b"\xff\xd8" + bytes(200_001)
    assert decoder.plan(bomb) is None and decoder.plan(big) is None and decoder.plan(b"") is None
    results = decoder.decode_batch([bomb, small, big, b""])
    assert isinstance(results[0], DecompressionBombError)
    assert isinstance(results[1], torch.Tensor)
    assert isinstance(results[2], ImageTooLargeError)
    assert isinstance(results[3], EmptyImageError)


def test_a_corrupt_jpeg_fails_alone(caplog: pytest.LogCaptureFixture) -> None:
    cfg = PreprocessConfig(image_size=64, views=2)
    decoder = _emulated(cfg)
    good = [_photo(320, 240, 6), _photo(200, 300)]
    broken = good[0][: len(good[0]) // 2]  # the header parses; the scan is cut short
    assert decoder.plan(broken) is not None
    with caplog.at_level(logging.INFO, logger="clipguard.detector.gpu_decode"):
        results = decoder.decode_batch([good[0], broken, good[1]])
    assert "decoding on the CPU" in caplog.text  # the batch call failed as a whole
    assert isinstance(results[1], CorruptImageError)
    for data, pixels in zip(good, (results[0], results[2]), strict=True):
        assert isinstance(pixels, torch.Tensor) and torch.equal(pixels, _reference(data, cfg))


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "cuda:1:2", "mps", ""])
def test_the_setting_names_its_flag(tiny_checkpoint: Path, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        WorkerSettings.load(
            checkpoint=tiny_checkpoint, bootstrap_servers="localhost:9092", jpeg_decode_device=value
        )
    assert "--jpeg-decode-device / CLIPGUARD_JPEG_DECODE_DEVICE" in str(info.value)
    assert "expected cpu, cuda or cuda:N" in str(info.value)


def test_the_setting_defaults_to_cpu(tiny_checkpoint: Path) -> None:
    kwargs = {"checkpoint": tiny_checkpoint, "bootstrap_servers": "localhost:9092"}
    assert WorkerSettings.load(**kwargs).jpeg_decode_device == "cpu"
    assert WorkerSettings.load(**kwargs, jpeg_decode_device="CUDA:1").jpeg_decode_device == "cuda:1"


@no_cuda
def test_cuda_requested_without_cuda_is_the_cpu_path(caplog: pytest.LogCaptureFixture) -> None:
    cfg = PreprocessConfig(image_size=64)
    with caplog.at_level(logging.WARNING):
        decoder = BatchJpegDecoder.create("cuda", cfg, DecodeLimits())
    assert decoder.device == torch.device("cpu") and not decoder.active
    assert "CUDA is not available" in caplog.text and decoder.reason == "CUDA is not available"
    data = _photo(200, 150, 8)
    assert decoder.plan(data) is None
    [pixels] = decoder.decode_batch([data])
    assert isinstance(pixels, torch.Tensor) and torch.equal(pixels, _reference(data, cfg))


def _pending(offset: int, value: bytes) -> Pending:
    return Pending(RecordRef("uploads", 0, offset, None, value), received_at=0.0)


def test_the_judge_decodes_deferred_jpegs_with_the_batch(tiny_checkpoint: Path) -> None:
    """Decode stage: header only; finish: one batch decode, one outcome per event, in order."""
    engine = InferenceEngine.from_checkpoint(
        tiny_checkpoint,
        EngineConfig(dtype="float32", threads=1, max_batch_size=4, warmup_batches=0),
    )
    decoder = _emulated(engine.preprocess)
    metrics = WorkerMetrics()
    judge = Judge(
        engine, Policy(), DecodeLimits(), ImageSources(1 << 20), metrics, jpeg_decoder=decoder
    )
    jpeg, png = _photo(320, 240, 6), image_bytes(fmt="PNG")
    broken = jpeg[: len(jpeg) // 2]
    values = [
        upload_event(jpeg, "jpeg"),
        upload_event(png, "png"),
        upload_event(broken, "broken"),
        b"{not json",
    ]
    prepared = [judge.prepare(_pending(i, v)) for i, v in enumerate(values)]
    assert prepared[0].jpeg is not None and prepared[0].pixels is None  # left to finish
    assert prepared[1].jpeg is None and prepared[1].pixels is not None  # PNG: decoded now
    assert prepared[2].jpeg is not None  # its header is fine: the batch decode finds it out
    outcomes = judge.finish(prepared)
    assert [o.record.offset for o in outcomes] == [0, 1, 2, 3]
    judged = [o.verdict.event_id for o in outcomes if o.verdict and o.verdict.error is None]
    assert judged == ["jpeg", "png"]
    assert [o.dead_letter.reason if o.dead_letter else None for o in outcomes] == [
        None,
        None,
        "corrupt",
        "bad_json",
    ]
    # The broken JPEG failed the batch's one decode call: its JPEGs took the CPU path.
    cfg = engine.preprocess
    expected = engine.predict_tensors([_reference(jpeg, cfg), _reference(png, cfg)])
    for outcome, prediction in zip(outcomes, expected, strict=False):
        assert outcome.verdict is not None
        assert outcome.verdict.ai_score == round(prediction.ai_score, 6)
    # Without it, the JPEG's pixels are the device pipeline's.
    outcomes = judge([_pending(i, v) for i, v in enumerate(values[:2])])
    expected = engine.predict_tensors(decoder.decode_batch([jpeg, png]))
    assert [o.verdict.ai_score for o in outcomes if o.verdict] == [
        round(p.ai_score, 6) for p in expected
    ]
    assert metrics.registry.get_sample_value("clipguard_decode_seconds_count") == 4


@no_cuda
@pytest.mark.broker
def test_worker_asked_for_cuda_without_it_judges_on_the_cpu(
    kafka_bootstrap: str, tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    topics = fresh_topics(kafka_bootstrap)
    jpegs = [_photo(160 + 40 * i, 120, 1 + i % 8) for i in range(6)]
    events = [(f"k{i}".encode(), upload_event(d, f"gd-{i}")) for i, d in enumerate(jpegs)]
    events.append((b"bad", upload_event(jpegs[0][: len(jpegs[0]) // 2], "broken")))
    placed = produce(kafka_bootstrap, topics.input, events)
    settings = worker_settings(
        kafka_bootstrap, tiny_checkpoint, topics, jpeg_decode_device="cuda", torch_threads=1
    )
    with caplog.at_level(logging.WARNING), running_worker(settings) as worker:
        assert worker.judge.jpeg_decoder is None  # exactly today's decode stage
        out = read_outputs(kafka_bootstrap, topics, set(placed))
    assert "JPEG decode stays on the CPU (cuda requested): CUDA is not available" in caplog.text
    judged = {v.event_id for v in out.verdicts if v.error is None}
    assert judged == {f"gd-{i}" for i in range(6)}
    assert {h["clipguard.error.reason"] for _, _, h in out.dead_letters} == {"corrupt"}
