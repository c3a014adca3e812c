"""Which matrix products stay in fp32 when a graph is quantised to int8, found by structure.

Measured on a trained tiny detector (docs/onnx.md): quantising every MatMul/Gemm/Conv put
p99 |delta ai_score| at 0.020; keeping these few in fp32 brought it to 0.003, at almost no
cost in speed for ViT-B-32 (they are a few percent of its multiply-adds):

- the first layer (the patch embedding: no quantisable op before it), which sees raw pixels;
- the last two levels (the heads, and the projection that feeds them), whose errors reach
  the score undamped;
- products of two activations (attention's Q·Kᵀ and A·V), whose ranges vary per image.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

PASS_THROUGH = ("Transpose", "Identity", "Reshape", "Cast", "Constant", "Unsqueeze", "Squeeze")


def _from_weight(name: str, weights: set[str], producers: dict[str, Any], depth: int = 0) -> bool:
    """Whether ``name`` is a weight, possibly through a reshape or transpose of one."""
    if name in weights:
        return True
    node = producers.get(name)
    if node is None or depth > 4:
        return False
    if node.op_type == "Constant":
        return True
    return node.op_type in PASS_THROUGH and any(
        _from_weight(i, weights, producers, depth + 1) for i in node.input if i
    )


def fp32_nodes(graph: Any, ops: tuple[str, ...], last_levels: int = 2) -> list[str]:
    """Names of the quantisable nodes of an ONNX ``graph`` to leave in fp32 (see above)."""
    weights = {init.name for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    quantisable = [n for n in graph.node if n.op_type in ops]
    by_name = {n.name: n for n in graph.node}

    def reach(node: Any, forward: bool) -> set[str]:
        """Quantisable nodes reachable downstream (or upstream) of ``node``."""
        seen: set[str] = set()
        found: set[str] = set()
        stack = [node]
        while stack:
            current = stack.pop()
            names = current.output if forward else current.input
            nexts = (
                [c for n in names for c in consumers.get(n, [])]
                if forward
                else [producers[n] for n in names if n in producers]
            )
            for nxt in nexts:
                if nxt.name in seen:
                    continue
                seen.add(nxt.name)
                if nxt.op_type in ops:
                    found.add(nxt.name)
                stack.append(nxt)
        return found

    downstream = {n.name: reach(n, forward=True) for n in quantisable}
    level: dict[str, int] = {}

    def depth_to_output(name: str) -> int:
        if name not in level:
            level[name] = max((depth_to_output(d) + 1 for d in downstream[name]), default=0)
        return level[name]

    keep = set()
    for node in quantisable:
        if not reach(node, forward=False) or depth_to_output(node.name) < last_levels:
            keep.add(node.name)
        if node.op_type == "MatMul" and not any(
            _from_weight(i, weights, producers) for i in node.input
        ):
            keep.add(node.name)
    return [n.name for n in graph.node if n.name in keep and n.name in by_name]
