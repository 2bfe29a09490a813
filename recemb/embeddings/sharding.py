"""Sharding: torchrec planner constraints per table, the DMP wrap, fused optimizers.

Tables of every variant are ordinary ``EmbeddingBagCollection``s, so one function
shards a whole model. Row-wise kinds are offered by the stock sharder only on
CUDA; ``CpuRowWiseSharder`` also offers them on CPU (they match unsharded exactly).
All torchrec specifics of sharding live here, so a torchrec upgrade touches one file.

Example:
    >>> ensure_process_group()                                         # single process
    >>> dmp, plan = shard_model(model, cfg.embedding, torch.device("cpu"))
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode
from torch import nn
from torchrec import optim as trec_optim
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from recemb.config.experiment import EmbeddingConfig
from recemb.embeddings.base import reset_buffers
from recemb.embeddings.plan import VariantPlan
from recemb.errors import ConfigError

SPARSE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "exact_rowwise_adagrad": trec_optim.RowWiseAdagrad,
    "exact_adagrad": trec_optim.Adagrad,
    "exact_sgd": trec_optim.SGD,
    "adam": trec_optim.Adam,
}
# The same update rules as ordinary optimizers, for tables no fused kernel runs
# (torchrec's SGD/Adagrad/Adam wrappers only carry settings into FBGEMM).
UNFUSED_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "exact_rowwise_adagrad": trec_optim.RowWiseAdagrad,
    "exact_adagrad": torch.optim.Adagrad,
    "exact_sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
}
# Variants whose tables update themselves in backward (no torch or FBGEMM optimizer, no weight decay).
SELF_UPDATING_KINDS = frozenset({"lowprec", "dpq", "mgqe", "deeplight", "pep", "autosrh", "autodim", "dedup"})
_ROW_WISE = [ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value]


class CpuRowWiseSharder(EmbeddingBagCollectionSharder):
    """The stock sharder, plus row-wise and table-row-wise on CPU (gloo)."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        if compute_device_type == "cpu":
            types += [t for t in _ROW_WISE if t not in types]
        return types


def ensure_process_group(backend: str = "gloo") -> dist.ProcessGroup:
    """Return the default process group, starting a one-rank one if none exists.

    A single-process run still goes through DistributedModelParallel (one rank)
    so that FBGEMM's fused kernels and optimizers run the tables.
    """
    if not dist.is_initialized():
        fd, path = tempfile.mkstemp(prefix="recemb-pg-")
        os.close(fd)
        os.unlink(path)
        dist.init_process_group(backend, init_method=f"file://{path}", rank=0, world_size=1)
    return dist.group.WORLD


def check_sparse_optimizer(name: str, device: torch.device, sharding: str = "auto") -> None:
    """Refuse a sparse optimizer that FBGEMM cannot fuse on ``device``.

    Adam on CPU is only refused for fused tables: ``data_parallel`` tables are updated by
    ``torch.optim.Adam`` (``table_optimizer``), which suits small vocabularies (APE's entity types).
    """
    if name not in SPARSE_OPTIMIZERS:
        raise ConfigError(f"embedding.optimizer '{name}' is unknown (known: {', '.join(SPARSE_OPTIMIZERS)})")
    if name == "adam" and device.type == "cpu" and sharding != "data_parallel":
        raise ConfigError(
            "embedding.optimizer=adam: FBGEMM's fused Adam runs on GPU only; on CPU use "
            "exact_rowwise_adagrad, exact_adagrad or exact_sgd, or embedding.sharding=data_parallel "
            "(unfused torch Adam, for small tables)"
        )


def check_weight_decay(cfg: EmbeddingConfig, device: torch.device | None = None, fused: bool = True) -> None:
    """Refuse an ``embedding.weight_decay`` that some table's optimizer would ignore.

    ``fused``: some tables run FBGEMM's fused kernels (not only ``data_parallel`` ones,
    whose unfused optimizer in ``table_optimizer`` applies the decay). FBGEMM applies
    weight decay in row-wise Adagrad only when a mode is set (L2 or decoupled) and in
    Adam only decoupled; exact Adagrad and SGD have none. Its CPU row-wise Adagrad
    kernel (fbgemm-gpu-cpu 1.8.0) takes the setting and leaves the rows as without it
    (``tests/test_weight_decay.py`` pins this), so on CPU the loss-side
    ``embedding.l2`` is the way to regularise the tables. ``lowprec`` tables and the row
    tables of ``dpq``/``mgqe``/``deeplight``/``pep`` run their own update, which has no
    weight decay.
    """
    if not cfg.weight_decay:
        return
    own = sorted(SELF_UPDATING_KINDS & {cfg.kind, *(g.kind for g in cfg.groups)})
    if own:
        raise ConfigError(
            f"embedding.weight_decay={cfg.weight_decay}: {'/'.join(own)} tables update themselves without weight "
            "decay; use embedding.l2"
        )
    if not fused:
        return
    if cfg.optimizer in ("exact_adagrad", "exact_sgd"):
        raise ConfigError(
            f"embedding.weight_decay={cfg.weight_decay}: FBGEMM's fused {cfg.optimizer} has no weight decay; "
            "use embedding.l2, or embedding.optimizer=exact_rowwise_adagrad on GPU"
        )
    if device is not None and device.type == "cpu" and cfg.optimizer == "exact_rowwise_adagrad":
        raise ConfigError(
            f"embedding.weight_decay={cfg.weight_decay}: FBGEMM's CPU row-wise Adagrad kernel ignores weight "
            "decay; use embedding.l2 (an L2 penalty on the looked-up embeddings, the same on every device)"
        )
    if cfg.optimizer == "adam" and cfg.weight_decay_mode != "decoupled":
        raise ConfigError("embedding.weight_decay with optimizer adam is decoupled only: set weight_decay_mode=decoupled")


def check_initial_accumulator(cfg: EmbeddingConfig) -> None:
    """Refuse ``embedding.initial_accumulator`` where there is no Adagrad accumulator to start."""
    if not cfg.initial_accumulator:
        return
    if cfg.optimizer not in ("exact_rowwise_adagrad", "exact_adagrad"):
        raise ConfigError(
            f"embedding.initial_accumulator={cfg.initial_accumulator} needs an Adagrad optimizer "
            f"(exact_rowwise_adagrad or exact_adagrad), not {cfg.optimizer}"
        )


def start_accumulators(dmp: nn.Module, value: float) -> int:
    """Fill every fused table's Adagrad accumulator (``*.momentum1``) with ``value``; returns how many.

    FBGEMM starts them at 0 and has no setting for it; the fused optimizer's state
    tensors are views of the kernel's own, so writing this rank's pieces is enough.
    """
    optimizer = getattr(dmp, "fused_optimizer", None)
    count = 0
    with torch.no_grad():
        for state in (optimizer.state.values() if optimizer is not None else []):
            for key, tensor in state.items():
                if key.endswith("momentum1"):
                    for _, piece in local_pieces(tensor):
                        piece.fill_(value)
                    count += 1
    return count


def fused_params(cfg: EmbeddingConfig) -> dict[str, Any]:
    """Sharder-level FBGEMM settings that are not optimizer arguments (the weight decay mode)."""
    if cfg.weight_decay and cfg.optimizer == "exact_rowwise_adagrad":
        mode = WeightDecayMode.L2 if cfg.weight_decay_mode == "l2" else WeightDecayMode.DECOUPLE
        return {"weight_decay_mode": mode}
    return {}


def apply_sparse_optimizer(model: nn.Module, cfg: EmbeddingConfig, device: torch.device) -> None:
    """Attach the fused (in-backward) optimizer to every embedding table of ``model``."""
    check_sparse_optimizer(cfg.optimizer, device, cfg.sharding)
    kwargs: dict[str, Any] = {"lr": cfg.lr}
    if cfg.optimizer != "exact_sgd":
        kwargs["eps"] = cfg.eps
    if cfg.weight_decay:
        kwargs["weight_decay"] = cfg.weight_decay
    params = [p for m in model.modules() if isinstance(m, EmbeddingBagCollection) for p in m.parameters()]
    if params:
        apply_optimizer_in_backward(SPARSE_OPTIMIZERS[cfg.optimizer], params, kwargs)


def unfused_table_params(model: nn.Module) -> list[nn.Parameter]:
    """Table weights that no fused optimizer updates (``data_parallel`` tables).

    Data-parallel tables run torchrec's dense kernel, where the in-backward
    optimizer does not apply; DDP averages their gradients and
    ``table_optimizer`` steps them with the configured sparse optimizer.
    """
    return [
        p for name, p in model.named_parameters()
        if "embedding_bags" in name and p.requires_grad and not hasattr(p, "_in_backward_optimizers")
    ]


def table_optimizer(model: nn.Module, cfg: EmbeddingConfig) -> torch.optim.Optimizer | None:
    """The configured sparse optimizer (unfused) over ``unfused_table_params``, if any."""
    params = unfused_table_params(model)
    if not params:
        return None
    kwargs: dict[str, Any] = {"lr": cfg.lr}
    if cfg.optimizer != "exact_sgd":
        kwargs["eps"] = cfg.eps
    optimizer = UNFUSED_OPTIMIZERS[cfg.optimizer]
    if cfg.initial_accumulator:
        kwargs["initial_accumulator_value"] = cfg.initial_accumulator
    if cfg.weight_decay:
        if cfg.weight_decay_mode == "decoupled" and cfg.optimizer == "adam":
            optimizer = torch.optim.AdamW
        elif cfg.weight_decay_mode == "decoupled":
            raise ConfigError(
                f"embedding.weight_decay_mode=decoupled is not available with {cfg.optimizer} for data_parallel "
                f"tables ({', '.join(sorted(n for n, p in model.named_parameters() if any(p is q for q in params)))})"
                "; use l2"
            )
        kwargs["weight_decay"] = cfg.weight_decay
    return optimizer(params, **kwargs)


def table_sharding(model: nn.Module) -> dict[str, str]:
    """Requested sharding type per physical table, as the variants' plans say."""
    out: dict[str, str] = {}
    for module in model.modules():
        plan = getattr(module, "plan", None)
        if isinstance(plan, VariantPlan):
            out.update(plan.sharding())
    return out


def plan_constraints(requested: dict[str, str]) -> dict[str, ParameterConstraints]:
    """Planner constraints: the asked-for sharding type and its kernel per table."""
    constraints: dict[str, ParameterConstraints] = {}
    for table, kind in requested.items():
        if kind == "auto":
            continue
        kernel = EmbeddingComputeKernel.DENSE if kind == "data_parallel" else EmbeddingComputeKernel.FUSED
        constraints[table] = ParameterConstraints(
            sharding_types=[kind],
            compute_kernels=[kernel.value],
            min_partition=4 if kind == ShardingType.COLUMN_WISE.value else None,
        )
    return constraints


def make_plan(
    model: nn.Module,
    device: torch.device,
    pg: dist.ProcessGroup,
    batch_size: int = 4096,
    overrides: dict[str, str] | None = None,
) -> ShardingPlan:
    """Plan the sharding of ``model``'s tables over ``pg``'s ranks.

    ``overrides`` (table -> sharding type) win over what the variants recorded.
    On one CPU rank, ``auto`` tables are placed ``table_wise``: every plan holds
    the whole table there anyway, and the planner's cost model (made for GPUs)
    would often pick ``row_wise``, which adds an id bucketize and a splits exchange
    to every step (a few % of a DeepFM step, ``tools/bench_train.py --profile``).
    On a GPU the planner keeps its choice (it may need a UVM-caching kernel).
    """
    requested = table_sharding(model)
    requested.update(overrides or {})
    world_size = dist.get_world_size(pg)
    if world_size == 1 and device.type == "cpu":
        tables = [t.name for m in model.modules() if isinstance(m, EmbeddingBagCollection)
                  for t in m.embedding_bag_configs()]
        for table in tables:
            if requested.get(table, "auto") == "auto":
                requested[table] = ShardingType.TABLE_WISE.value
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=device.type, local_world_size=world_size),
        batch_size=batch_size,
        constraints=plan_constraints(requested),
        debug=False,
    )
    sharders = [CpuRowWiseSharder()]
    if world_size > 1:
        return planner.collective_plan(model, sharders, pg)
    return planner.plan(model, sharders)


@dataclass
class ShardedModel:
    """A model wrapped by DistributedModelParallel, with its plan."""

    model: DistributedModelParallel
    plan: ShardingPlan


def shard_model(
    model: nn.Module,
    cfg: EmbeddingConfig,
    device: torch.device,
    pg: dist.ProcessGroup | None = None,
    batch_size: int = 4096,
    overrides: dict[str, str] | None = None,
) -> ShardedModel:
    """Attach fused optimizers, plan and wrap ``model`` in DistributedModelParallel.

    Build ``model`` on ``torch.device("meta")`` to avoid allocating full tables on
    every rank: DMP materialises only each rank's shards (with the tables'
    ``init_fn``). To start from given weights, call ``load_full_state`` afterwards.
    """
    pg = pg or ensure_process_group()
    apply_sparse_optimizer(model, cfg, device)
    plan = make_plan(model, device, pg, batch_size=batch_size, overrides=overrides)
    kernels = {t["compute_kernel"] for tables in plan_to_dict(plan).values() for t in tables.values()}
    check_weight_decay(cfg, device, fused=bool(kernels - {EmbeddingComputeKernel.DENSE.value}))
    check_initial_accumulator(cfg)
    dmp = DistributedModelParallel(
        module=model,
        device=device,
        env=ShardingEnv.from_process_group(pg),
        plan=plan,
        sharders=[CpuRowWiseSharder(fused_params=fused_params(cfg) or None)],
    )
    reset_buffers(dmp)
    if cfg.initial_accumulator:
        start_accumulators(dmp, cfg.initial_accumulator)
    return ShardedModel(model=dmp, plan=plan)


def plan_to_dict(plan: ShardingPlan) -> dict[str, Any]:
    """JSON view of a plan: per module and table, sharding type, kernel, ranks, shards."""
    out: dict[str, Any] = {}
    for module_path, module_plan in plan.plan.items():
        tables: dict[str, Any] = {}
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            shards = None
            if ps.sharding_spec is not None:
                shards = [
                    {"rank": s.placement.rank(), "offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes)}
                    for s in ps.sharding_spec.shards  # type: ignore[union-attr]
                ]
            tables[table] = {
                "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel,
                "ranks": ps.ranks,
                "shards": shards,
            }
        out[module_path] = tables
    return out


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full (unsharded) tensors into a possibly sharded model, shard by shard.

    ``state`` is keyed like ``model.state_dict()``; each rank copies the slices
    its local shards own, and plain tensors whole. This is how a sharded model
    starts from an unsharded model's weights, and how a checkpoint written at
    one world size loads at another.
    """
    copy_full_into(model.state_dict(), state)


def local_pieces(target: Any) -> list[tuple[list[int], torch.Tensor]]:
    """(global offsets, local tensor) of each piece this rank holds of ``target``.

    A plain tensor is one piece at offset zero; a ShardedTensor or DTensor gives
    its local shards. The tensors are views: writing into them updates the model.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    if isinstance(target, ShardedTensor):
        return [(list(s.metadata.shard_offsets), s.tensor) for s in target.local_shards()]
    if isinstance(target, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
        return [(list(offset), target.to_local())]
    return [([0] * target.dim(), target)]


def copy_full_into(targets: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Copy each full tensor of ``state`` into the local pieces of ``targets[key]``."""
    with torch.no_grad():
        for key, target in targets.items():
            if key not in state or not isinstance(target, torch.Tensor):
                continue
            source = state[key]
            for offsets, local in local_pieces(target):
                index = tuple(slice(o, o + s) for o, s in zip(offsets, local.shape, strict=True))
                local.copy_(source[index] if index else source)
