"""Export a detector to ONNX: preprocessed pixels in, calibrated scores out, manifest inside.

The graph takes (N,3,S,S) pixels, already preprocessed by the checkpoint's contract, with a
dynamic batch axis, and returns ``ai_score`` (N,) = ``sigmoid(logit / T + bias)``,
``source_probs`` (N,C), and the raw ``binary_logit``/``source_logits`` too: the engine
aggregates several views per image on logits, as the torch engine does. The checkpoint's
manifest JSON sits in the model's metadata under the same key as in a single-file
checkpoint, so an ``.onnx`` file alone carries its input contract.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipguard.detector.checkpoint import METADATA_KEY, Manifest
from clipguard.detector.heads import Detector
from clipguard.detector.onnx_runtime import EXPORT_KEY, INPUT, OUTPUTS

OPSET = 17  # LayerNormalization is one op from 17 on, which ORT runs fused


class ScoringGraph(nn.Module):
    """The detector with its calibration baked in: what the ONNX file computes."""

    def __init__(self, detector: Detector, temperature: float, bias: float) -> None:
        super().__init__()
        self.detector = detector
        self.temperature = temperature
        self.bias = bias

    def forward(
        self, pixels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.detector(pixels)
        ai_score = torch.sigmoid(out.binary_logit / self.temperature + self.bias)
        return ai_score, torch.softmax(out.source_logits, -1), out.binary_logit, out.source_logits


def scoring_graph(detector: Detector, manifest: Manifest) -> ScoringGraph:
    calibration = manifest.calibration
    return ScoringGraph(detector.float().eval(), calibration.temperature, calibration.bias).eval()


def onnx_bytes(detector: Detector, manifest: Manifest) -> bytes:
    """The fp32 graph, traced on the CPU with a dynamic batch axis."""
    graph = scoring_graph(detector.cpu(), manifest)
    size = manifest.preprocess.image_size
    example = torch.zeros(2, 3, size, size)
    buffer = io.BytesIO()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # The fused attention kernel has no ONNX form: trace the plain one.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter: the dynamo one needs onnxscript, which we do not ship.
            warnings.simplefilter("ignore", DeprecationWarning)
            # Shape asserts in attention trace as constants; the batch axis stays dynamic
            # (checked by the parity run at batch 1 and batch 16).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                graph,
                (example,),
                buffer,
                dynamo=False,
                opset_version=OPSET,
                input_names=[INPUT],
                output_names=list(OUTPUTS),
                dynamic_axes={INPUT: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUTS}},
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return buffer.getvalue()


def set_metadata(path: Path, manifest: Manifest, export: dict[str, Any]) -> None:
    """Write the manifest and the export record into the model's metadata_props."""
    import onnx

    model = onnx.load(str(path))
    entries = {METADATA_KEY: manifest.model_dump_json(), EXPORT_KEY: json.dumps(export)}
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "clipguard"
    model.doc_string = f"clipguard detector {manifest.model_name} {manifest.version}"
    onnx.save(model, str(path))


def export_fp32(detector: Detector, manifest: Manifest, out: Path) -> Path:
    """Write the fp32 ONNX file with its manifest; returns ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(onnx_bytes(detector, manifest))
    set_metadata(out, manifest, {"quantize": "none", "opset": OPSET, "torch": torch.__version__})
    return out
