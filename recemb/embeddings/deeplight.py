"""The ``deeplight`` variant: magnitude pruning of embedding weights (Deng et al., WSDM 2021).

Weights are pruned by magnitude during training, more and more on a damped schedule: every
``prune_every`` updates the table's sparsity becomes ``S * (1 - damping ** (t / damping_steps))``
(``t`` the update count, ``S`` the target sparsity), pruning the smallest surviving weights
(globally over the group's stacked table) and zeroing them for good. Pruned weights take no
gradient (the mask multiplies the looked-up rows).

Evaluation and serving read the table at the *target* sparsity at every point of training:
``kept``, the ``nnz`` largest-magnitude surviving weights (ties to the lowest index), is
computed whenever the layer is put in eval mode, and the export computes the same mask from
the same weights in numpy. So every evaluated model and every checkpoint, early ones
included, is a model of the budget's bytes. The table is stored sparse, CSR over the stacked rows (``indptr``
int32, ``indices`` uint8 for ``dim <= 256``, fp32 ``values``): ``csr_bytes`` is its size, the
layer's achieved bytes. A budget sets ``nnz`` (so the sparsity); without one,
``params.sparsity`` does. At ``dim`` 16 the row pointers alone take 1/16 of the full table's
bytes, so a 1/10 budget keeps about 3% of the weights (``dim`` 4, e.g. DeepFM's first-order
tables, cannot go below 1/4).

Training keeps the fp32 table (a ``RowTableLayer``: row-wise Adagrad in backward, data
parallel) and the schedule's bool mask (and ``kept`` while evaluating). numpy twin:
``recemb.serving.variants.deeplight``.

Example (YAML):
    embedding: {kind: deeplight, dim: 16, budget: 0.1, params: {damping_steps: 20}}
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from recemb.embeddings.budget import BudgetError, budget_bytes, full_bytes, largest_at_most
from recemb.embeddings.hashing import salted_seed
from recemb.embeddings.lowprec import stack_offsets
from recemb.embeddings.plan import BYTES_PER_FLOAT, VariantPlan
from recemb.embeddings.registry import VariantSpec, register_module_assembler, register_variant
from recemb.embeddings.rowwise import (
    RowTableLayer,
    RowUpdate,
    resolve_update,
    row_init_std,
    row_table_args,
    top_k_mask,
)
from recemb.errors import ConfigError


@dataclass
class DeepLightParams:
    """``sparsity``: target share of pruned weights when no budget is given (a budget sets it);
    ``damping`` (D) and ``damping_steps`` (T): the schedule ``S * (1 - D ** (t / T))`` (the
    paper's D = 0.99, T = 100 reach 90% of S after ~23k updates: shorten T for short runs);
    ``prune_every``: updates between pruning steps; ``optimizer`` and ``lr`` (None:
    ``embedding.lr``) update the rows."""

    sparsity: float | None = None
    damping: float = 0.99
    damping_steps: int = 100
    prune_every: int = 10
    optimizer: str = "rowwise_adagrad"
    lr: float | None = None


def csr_dtypes(dim: int, nnz: int) -> tuple[str, str]:
    """numpy dtypes of CSR row pointers (int32, int64 from 2**31 entries) and column indices (the
    narrowest unsigned type that holds ``dim - 1``).

    Example:
        >>> csr_dtypes(16, 1000), csr_dtypes(300, 1000)
        (('int32', 'uint8'), ('int32', 'uint16'))
    """
    ptr = "int32" if nnz < 2**31 else "int64"
    idx = "uint8" if dim <= 2**8 else "uint16" if dim <= 2**16 else "uint32"
    return ptr, idx


def csr_bytes(rows: int, dim: int, nnz: int) -> int:
    """Bytes of a ``rows x dim`` table stored as CSR with ``nnz`` fp32 values.

    Example:
        >>> csr_bytes(1000, 16, 100)   # 1001 int32 pointers, 100 uint8 indices, 100 floats
        4504
    """
    ptr, idx = csr_dtypes(dim, nnz)
    return (rows + 1) * np.dtype(ptr).itemsize + nnz * (np.dtype(idx).itemsize + BYTES_PER_FLOAT)


def solve_nnz(rows: int, dim: int, target: int) -> int:
    """The most stored values whose CSR fits ``target`` bytes (``BudgetError`` when not one does).

    Example:
        >>> solve_nnz(1000, 16, 4504)
        100
    """
    nnz = largest_at_most(lambda n: csr_bytes(rows, dim, n), target, 1, rows * dim)
    if nnz is None:
        raise BudgetError(f"embedding.budget: a sparse table of {rows:,} rows needs {csr_bytes(rows, dim, 1):,} "
                          f"bytes for its row pointers and one value, over the budget of {target:,} bytes; raise "
                          "embedding.budget (the pointers take 4 bytes a row)")
    return nnz


def sparsity_at(step: int, target: float, damping: float, damping_steps: int) -> float:
    """DeepLight's damped schedule: ``target * (1 - damping ** (step / damping_steps))``.

    Example:
        >>> round(sparsity_at(100, 0.9, 0.99, 100), 4), round(sparsity_at(10_000, 0.9, 0.99, 100), 4)
        (0.009, 0.5706)
    """
    return target * (1.0 - damping ** (step / damping_steps))


def solve_sparse(spec: VariantSpec, kind: str, sparsity: float | None) -> tuple[int, dict[str, Any]]:
    """``nnz`` of the group's stacked table from ``embedding.budget`` (or ``sparsity``), and the plan's budget record."""
    rows = sum(spec.vocab.values())
    total = rows * spec.dim
    full = full_bytes(list(spec.vocab.values()), [spec.dim] * len(spec.vocab))
    if spec.budget is not None and sparsity is not None:
        raise ConfigError(f"embedding.kind={kind}: give embedding.budget or embedding.params.sparsity, not both")
    if spec.budget is None and sparsity is None:
        raise ConfigError(f"embedding.kind={kind} needs embedding.budget (a byte share) or embedding.params.sparsity")
    target = None
    if spec.budget is not None:
        target = budget_bytes(spec.budget, full)
        nnz = solve_nnz(rows, spec.dim, target)
    else:
        assert sparsity is not None
        if not 0 <= sparsity < 1:
            raise ConfigError(f"embedding.params.sparsity must be in [0, 1), got {sparsity}")
        nnz = max(1, round((1 - sparsity) * total))
    return nnz, {"solver": "csr_nnz", "budget": spec.budget, "target_bytes": target, "nnz": nnz,
                 "sparsity": 1 - nnz / total, "solved_bytes": csr_bytes(rows, spec.dim, nnz)}


def sparse_params(spec: VariantSpec, kind: str, nnz: int, update: RowUpdate) -> dict[str, Any]:
    """The plan params every sparse-row variant shares: stacking, ``nnz``, CSR dtypes, row update, init."""
    ptr, idx = csr_dtypes(spec.dim, nnz)
    return {"offsets": stack_offsets(spec.vocab), "nnz": nnz, "indptr_dtype": ptr, "indices_dtype": idx,
            **update.to_dict(),
            "init_std": {f: row_init_std(spec.init_std, n) for f, n in spec.vocab.items()},
            "init_seed": salted_seed(spec.seed, zlib.crc32(f"{kind}:{spec.prefix}".encode()))}


class SparseRowLayer(RowTableLayer):
    """A ``RowTableLayer`` served as CSR at ``nnz`` stored values, which ``kept`` (bool, the table's shape)
    marks; ``persistent``: whether ``kept`` is state (in the ``state_dict``) or recomputed."""

    def __init__(self, plan: VariantPlan, persistent: bool, device: torch.device | None = None) -> None:
        p = plan.params
        rows, dim, update = row_table_args(plan)
        super().__init__(rows, dim, update, dict(p["init_std"]), p["init_seed"], device)
        self.nnz = int(p["nnz"])
        self.register_buffer("kept", torch.empty(self.total_rows, self.dim, dtype=torch.bool, device=device),
                             persistent=persistent)

    def parameter_bytes(self) -> int:
        """The CSR bytes at ``nnz`` stored values (what a bundle holds)."""
        return csr_bytes(self.total_rows, self.dim, self.nnz)


class MagnitudePrunedLayer(SparseRowLayer):
    """DeepLight's table: ``mask`` (the schedule's, state) and ``kept`` (the target's, computed on ``eval()``)."""

    def __init__(self, plan: VariantPlan, device: torch.device | None = None) -> None:
        super().__init__(plan, persistent=False, device=device)
        p = plan.params
        self.target = float(p["sparsity"])
        self.damping, self.damping_steps, self.prune_every = float(p["damping"]), int(p["damping_steps"]), \
            int(p["prune_every"])
        self.register_buffer("mask", torch.empty(self.total_rows, self.dim, dtype=torch.bool, device=device))
        self.materialize(device)

    def reset_buffers(self) -> None:
        """Initial rows, nothing pruned, the served mask at the target."""
        super().reset_buffers()
        with torch.no_grad():
            self.mask.fill_(True)
            self.refresh_kept()

    def refresh_kept(self) -> None:
        """``kept``: the ``nnz`` largest ``|weight|`` the schedule has not pruned (numpy twin: ``served_mask``)."""
        if self.weight.device.type == "meta":
            return
        with torch.no_grad():
            score = (self.weight.abs() * self.mask).reshape(-1)
            self.kept.copy_(top_k_mask(score, self.nnz).view_as(self.kept))

    def train(self, mode: bool = True) -> MagnitudePrunedLayer:
        """``eval()`` computes ``kept`` from the weights as they are (also after loading a checkpoint)."""
        super().train(mode)
        if not mode:
            self.refresh_kept()
        return self

    def rows_of(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return self.query(rows) * self.mask.index_select(0, rows)

    def served_rows(self, rows: torch.Tensor, blocks: list[tuple[int, int, int]]) -> torch.Tensor:
        return self.weight.index_select(0, rows) * self.kept.index_select(0, rows)

    def after_update(self, rows: torch.Tensor) -> None:
        """Prune on the schedule, every ``prune_every`` updates (never below the target's ``nnz``)."""
        step = int(self.updates)
        if step % self.prune_every:
            return
        total = self.weight.numel()
        keep = max(self.nnz, total - round(sparsity_at(step, self.target, self.damping, self.damping_steps) * total))
        if keep < int(self.mask.sum()):
            score = (self.weight.abs() * self.mask).reshape(-1)
            self.mask.copy_(top_k_mask(score, keep).view_as(self.mask))
            self.weight.mul_(self.mask)

    def training_sparsity(self) -> float:
        """The share of weights the schedule has pruned so far."""
        return 1.0 - float(self.mask.sum()) / self.mask.numel()


@register_variant("deeplight", DeepLightParams)
def plan_deeplight(spec: VariantSpec) -> VariantPlan:
    """A magnitude-pruned table over the group, stored as CSR at the budget's ``nnz``; see the module docstring."""
    params: DeepLightParams = spec.params
    if not 0 < params.damping < 1 or params.damping_steps < 1 or params.prune_every < 1:
        raise ConfigError("embedding.params: damping must be in (0, 1), damping_steps and prune_every >= 1")
    nnz, budget = solve_sparse(spec, "deeplight", params.sparsity)
    update = resolve_update(params.optimizer, params.lr, spec.extra)
    solved = {**sparse_params(spec, "deeplight", nnz, update), "sparsity": budget["sparsity"],
              "damping": params.damping, "damping_steps": params.damping_steps, "prune_every": params.prune_every}
    return spec.plan("deeplight", [], storage="module", multihot=True, params=solved, budget=budget)


@register_module_assembler("deeplight")
def assemble_deeplight(plan: VariantPlan, device: torch.device | None = None) -> MagnitudePrunedLayer:
    """The magnitude-pruned layer of a ``deeplight`` plan."""
    return MagnitudePrunedLayer(plan, device)


__all__ = ["DeepLightParams", "MagnitudePrunedLayer", "SparseRowLayer", "csr_bytes", "csr_dtypes", "plan_deeplight",
           "solve_nnz", "solve_sparse", "sparse_params", "sparsity_at"]
