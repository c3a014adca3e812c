"""Resumable training state: trainable weights, optimizer, progress. Safetensors + JSON.

Written by rank 0 after every epoch into a ``train_state`` folder beside the checkpoint
(``<out>/train_state/`` for a checkpoint directory, ``<out>.train_state/`` for a single
file). Only parameters that train are stored (frozen encoder weights are rebuilt from the
same backbone and seed, and checked against a hash), plus the best epoch's copy of them.
Never pickle: optimizer tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from clipguard.detector.checkpoint import weights_sha256
from clipguard.detector.errors import CheckpointError

STATE_DIR = "train_state"
TENSORS_FILE = "state.safetensors"
JSON_FILE = "state.json"
STATE_FORMAT = 1


def state_dir_for(out: Path) -> Path:
    out = Path(out)
    if out.suffix == ".safetensors":
        return out.with_name(out.name + "." + STATE_DIR)
    return out / STATE_DIR


def resolve_state_dir(path: Path) -> Path:
    """Accept the state folder itself or the checkpoint it sits beside."""
    path = Path(path)
    for candidate in (path, state_dir_for(path)):
        if (candidate / JSON_FILE).is_file() and (candidate / TENSORS_FILE).is_file():
            return candidate
    raise CheckpointError(
        f"no training state to resume at {path} (looked for {JSON_FILE} there and in "
        f"{state_dir_for(path)})"
    )


@dataclass
class TrainState:
    """Where a run stands after ``epoch`` completed epochs."""

    epoch: int
    step: int
    model: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters that train (what changes during a run)."""
    return {
        name: p.detach().to("cpu", copy=True)
        for name, p in module.named_parameters()
        if p.requires_grad
    }


def frozen_fingerprint(module: torch.nn.Module) -> str:
    """Hash of everything that does not train, to check a resumed run rebuilt the same base."""
    frozen = {n: p.detach() for n, p in module.named_parameters() if not p.requires_grad}
    frozen.update({f"buffer:{n}": b.detach() for n, b in module.named_buffers()})
    return weights_sha256(frozen)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_state(directory: Path, state: TrainState) -> None:
    """Write atomically: a crash mid-write leaves the previous epoch's state intact."""
    directory.mkdir(parents=True, exist_ok=True)
    optim_tensors, optim_meta = _flatten_optimizer(state.optimizer)
    tensors = {f"model.{k}": v.contiguous() for k, v in state.model.items()}
    tensors.update({f"best.{k}": v.contiguous() for k, v in state.best.items()})
    tensors.update(optim_tensors)
    meta = {
        "format": STATE_FORMAT,
        "epoch": state.epoch,
        "step": state.step,
        "optimizer": optim_meta,
        **state.info,
    }
    tmp_tensors = directory / (TENSORS_FILE + ".tmp")
    tmp_json = directory / (JSON_FILE + ".tmp")
    save_file(tensors, str(tmp_tensors))
    tmp_json.write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp_tensors, directory / TENSORS_FILE)
    os.replace(tmp_json, directory / JSON_FILE)


def load_state(path: Path) -> TrainState:
    directory = resolve_state_dir(path)
    try:
        meta = json.loads((directory / JSON_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(directory / TENSORS_FILE), device="cpu")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read training state in {directory}: {exc}") from exc
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"training state in {directory} has an unknown format")
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "best": {}, "optim": {}}
    for name, tensor in tensors.items():
        prefix, rest = name.split(".", 1)
        if prefix == "optim":
            groups["optim"][name] = tensor
        else:
            groups[prefix][rest] = tensor
    info = {k: v for k, v in meta.items() if k not in {"format", "epoch", "step", "optimizer"}}
    return TrainState(
        epoch=int(meta["epoch"]),
        step=int(meta["step"]),
        model=groups["model"],
        best=groups["best"],
        optimizer=_unflatten_optimizer(groups["optim"], meta["optimizer"]),
        info=info,
    )
