"""Fp32 tables that update their own looked-up rows in backward: the layer behind ``dpq``, ``mgqe``, ``deeplight``, ``pep``.

These variants put a transform between a gathered row and its bag (quantise it to a
codebook, multiply it by a pruning mask, soft-threshold it), which torchrec's pooled
lookups cannot express. So they keep one stacked fp32 table of their own (the features
one after another, ``stack_offsets``), gather each batch's distinct rows, transform
them (``rows_of``, per variant) and sum-pool the bags. The backward pass updates the
gathered rows in place with the rule FBGEMM's fused kernels apply to ``full`` tables:
exact row-wise Adagrad (``embedding.lr``, ``eps``, ``initial_accumulator``) or SGD. Then
``after_update`` runs (code assignment, pruning schedules) on the same rows.

Data parallel: every rank holds the whole table; backward all-gathers the touched rows'
gradients (summed per row, divided by the world size as DDP does), so every rank applies
the same update and stays bit-identical. The table and its optimizer state are buffers
(DDP leaves them alone); the layer's dense parameters (codebooks, thresholds) train
with the dense optimizer. Built on the meta device, ``reset_buffers`` regenerates the
initial rows from the plan's seed (deterministic, rank-independent).

Example:
    >>> top_k_mask(torch.tensor([0.5, 2.0, 0.5, 1.0]), 3).tolist()
    [True, True, False, True]
"""

from __future__ import annotations

import abc
import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recemb.embeddings.base import EmbeddingLayer, in_order
from recemb.embeddings.hashing import salted_seed
from recemb.embeddings.lowprec import gather_rows, stack_offsets
from recemb.errors import ConfigError

OPTIMIZERS = ("rowwise_adagrad", "sgd")
_INIT_CHUNK_ROWS = 1 << 20  # initialise big tables in chunks to bound the scratch


@dataclass(frozen=True)
class RowUpdate:
    """How the table's rows are updated in backward: ``rowwise_adagrad`` (FBGEMM's exact rule:
    ``acc += mean(g**2)``, ``w -= lr * g / (sqrt(acc) + eps)``) or ``sgd``."""

    optimizer: str
    lr: float
    eps: float
    initial_accumulator: float

    def to_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer, "lr": self.lr, "eps": self.eps,
                "initial_accumulator": self.initial_accumulator}


def resolve_update(optimizer: str, lr: float | None, extra: dict[str, Any]) -> RowUpdate:
    """The row update of a variant's params (``lr`` None: ``embedding.lr``), checked."""
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"embedding.params.optimizer must be one of {', '.join(OPTIMIZERS)}, got '{optimizer}'")
    rate = float(lr if lr is not None else extra.get("lr", 0.01))
    if not rate > 0:
        raise ConfigError(f"embedding.params.lr must be > 0, got {rate}")
    return RowUpdate(optimizer, rate, float(extra.get("eps", 1e-8)), float(extra.get("initial_accumulator", 0.0)))


def row_init_std(init_std: float | None, rows: int) -> float:
    """The std rows start with: ``embedding.init_std``, else torchrec's default ``U(+-1/sqrt(rows))``'s std."""
    return init_std if init_std is not None else 1.0 / math.sqrt(3.0 * rows)


def top_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of a flat ``score``; ties at the cut go to the lowest indices.

    Deterministic (no sort order left to the kernel), so every rank and every rebuild keeps the same entries.
    """
    n = score.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=score.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=score.device)
    cut = torch.kthvalue(score, n - k + 1).values  # the k-th largest
    above = score > cut
    tie = score == cut
    need = k - int(above.sum())
    return above | (tie & (torch.cumsum(tie.to(torch.int64), 0) <= need))


def row_table_args(plan: Any) -> tuple[dict[str, int], int, RowUpdate]:
    """A row-table plan's stacked rows per feature, its one dim and its row update, checked:
    the plan's ``offsets`` must be the features stacked in order and every feature one dim."""
    p = plan.params
    rows = {f: plan.full_rows[f] for f in plan.features}
    if p["offsets"] != stack_offsets(rows):
        raise ValueError(f"{plan.kind} plan: offsets {p['offsets']} are not the features stacked in order")
    dims = set(plan.dims.values())
    if len(dims) != 1:
        raise ValueError(f"{plan.kind} plans have one dim for all features, got {sorted(dims)}")
    return rows, dims.pop(), RowUpdate(p["optimizer"], p["lr"], p["eps"], p["initial_accumulator"])


class _RowLookup(torch.autograd.Function):
    """Forward: the table's rows at ``rows`` (distinct); backward: the layer updates them, nothing flows on."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, rows: torch.Tensor, layer: RowTableLayer) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(rows)
        ctx.layer = layer
        return layer.weight.index_select(0, rows)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None]:  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        ctx.layer.apply_update(rows, grad)
        return None, None, None


class RowTableLayer(EmbeddingLayer, abc.ABC):
    """One stacked fp32 table (``weight``) over ``rows``' features, updated in backward; see the module docstring.

    Subclasses give ``rows_of(rows, counts)`` (training: the output rows of distinct stacked rows, with
    ``query`` for the differentiable gathered rows) and ``served_rows(rows, blocks)`` (evaluation: every
    id's row as served, no sort), and may override ``after_update(rows)`` and ``reset_buffers``. ``lr`` is
    the row update's current rate (``train.lr_schedule`` sets it, as for ``lowprec``).
    ``init_std`` is per feature; ``seed`` fixes the initial rows.
    """

    def __init__(self, rows: dict[str, int], dim: int, update: RowUpdate, init_std: dict[str, float], seed: int,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.features = list(rows)
        self.dims = {f: dim for f in self.features}
        self.full_rows = dict(rows)
        self.dim = dim
        self.update = update
        self.lr = update.lr  # the rate in use: train.lr_schedule scales it (self_updating_rates)
        self.init_std = dict(init_std)
        self.seed = seed
        self.offsets = stack_offsets(rows)
        self.total_rows = sum(rows.values())
        self.process_group: Any = None  # None: the default group
        adagrad = update.optimizer == "rowwise_adagrad"
        self.register_buffer("weight", torch.empty(self.total_rows, dim, device=device))
        self.register_buffer("row_sq_grad", torch.empty(self.total_rows if adagrad else 0, device=device))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64, device=device))
        starts = [self.offsets[f] for f in self.features] + [self.total_rows]
        self.register_buffer("bounds", torch.tensor(starts, dtype=torch.int64, device=device), persistent=False)

    def materialize(self, device: torch.device | None) -> None:
        """Fill a freshly built (not meta) layer: parameters, then buffers (DMP does the same after a meta build)."""
        if device is None or device.type != "meta":
            reset = getattr(self, "reset_parameters", None)
            if callable(reset):
                reset()
            self.reset_buffers()

    def initial_rows(self) -> torch.Tensor:
        """The table's starting rows, regenerated from ``seed`` (each feature ``N(0, init_std[f])``)."""
        gen = torch.Generator(device=self.weight.device).manual_seed(salted_seed(self.seed, 1))
        out = torch.empty(self.total_rows, self.dim, device=self.weight.device)
        for f in self.features:
            lo, hi = self.offsets[f], self.offsets[f] + self.full_rows[f]
            for start in range(lo, hi, _INIT_CHUNK_ROWS):
                end = min(start + _INIT_CHUNK_ROWS, hi)
                out[start:end] = torch.randn(end - start, self.dim, generator=gen, device=out.device) * self.init_std[f]
        return out

    def reset_buffers(self) -> None:
        """Initial rows from ``seed``, optimizer state and update count back to their start."""
        with torch.no_grad():
            self.weight.copy_(self.initial_rows())
            self.row_sq_grad.fill_(self.update.initial_accumulator)
            self.updates.zero_()
            self.bounds.copy_(torch.tensor([self.offsets[f] for f in self.features] + [self.total_rows]))

    def feature_slices(self, rows: torch.Tensor) -> list[tuple[int, int, int]]:
        """``(feature index, start, end)`` of each feature's block in sorted stacked ``rows`` (empty blocks left out)."""
        cuts = torch.searchsorted(rows, self.bounds).tolist()
        return [(i, cuts[i], cuts[i + 1]) for i in range(len(self.features)) if cuts[i + 1] > cuts[i]]

    def query(self, rows: torch.Tensor) -> torch.Tensor:
        """The table's rows at distinct ``rows``; in training with grad, through the in-backward update."""
        if self.training and torch.is_grad_enabled():
            anchor = torch.empty(0, device=rows.device, requires_grad=True)
            return _RowLookup.apply(anchor, rows, self)
        return self.weight.index_select(0, rows)

    @abc.abstractmethod
    def rows_of(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Training: ``[len(rows), dim]`` output rows of distinct, sorted stacked ``rows`` (``counts``: how
        often the batch looks each up)."""

    @abc.abstractmethod
    def served_rows(self, rows: torch.Tensor, blocks: list[tuple[int, int, int]]) -> torch.Tensor:
        """Evaluation: ``[len(rows), dim]`` rows as served, for stacked ``rows`` as the batch has them
        (repeats, any order within a feature), in ``blocks`` ``(feature index, start, end)`` by feature."""

    def after_update(self, rows: torch.Tensor) -> None:
        """Runs after each row update with the updated rows (all ranks' distinct rows); nothing by default."""

    def apply_update(self, rows: torch.Tensor, grads: torch.Tensor) -> None:
        """One optimizer step on distinct ``rows`` with their gradients, then ``after_update``."""
        with torch.no_grad():
            grads = grads.float()
            if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
                rows, grads = gather_rows(rows, grads, self.process_group)
            if self.update.optimizer == "rowwise_adagrad":
                acc = self.row_sq_grad.index_select(0, rows) + grads.pow(2).mean(dim=1)
                self.row_sq_grad.index_copy_(0, rows, acc)
                step = grads * (self.lr / (acc.sqrt() + self.update.eps)).unsqueeze(1)
            else:
                step = grads * self.lr
            self.weight.index_add_(0, rows, step, alpha=-1.0)
            self.updates += 1
            self.after_update(rows)

    def stacked_rows(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """Every id of ``kjt`` as a row of the stacked table (int64)."""
        values = kjt.values()
        per_key = torch.tensor(kjt.length_per_key(), device=values.device)
        base = torch.tensor([self.offsets[k] for k in kjt.keys()], dtype=torch.int64, device=values.device)
        return values.to(torch.int64) + torch.repeat_interleave(base, per_key)

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        keys = kjt.keys()
        batch = kjt.stride()
        rows = self.stacked_rows(kjt)
        lengths = kjt.lengths().to(torch.int64)
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=rows.device)
        torch.cumsum(lengths, 0, out=offsets[1:])
        if self.training:  # distinct rows: one update and one output row per row of the table
            distinct, inverse, counts = torch.unique(rows, return_inverse=True, return_counts=True)
            out_rows = self.rows_of(distinct, counts)
        else:  # no sort: every id's served row, in place
            starts = [0, *itertools.accumulate(kjt.length_per_key())]
            blocks = [(self.features.index(k), starts[i], starts[i + 1]) for i, k in enumerate(keys)
                      if starts[i + 1] > starts[i]]
            out_rows = self.served_rows(rows, blocks)
            inverse = torch.arange(rows.numel(), device=rows.device)
        pooled = F.embedding_bag(inverse, out_rows, offsets, mode="sum", include_last_offset=True)
        out = pooled.view(len(keys), batch, self.dim).transpose(0, 1).reshape(batch, len(keys) * self.dim)
        return in_order(KeyedTensor(keys=list(keys), length_per_key=[self.dim] * len(keys), values=out),
                        self.features)

    def training_bytes(self) -> int:
        """What training holds: the fp32 table and its optimizer state, buffers and dense parameters."""
        return super().parameter_bytes()


__all__ = ["OPTIMIZERS", "RowTableLayer", "RowUpdate", "gather_rows", "resolve_update", "row_table_args", "row_init_std", "top_k_mask"]
