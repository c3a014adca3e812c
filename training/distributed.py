"""Multi-process training under ``torchrun``: process group, rank facts, gathering.

``torchrun --nproc_per_node N -m clipguard.cli train ...`` starts N copies of the command;
each reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the environment, joins one process
group (NCCL on CUDA, gloo on the CPU) and trains its shard of every epoch. Only rank 0
prints, writes checkpoints and evaluates. A plain ``clipguard train`` is world size 1 and
never touches ``torch.distributed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistInfo()


def env_info() -> DistInfo:
    """What ``torchrun`` told this process (world size 1 when not launched by it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return DistInfo(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def init(device: torch.device) -> DistInfo:
    """Join the process group once (idempotent); returns this process's facts."""
    info = env_info()
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return info


def device_for(requested: str, info: DistInfo) -> torch.device:
    """``auto`` is CUDA when present; under torchrun each rank takes its local GPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and info.enabled and device.index is None:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_sum(info: DistInfo, *values: float) -> list[float]:
    """Sum scalars over all ranks (float64 on the CPU: gloo and NCCL-with-copy alike)."""
    if not info.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank, in rank order."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
