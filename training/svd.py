"""SVD-residual fine-tuning of the attention projections (Effort, Yan et al., ICML 2025).

Each attention projection ``W = U S V^T`` (every block's ``in_proj_weight`` and
``out_proj.weight``, the weights :mod:`clipguard.training.lora` adapts) splits into a
principal part, the top ``r`` singular directions, which stays frozen (it holds what the
pretrained encoder knows), and a residual, the remaining ``k - r`` singular vectors and
values, which trains. The paper's two regularisers keep the residual a residual:

- orthogonality: the trained singular vectors stay orthonormal and orthogonal to the
  frozen ones, ``||U_res^T U_res - I||^2 + 2 ||U_r^T U_res||^2`` (the off-diagonal blocks
  of ``[U_r U_res]^T [U_r U_res] - I``; ``U_r^T U_r = I`` is frozen), the same for ``V``;
- singular values: the weight's energy is kept, ``| ||W_hat||_F^2 - ||W||_F^2 |``.

Both are averaged over the adapted weights (as the paper's code does), weighted by
``TrainConfig.svd_orth_weight`` and ``svd_sv_weight``. Squared Frobenius norms (the paper
writes the norm): smooth at the optimum, where training starts.

The rebuilt weight is ``W + U_res S_res V_res^T - U0 S0 V0^T`` with ``U0 S0 V0`` the
residual at the start: the frozen principal part is ``W - U0 S0 V0^T = U_r S_r V_r^T``,
and training starts from ``W`` exactly (not from a re-multiplied SVD). Like LoRA it is a
``torch.nn.utils.parametrize`` parametrization, so open_clip's attention runs unchanged,
and :func:`merge_svd` folds it into ordinary weights before saving.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from clipguard.training.attention import attention_projections


class SVDResidual(nn.Module):
    """Parametrization of a (out, in) weight: frozen top-``rank`` part + trained residual."""

    def __init__(self, weight: torch.Tensor, rank: int) -> None:
        super().__init__()
        w = weight.detach()
        u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
        k = int(s.numel())
        if not 0 <= rank < k:
            raise ValueError(
                f"--svd-rank must be between 0 and {k - 1} for a {tuple(w.shape)} weight "
                f"(it keeps that many singular directions frozen), got {rank}"
            )
        # copy=True: a buffer and a parameter must never share storage (the optimiser would
        # move the "start" residual along with the trained one).
        # LAPACK's factors are column-major: standard strides for whatever stores them.
        u, vh = u.contiguous(), vh.contiguous()
        cast = {"device": w.device, "dtype": w.dtype}
        self.rank = rank
        # The frozen principal directions (for the orthogonality term and the tests).
        self.register_buffer("u_main", u[:, :rank].to(**cast, copy=True))
        self.register_buffer("s_main", s[:rank].to(**cast, copy=True))
        self.register_buffer("vh_main", vh[:rank].to(**cast, copy=True))
        # The residual at the start, subtracted so the rebuilt weight starts at W exactly.
        self.register_buffer("u0", u[:, rank:].to(**cast, copy=True))
        self.register_buffer("s0", s[rank:].to(**cast, copy=True))
        self.register_buffer("vh0", vh[rank:].to(**cast, copy=True))
        # (1,) not a 0-d tensor: state hashing views every buffer as bytes.
        self.register_buffer("norm_sq", w.float().pow(2).sum().reshape(1))
        self.u = nn.Parameter(u[:, rank:].to(**cast, copy=True))
        self.s = nn.Parameter(s[rank:].to(**cast, copy=True))
        self.vh = nn.Parameter(vh[rank:].to(**cast, copy=True))

    def residual(self) -> torch.Tensor:
        return (self.u * self.s) @ self.vh

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        start = (self.u0 * self.s0) @ self.vh0
        return weight + (self.residual() - start).to(weight.dtype)

    def orthogonality(self) -> torch.Tensor:
        """Distance of ``[U_r U_res]`` and ``[V_r V_res]`` from orthonormal (trained blocks)."""
        eye = torch.eye(self.s.numel(), device=self.s.device, dtype=torch.float32)
        u, vh = self.u.float(), self.vh.float()
        loss = (u.T @ u - eye).pow(2).sum() + (vh @ vh.T - eye).pow(2).sum()
        if self.rank:
            loss = loss + 2 * (self.u_main.float().T @ u).pow(2).sum()
            loss = loss + 2 * (self.vh_main.float() @ vh.T).pow(2).sum()
        return loss

    def energy_drift(self, weight: torch.Tensor) -> torch.Tensor:
        """``| ||W_hat||_F^2 - ||W||_F^2 |`` for the rebuilt ``W_hat`` of ``weight``."""
        return (self(weight).float().pow(2).sum() - self.norm_sq[0]).abs()


def attention_targets(encoder: nn.Module) -> list[tuple[nn.Module, str]]:
    """The projections Effort decomposes: every block's attention in and out weights."""
    return attention_projections(encoder, "svd")


def _residuals(encoder: nn.Module) -> list[tuple[SVDResidual, torch.Tensor]]:
    """(parametrization, frozen original weight) for every adapted projection."""
    found = []
    for module in encoder.modules():
        if parametrize.is_parametrized(module):
            for chain in module.parametrizations.values():
                found += [(p, chain.original) for p in chain if isinstance(p, SVDResidual)]
    return found


def add_svd_residual(encoder: nn.Module, rank: int | None = None) -> list[nn.Parameter]:
    """Freeze the encoder, make its attention projections SVD-residual; returns the params.

    ``rank`` None keeps all but the last singular direction of each weight frozen
    (``k - 1``: a rank-1 residual, the paper's setting for CLIP ViT-L/14).
    """
    encoder.requires_grad_(False)
    trainable: list[nn.Parameter] = []
    for module, name in attention_targets(encoder):
        weight = getattr(module, name)
        keep = min(weight.shape) - 1 if rank is None else rank
        residual = SVDResidual(weight, keep)
        parametrize.register_parametrization(module, name, residual)
        trainable += [residual.u, residual.s, residual.vh]
    return trainable


def has_svd_residual(module: nn.Module) -> bool:
    return any(isinstance(m, SVDResidual) for m in module.modules())


def residual_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for m in module.modules() if isinstance(m, SVDResidual) for p in (m.u, m.s, m.vh)]


def regulariser(encoder: nn.Module, orth_weight: float, sv_weight: float) -> torch.Tensor:
    """The paper's two terms, each the mean over the adapted weights, weighted."""
    found = _residuals(encoder)
    if not found:
        raise ValueError("no SVD-residual weights in the encoder: call add_svd_residual first")
    orth = torch.stack([p.orthogonality() for p, _ in found]).mean()
    drift = torch.stack([p.energy_drift(w) for p, w in found]).mean()
    return orth_weight * orth + sv_weight * drift


@torch.no_grad()
def merge_svd(encoder: nn.Module) -> int:
    """Fold every residual into its weight and drop the parametrization; returns the count."""
    merged = 0
    for module in list(encoder.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations.keys()):
            if any(isinstance(p, SVDResidual) for p in module.parametrizations[name]):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                merged += 1
    return merged
