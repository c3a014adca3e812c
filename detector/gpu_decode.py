"""Batched JPEG decode on a CUDA device (nvJPEG through torchvision), the CPU path as fallback.

A phone photo costs 100+ ms of one core to decode; on a CUDA host a batch of them decodes in
one ``torchvision.io.decode_jpeg`` call on the device, and the views are cut, resized and
normalised there with the geometry of :func:`~clipguard.detector.preprocess.preprocess_views`.
Only what the device path reproduces goes there: plain (not MPO) JPEGs in RGB or greyscale
whose header passed the limits. Everything else, and any batch the device refuses, takes the
one CPU path (:func:`~clipguard.detector.decode.decode_image` then ``preprocess_views``), so its
tensors and typed errors are exactly today's. Untested on a GPU here (docs/bench.md); the tests
run the same tensor pipeline on the CPU (``emulate_on_cpu``) against the Pillow path.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.nn import functional as F

from clipguard.detector.decode import DecodeLimits, decode_image
from clipguard.detector.preprocess import (
    PreprocessConfig,
    decode_min_side,
    preprocess_views,
    view_boxes,
)

log = logging.getLogger(__name__)

#: What the setting accepts: the CPU path, or a CUDA device.
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d{1,2})?")

#: Decoded pixels held on the device by one ``decode_jpeg`` call (uint8, 3 bytes each).
MAX_PIXELS_PER_CALL = 200_000_000

#: EXIF orientation -> the flips and transposition that show the image upright, as
#: ``ImageOps.exif_transpose`` does (the tensor is (..., H, W)).
_ORIENT: dict[int, tuple[bool, bool, bool]] = {
    # orientation: (transpose H/W first, then flip H, then flip W)
    2: (False, False, True),
    3: (False, True, True),
    4: (False, True, False),
    5: (True, False, False),
    6: (True, False, True),
    7: (True, True, True),
    8: (True, True, False),
}

# torchvision 0.29 warns on every call that its image codecs move to TorchCodec.
warnings.filterwarnings("ignore", message=r"The image decoding and encoding capabilities")


@dataclass(frozen=True)
class JpegJob:
    """A JPEG whose header passed the limits: all the device decode needs to know."""

    data: bytes
    width: int  #: as stored, before orientation
    height: int
    orientation: int
    #: libjpeg's DCT scale (1, 2, 4, 8) that ``decode_image`` would decode at.
    draft_scale: int


def draft_scale(width: int, height: int, min_side: int | None) -> int:
    """The DCT scale Pillow's ``draft`` picks: the largest of 8, 4, 2 keeping ``min_side``."""
    if min_side is None:
        return 1
    scale = min(width // min_side, height // min_side)
    return next((s for s in (8, 4, 2) if scale >= s), 1)


def orient(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """(..., H, W) as stored -> as displayed for an EXIF orientation (1-8; others: as is)."""
    transpose, flip_h, flip_w = _ORIENT.get(orientation, (False, False, False))
    if transpose:
        pixels = pixels.transpose(-1, -2)
    dims = [d for d, on in ((-2, flip_h), (-1, flip_w)) if on]
    return pixels.flip(dims) if dims else pixels


#: A 2 x 2 image whose eight orientations all differ: what ``exif_orientation`` looks at.
_PROBE = torch.tensor([[0, 1], [2, 3]], dtype=torch.uint8)


def exif_orientation(info: dict) -> int:
    """The orientation ``decode_image`` applies for a header's metadata (1: as stored).

    Pillow's own ``exif_transpose`` runs on a 2 x 2 stand-in carrying the metadata, so an
    EXIF or XMP block it cannot handle leaves the image as stored here too, as it does there.
    """
    stand_in = Image.fromarray(_PROBE.numpy())  # mode L
    stand_in.info = dict(info)
    shown = _PROBE
    with contextlib.suppress(Exception):  # as decode_image: a broken EXIF block, as stored
        shown = torch.from_numpy(np.array(ImageOps.exif_transpose(stand_in)))
    return next((o for o in range(1, 9) if torch.equal(orient(_PROBE, o), shown)), 1)


def _probe_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _decode_jpegs(data: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    """One ``decode_jpeg`` call: uint8 (3, H, W) tensors on ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))


def resolve_decode_device(requested: str) -> tuple[torch.device, str]:
    """Where JPEGs can decode for ``requested``, and why: CPU whenever CUDA or nvJPEG fails."""
    device = torch.device(requested)
    if device.type == "cpu":
        return device, "requested"
    cpu = torch.device("cpu")
    if not torch.cuda.is_available():
        return cpu, "CUDA is not available"
    if device.index is not None and device.index >= torch.cuda.device_count():
        return cpu, f"no CUDA device {device.index} ({torch.cuda.device_count()} present)"
    try:
        _decode_jpegs([_probe_jpeg()], device)
    except Exception as exc:  # noqa: BLE001 - any failure means: decode on the CPU
        return cpu, f"torchvision cannot decode JPEG on {device}: {type(exc).__name__}: {exc}"
    return device, "nvjpeg"


class BatchJpegDecoder:
    """Decodes a batch's JPEGs in one device call; on the CPU it is exactly the CPU path.

    ``plan`` (any thread) checks a header and says whether the device takes the image;
    ``decode_jobs`` (the model's thread) decodes the planned ones in one call.
    ``emulate_on_cpu`` runs the device pipeline with torchvision's CPU decoder: tests only.
    """

    def __init__(
        self,
        cfg: PreprocessConfig,
        limits: DecodeLimits,
        device: torch.device | str = "cpu",
        reason: str = "requested",
        *,
        emulate_on_cpu: bool = False,
    ) -> None:
        self.cfg = cfg
        self.limits = limits
        self.device = torch.device(device)
        self.reason = reason
        self.emulated = emulate_on_cpu and self.device.type == "cpu"
        self.min_side = decode_min_side(cfg)
        self._mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1)

    @classmethod
    def create(
        cls, requested: str, cfg: PreprocessConfig, limits: DecodeLimits
    ) -> BatchJpegDecoder:
        """The decoder for the ``jpeg_decode_device`` setting, its choice logged."""
        device, reason = resolve_decode_device(requested)
        if cfg.policy == "scale_first" and device.type != "cpu":
            # Its views are cut from the whole scaled image, which the tensor path does not do.
            device, reason = torch.device("cpu"), "the scale_first policy decodes on the CPU"
        if requested != "cpu":
            if device.type == "cpu":
                log.warning("JPEG decode stays on the CPU (%s requested): %s", requested, reason)
            else:
                log.info("JPEGs decode in batches on %s (%s); untested here", device, reason)
        return cls(cfg, limits, device, reason)

    @property
    def active(self) -> bool:
        """Whether JPEGs take the batched tensor path (on a device, or emulated)."""
        return self.device.type != "cpu" or self.emulated

    # -- any thread ----------------------------------------------------------------------

    def cpu_path(self, data: bytes) -> torch.Tensor:
        """Today's decode and preprocessing: (V, 3, S, S); raises the typed image errors."""
        return preprocess_views(decode_image(data, self.limits, self.min_side), self.cfg)

    def plan(self, data: bytes) -> JpegJob | None:
        """A JPEG for the device, its limits checked from the header; None: the CPU path.

        Never decodes a pixel. Anything unusual (no bytes, too many bytes or pixels, another
        format, an unreadable header, CMYK, MPO) returns None, so ``cpu_path`` refuses it
        with exactly today's typed error, again from the header.
        """
        if not self.active or not data or len(data) > self.limits.max_bytes:
            return None
        if "JPEG" not in self.limits.formats:
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # corrupt metadata: as decode_image, quietly
                image = Image.open(io.BytesIO(data), formats=["JPEG"])
                width, height = image.size
                if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                    return None
                if width <= 0 or height <= 0 or width * height > self.limits.max_pixels:
                    return None
                orientation = exif_orientation(image.info)
        except Exception:  # noqa: BLE001 - the CPU path gives this input its typed error
            return None
        scale = draft_scale(width, height, self.min_side)
        return JpegJob(data, width, height, orientation, scale)

    # -- the model's thread --------------------------------------------------------------

    def decode_jobs(self, jobs: Sequence[JpegJob]) -> list[torch.Tensor | Exception]:
        """(V, 3, S, S) float32 on the CPU per job, or its error; one bad file fails alone.

        A call the device refuses (it returns nothing then) sends its images to the CPU
        path one by one, which finds the bad one and gives it its typed error.
        """
        results: list[torch.Tensor | Exception] = []
        for chunk in self._chunks(jobs):
            try:
                decoded = self._decode(chunk)
            except Exception as exc:  # noqa: BLE001 - fall back to the CPU, image by image
                log.info(
                    "JPEG decode on %s failed for a batch of %d (%s: %s): decoding on the CPU",
                    self.device,
                    len(chunk),
                    type(exc).__name__,
                    str(exc)[:200],
                )
                decoded = [None] * len(chunk)
            for job, pixels in zip(chunk, decoded, strict=True):
                results.append(self._views_or_fallback(job, pixels))
        return results

    def decode_batch(self, data: Sequence[bytes]) -> list[torch.Tensor | Exception]:
        """Any images' bytes -> pixels or error each: JPEGs in one device call, others on CPU."""
        jobs = {i: job for i, d in enumerate(data) if (job := self.plan(d)) is not None}
        on_device = iter(self.decode_jobs(list(jobs.values())))
        return [next(on_device) if i in jobs else self._cpu_result(d) for i, d in enumerate(data)]

    def _chunks(self, jobs: Sequence[JpegJob]) -> Iterator[list[JpegJob]]:
        chunk: list[JpegJob] = []
        pixels = 0
        for job in jobs:
            if chunk and pixels + job.width * job.height > MAX_PIXELS_PER_CALL:
                yield chunk
                chunk, pixels = [], 0
            chunk.append(job)
            pixels += job.width * job.height
        if chunk:
            yield chunk

    def _decode(self, chunk: Sequence[JpegJob]) -> list[torch.Tensor | None]:
        decoded = _decode_jpegs([job.data for job in chunk], self.device)
        if len(decoded) != len(chunk):
            raise RuntimeError(f"{len(chunk)} JPEGs gave {len(decoded)} images")
        return list(decoded)

    def _views_or_fallback(
        self, job: JpegJob, pixels: torch.Tensor | None
    ) -> torch.Tensor | Exception:
        if pixels is not None:
            try:
                return self.views(pixels, job)
            except Exception as exc:  # noqa: BLE001 - this image goes the CPU way
                log.info("JPEG views failed on %s (%s): decoding on the CPU", self.device, exc)
        return self._cpu_result(job.data)

    def _cpu_result(self, data: bytes) -> torch.Tensor | Exception:
        try:
            return self.cpu_path(data)
        except Exception as exc:  # noqa: BLE001 - the caller routes it (typed ImageError)
            return exc

    def views(self, decoded: torch.Tensor, job: JpegJob) -> torch.Tensor:
        """uint8 (3, H, W) as stored -> normalised views (V, 3, S, S) on the CPU.

        Mirrors ``decode_image`` + ``preprocess_views``: DCT scaling approximated by an
        S x S box average (what the 1/S IDCT keeps), orientation, then per view a crop and,
        only when the side differs, an antialiased resize rounded to 8 bits as Pillow's is.
        """
        if tuple(decoded.shape) != (3, job.height, job.width):
            shape = f"{job.width}x{job.height}"
            raise ValueError(f"decoded {tuple(decoded.shape)}, the header says {shape}")
        image = decoded.unsqueeze(0)
        if job.draft_scale > 1:
            pooled = F.avg_pool2d(image.float(), job.draft_scale, ceil_mode=True)
            image = pooled.round_().clamp_(0, 255)
        image = orient(image, job.orientation)
        height, width = image.shape[-2:]
        size = self.cfg.image_size
        out = []
        for box in view_boxes(width, height, self.cfg):
            view = image[..., box.top : box.top + box.side, box.left : box.left + box.side].float()
            if box.side != size:
                view = (
                    F.interpolate(view, (size, size), mode=self.cfg.interpolation, antialias=True)
                    .clamp_(0, 255)
                    .round_()
                )
            out.append(view)
        views = torch.cat(out)
        mean, std = self._mean.to(views.device), self._std.to(views.device)
        return ((views / 255.0 - mean) / std).cpu()
