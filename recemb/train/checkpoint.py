"""Sharding-aware checkpoints in safetensors + JSON (no pickle anywhere).

Each rank writes the pieces it holds (model shards, fused-optimizer state,
dense-optimizer state) to ``rank-<r>.safetensors``, each tensor named with its
global offsets, and the global shapes of what it holds in the file's metadata (a
table sharded table-wise lives on one rank only); ``meta.json`` keeps step, epoch, RNG and the
resolved config. Loading assembles full tensors from every rank's file and
copies each rank's slices in, so a checkpoint written at one world size loads
at another.

Example:
    >>> save_checkpoint(path, state, step=100, epoch=0, config=cfg.to_dict())   # doctest: +SKIP
    >>> meta = load_checkpoint(path, state)                                      # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from recemb.embeddings.sharding import copy_full_into, local_pieces
from recemb.errors import DataError
from recemb.io import write_json_atomic

FORMAT_VERSION = 1
_SEP = "@"


@dataclass
class TrainState:
    """What a checkpoint holds: the model and optimizers' tensors, by name.

    ``tensors()`` flattens them into one ``name -> tensor`` mapping (values may
    be ShardedTensors); the optimizers' non-tensor settings go to JSON.
    """

    model: torch.nn.Module
    dense_optimizer: torch.optim.Optimizer
    fused_optimizer: Any | None = None
    table_optimizer: torch.optim.Optimizer | None = None
    aux_optimizer: torch.optim.Optimizer | None = None

    def plain_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The unfused optimizers by checkpoint prefix (dense, data-parallel tables, aux groups)."""
        out = {"dense": self.dense_optimizer}
        if self.table_optimizer is not None:
            out["table"] = self.table_optimizer
        if self.aux_optimizer is not None:
            out["aux"] = self.aux_optimizer
        return out

    def tensors(self) -> dict[str, Any]:
        """All checkpointed tensors, keyed ``model/...``, ``fused/...``, ``dense/...``."""
        out: dict[str, Any] = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        if self.fused_optimizer is not None:
            for param, states in self.fused_optimizer.state_dict()["state"].items():
                for name, value in states.items():
                    if isinstance(value, torch.Tensor):
                        out[f"fused/{param}/{name}"] = value
        for prefix, optimizer in self.plain_optimizers().items():
            for idx, states in optimizer.state_dict()["state"].items():
                for name, value in states.items():
                    if isinstance(value, torch.Tensor):
                        out[f"{prefix}/{idx}/{name}"] = value
        return out


def _rank() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save_checkpoint(
    path: str | Path, state: TrainState, step: int, epoch: int, config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder at ``path`` (every rank calls this; atomic rename)."""
    path = Path(path)
    rank, world = _rank()
    tmp = path.with_name(path.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for key, value in state.tensors().items():
        shapes[key] = list(value.shape)
        for offsets, local in local_pieces(value):
            if rank != 0 and not _is_distributed(value):
                continue
            name = key + _SEP + ",".join(str(o) for o in offsets)
            tensors[name] = local.detach().to("cpu").contiguous().clone()
    save_file(tensors, str(tmp / f"rank-{rank}.safetensors"), metadata={"shapes": json.dumps(shapes)})
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        groups = {k: o.state_dict()["param_groups"] for k, o in state.plain_optimizers().items()}
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "epoch": epoch,
            "world_size": world,
            "param_groups": groups,
            "torch_rng": torch.get_rng_state().tolist(),
            "config": config,
            "extra": extra or {},
        }
        write_json_atomic(tmp / "meta.json", meta)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()
    return path


def _is_distributed(value: Any) -> bool:
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    return isinstance(value, (ShardedTensor, DTensor))


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's ``meta.json`` (step, epoch, config, ...)."""
    meta_path = Path(path) / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{path}: not a checkpoint (no meta.json)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise DataError(f"{path}: checkpoint format {meta['format_version']} is newer than this recemb reads")
    return meta


def assemble_full(path: str | Path) -> dict[str, torch.Tensor]:
    """Full tensors of a checkpoint, put together from every rank's pieces."""
    path = Path(path)
    meta = read_meta(path)
    full: dict[str, torch.Tensor] = {}
    for r in range(meta["world_size"]):
        part = path / f"rank-{r}.safetensors"
        if not part.is_file():
            raise DataError(f"{part}: missing (checkpoint written by {meta['world_size']} ranks)")
        with safe_open(str(part), framework="pt") as fh:
            shapes = json.loads((fh.metadata() or {}).get("shapes", "{}"))
            pieces = {name: fh.get_tensor(name) for name in fh.keys()}
        for name, tensor in pieces.items():
            key, _, offs = name.rpartition(_SEP)
            shape = shapes[key]
            if key not in full:
                full[key] = torch.zeros(shape, dtype=tensor.dtype) if shape else tensor.clone()
            if not shape:
                full[key] = tensor.clone()
                continue
            offsets = [int(o) for o in offs.split(",")]
            index = tuple(slice(o, o + s) for o, s in zip(offsets, tensor.shape, strict=True))
            full[key][index] = tensor
    return full


def load_checkpoint(path: str | Path, state: TrainState) -> dict[str, Any]:
    """Restore ``state`` from the checkpoint at ``path``; returns its meta.

    The unfused optimizers get their state through ``load_state_dict`` (built from
    the saved tensors and param groups); model and fused state are copied in place.
    """
    meta = read_meta(path)
    full = assemble_full(path)
    targets = state.tensors()
    copy_full_into(targets, full)
    for prefix, optimizer in state.plain_optimizers().items():
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in full.items():
            if key.startswith(prefix + "/"):
                _, idx, name = key.split("/", 2)
                opt_state.setdefault(int(idx), {})[name] = tensor
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"][prefix]})
    missing = [k for k in targets if k not in full]
    if missing:
        raise DataError(f"{path}: checkpoint lacks '{missing[0]}' (model or optimizer changed?)")
    torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
    return meta
