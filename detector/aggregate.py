"""Many views per image -> one output per image: flatten for the model, aggregate after."""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: What the engine takes: (N,3,S,S) with one view per image, (N,V,3,S,S), or one tensor per
#: image, (3,S,S) or (V_i,3,S,S) (the worker's decode stage gives a list: V_i may differ).
Pixels = torch.Tensor | Sequence[torch.Tensor]


def flatten_views(batch: Pixels, size: int) -> tuple[torch.Tensor, list[int]]:
    """All views in one (M,3,S,S) tensor, and how many belong to each image in order."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 4:
            return batch, [1] * batch.shape[0]
        if batch.dim() == 5:
            return batch.flatten(0, 1), [batch.shape[1]] * batch.shape[0]
        raise ValueError(f"expected (N,3,S,S) or (N,V,3,S,S) pixels, got {tuple(batch.shape)}")
    parts = [t.unsqueeze(0) if t.dim() == 3 else t for t in batch]
    if any(p.dim() != 4 or p.shape[0] == 0 for p in parts):
        raise ValueError("every image needs at least one (3,S,S) view")
    if not parts:
        return torch.empty(0, 3, size, size), []
    return torch.cat(parts), [p.shape[0] for p in parts]


def aggregate_logits(
    binary: torch.Tensor, source: torch.Tensor, counts: Sequence[int], how: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-view logits (M,), (M,C) -> per-image (N,), (N,C).

    ``mean`` averages the logits (the usual multi-crop test-time ensemble); ``max`` keeps the
    view most confident it is AI-generated, and that view's source logits, so one tampered
    region of a large photo is not diluted by the untouched rest.
    """
    if not counts:
        return binary[:0], source[:0]
    if all(c == 1 for c in counts):
        return binary, source
    out_b, out_s = [], []
    sizes = list(counts)
    for b, s in zip(torch.split(binary, sizes), torch.split(source, sizes), strict=True):
        if how == "max":
            best = int(torch.argmax(b))
            out_b.append(b[best])
            out_s.append(s[best])
        else:
            out_b.append(b.mean())
            out_s.append(s.mean(0))
    return torch.stack(out_b), torch.stack(out_s)
