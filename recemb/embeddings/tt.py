"""The ``tt`` variant: TT-Rec tensor-train tables (Yin et al., MLSys 2021).

Each large feature's ``num_embeddings x dim`` table is three small cores whose
contraction gives any row on demand; small features (or any whose full table is
smaller than its TT form) stay ordinary torchrec tables. The cores are dense
parameters: the dense optimizer trains them and DDP averages their gradients, so
this part is data parallel (every rank holds all cores); only the plain tables
left for small features are sharded by the planner.

Any ``embedding.dim`` works: the cores are dense parameters of any shape, and a plain
table of a width FBGEMM cannot run (10) is held padded (12) in training
(``TableEmbeddingLayer.pad_for_fbgemm``); the rank solver pays for that padding, both
when it compares a TT form with the plain table and when it fits the budget.

The builder plans: the TT features are one ``storage: module`` plan (per feature its
rank, row and dim factors and init std in ``params``), the plain features a ``tt`` plan
of ordinary tables (``full``'s layout); each part is assembled from its own plan.

Example (YAML):
    embedding: {kind: tt, dim: 16, budget: 0.01, params: {min_rows: 0}}
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recemb.embeddings.base import BYTES_PER_FLOAT, EmbeddingLayer, GroupedEmbeddingLayer, fbgemm_width
from recemb.embeddings.budget import BudgetError, budget_bytes, largest_at_most
from recemb.embeddings.full import FullParams, plan_full
from recemb.embeddings.plan import Capabilities, VariantPlan
from recemb.embeddings.registry import VariantSpec, assemble, register_module_assembler, register_variant
from recemb.errors import ConfigError

DENSE = 0  # rank of a feature that stays a plain table


@dataclass
class TTParams:
    """``rank``: TT-rank of every core when ``budget`` is None; ``min_rows``: features
    with fewer ids always stay plain tables."""

    rank: int = 8
    min_rows: int = 0


def row_factors(rows: int) -> tuple[int, int, int]:
    """Near-cubic ``(n1, n2, n3)`` with ``n1 * n2 * n3 >= rows`` (padding ids are never looked up).

    Example:
        >>> row_factors(25196)
        (30, 29, 29)
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    n1 = max(1, math.ceil(round(rows ** (1 / 3), 9)))
    n2 = max(1, math.ceil(math.sqrt(rows / n1)))
    n3 = max(1, math.ceil(rows / (n1 * n2)))
    return n1, n2, n3


def dim_factors(dim: int) -> tuple[int, int, int]:
    """``(d1, d2, d3)`` with product ``dim``, as balanced as possible, the smallest in the middle.

    The middle core costs ``r * n2 * d2 * r``, so it gets the smallest factor.

    Example:
        >>> dim_factors(16)
        (2, 2, 4)
    """
    best: tuple[int, int, int] | None = None
    for a in range(1, dim + 1):
        if dim % a:
            continue
        for b in range(a, dim // a + 1):
            if (dim // a) % b or dim // a // b < b:
                continue
            c = dim // a // b
            if best is None or c - a < best[2] - best[0]:
                best = (a, b, c)
    assert best is not None
    small, mid, big = best
    return mid, small, big


def tt_floats(rows: int, dim: int, rank: int) -> int:
    """Floats of the three cores of a ``rows x dim`` table at TT-rank ``rank``."""
    n1, n2, n3 = row_factors(rows)
    d1, d2, d3 = dim_factors(dim)
    return n1 * d1 * rank + rank * n2 * d2 * rank + rank * n3 * d3


def plain_floats(rows: int, dim: int) -> int:
    """Floats of a plain ``rows x dim`` table as training holds it (``fbgemm_width(dim)`` columns).

    Example:
        >>> plain_floats(100, 16), plain_floats(100, 10)
        (1600, 1200)
    """
    return rows * fbgemm_width(dim)


def _feature_floats(rows: int, dim: int, rank: int) -> int:
    return plain_floats(rows, dim) if rank == DENSE else tt_floats(rows, dim, rank)


def _rank_or_dense(rows: int, dim: int, rank: int, min_rows: int) -> int:
    """``rank``, or ``DENSE`` where the feature is small or its TT form is not smaller than the plain
    table as training holds it (padded)."""
    if rows < min_rows or tt_floats(rows, dim, rank) >= plain_floats(rows, dim):
        return DENSE
    return rank


def solve_tt_ranks(vocab: list[int], dim: int, target_bytes: int | None, rank: int = 8, min_rows: int = 0) -> list[int]:
    """TT-rank per feature (``DENSE`` = 0 for a plain table) whose total bytes fit ``target_bytes``.

    Without a target every feature gets ``rank``. With one, the largest common
    rank that fits is found, then features (largest first) are raised one rank
    each while the total still fits, so the bytes land within one feature's step
    of the target. Raises ``BudgetError`` when rank 1 does not fit.

    Example:
        >>> solve_tt_ranks([10, 100000], dim=16, target_bytes=None, rank=8)
        [0, 8]
    """
    if target_bytes is None:
        return [_rank_or_dense(v, dim, rank, min_rows) for v in vocab]
    target = target_bytes // BYTES_PER_FLOAT

    def cost(r: int) -> int:
        return sum(_feature_floats(v, dim, _rank_or_dense(v, dim, r, min_rows)) for v in vocab)

    top = 1
    while any(_rank_or_dense(v, dim, top, min_rows) != DENSE for v in vocab):
        top *= 2
    common = largest_at_most(cost, target, 1, top)
    if common is None:
        raise BudgetError(
            f"embedding.kind=tt: rank 1 takes {cost(1) * BYTES_PER_FLOAT:,} bytes, over the budget of "
            f"{target_bytes:,} bytes; raise embedding.budget or params.min_rows"
        )
    ranks = [_rank_or_dense(v, dim, common, min_rows) for v in vocab]
    total = cost(common)
    for i in sorted(range(len(vocab)), key=lambda j: -vocab[j]):
        if ranks[i] == DENSE:
            continue
        bumped = _rank_or_dense(vocab[i], dim, ranks[i] + 1, min_rows)
        if bumped == DENSE:
            continue
        extra = tt_floats(vocab[i], dim, bumped) - tt_floats(vocab[i], dim, ranks[i])
        if total + extra <= target:
            ranks[i], total = bumped, total + extra
    return ranks


class TTTable(nn.Module):
    """One tensor-train table: cores ``g1 [n1, d1, r]``, ``g2 [n2, r, d2, r]``, ``g3 [n3, r, d3]``.

    The cores are stored with the row factor first (TT-Rec's ``[r, n2, d2, r]``
    transposed) so a lookup gathers contiguous slices. ``n`` and ``d`` are the row and dim
    factors the plan recorded (``row_factors``, ``dim_factors``).
    """

    def __init__(self, rows: int, n: tuple[int, int, int], d: tuple[int, int, int], rank: int, std: float,
                 device: torch.device | None = None) -> None:
        super().__init__()
        if n[0] * n[1] * n[2] < rows:
            raise ValueError(f"row factors {n} cover fewer than {rows} rows")
        self.rows, self.dim, self.rank, self.std = rows, d[0] * d[1] * d[2], rank, std
        self.n, self.d = tuple(n), tuple(d)
        (n1, n2, n3), (d1, d2, d3) = self.n, self.d
        self.g1 = nn.Parameter(torch.empty(n1, d1, rank, device=device))
        self.g2 = nn.Parameter(torch.empty(n2, rank, d2, rank, device=device))
        self.g3 = nn.Parameter(torch.empty(n3, rank, d3, device=device))
        if self.g1.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal cores whose product rows have std ``self.std``: each entry of a row
        sums ``r * r`` products of three core entries, so each core gets
        ``(std**2 / r**2) ** (1/6)``."""
        core_std = (self.std**2 / self.rank**2) ** (1 / 6)
        for core in (self.g1, self.g2, self.g3):
            nn.init.normal_(core, mean=0.0, std=core_std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``[len(ids), dim]`` rows of ``ids`` (int64, in ``[0, rows)``), contracted from the cores.

        The first two cores are contracted for every ``(i1, i2)`` pair first
        (``n1 * n2`` is about ``rows ** (2/3)``, fewer than a batch's ids), so each
        id then costs one small ``[d1*d2, r] @ [r, d3]`` product and the big
        middle core is never gathered per id.
        """
        n1, n2, n3 = self.n
        d1, d2, d3 = self.d
        pairs = torch.einsum("iar,jrbs->ijabs", self.g1, self.g2).reshape(n1 * n2, d1 * d2, self.rank)
        prefix = torch.div(ids, n3, rounding_mode="floor")  # = i1 * n2 + i2
        return torch.bmm(pairs[prefix], self.g3[ids % n3]).reshape(ids.numel(), d1 * d2 * d3)


class TTEmbeddingLayer(EmbeddingLayer):
    """Features whose tables are ``TTTable``s; each bag is the sum of its ids' rows.

    Rows are contracted once per distinct id of the batch and then pooled with
    ``embedding_bag`` over those rows. Built from a plan by ``from_plan``.
    """

    @classmethod
    def from_plan(cls, plan: VariantPlan, device: torch.device | None = None) -> TTEmbeddingLayer:
        """The cores ``plan.params["tables"]`` describes, one ``TTTable`` per feature in plan order."""
        tables = plan.params["tables"]
        return cls({
            f: TTTable(plan.full_rows[f], tuple(tables[f]["row_factors"]), tuple(tables[f]["dim_factors"]),
                       tables[f]["rank"], tables[f]["init_std"], device)
            for f in plan.features
        })

    def __init__(self, tables: dict[str, TTTable]) -> None:
        super().__init__()
        self.features = list(tables)
        self.dims = {f: t.dim for f, t in tables.items()}
        self.full_rows = {f: t.rows for f, t in tables.items()}
        self.cores = nn.ModuleDict(tables)

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        batch = kjt.stride()
        keys = kjt.keys()
        values, lengths, starts = kjt.values(), kjt.lengths(), kjt.offset_per_key()
        out: list[torch.Tensor] = []
        for f in self.features:
            k = keys.index(f)
            ids = values[starts[k]:starts[k + 1]]
            offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths[k * batch:(k + 1) * batch])
            unique, inverse = torch.unique(ids, return_inverse=True)
            rows = self.cores[f](unique)
            out.append(F.embedding_bag(inverse, rows, offsets, mode="sum", include_last_offset=True))
        return KeyedTensor.from_tensor_list(self.features, out)


def tt_table_params(rows: int, dim: int, rank: int, init_std: float | None) -> dict[str, Any]:
    """The plan's JSON for one TT feature: rank, row and dim factors, and the rows' init std."""
    return {"rank": rank, "row_factors": list(row_factors(rows)), "dim_factors": list(dim_factors(dim)),
            "init_std": _row_std(init_std, rows)}


@register_variant("tt", TTParams)
def plan_tt(spec: VariantSpec) -> VariantPlan | EmbeddingLayer:
    """TT tables for the features the budget solver gives a rank, plain tables for the rest.

    One part: its plan (the registry assembles it). Both: a ``GroupedEmbeddingLayer`` of
    ``tt`` (module plan) and ``dense`` (table plan), each assembled from its own plan.
    """
    params: TTParams = spec.params
    if params.rank < 1:
        raise ConfigError(f"embedding.params.rank must be >= 1, got {params.rank}")
    vocab = spec.vocab
    full = sum(vocab.values()) * spec.dim * BYTES_PER_FLOAT
    target = None if spec.budget is None else budget_bytes(spec.budget, full)
    ranks = dict(zip(spec.names, solve_tt_ranks(list(vocab.values()), spec.dim, target, rank=params.rank,
                                                 min_rows=params.min_rows), strict=True))
    budget = {"solver": "tt_ranks", "budget": spec.budget, "target_bytes": target, "rank": params.rank,
              "min_rows": params.min_rows, "ranks": ranks}
    if fbgemm_width(spec.dim) != spec.dim:  # plain tables were weighed padded; only there, so other plans stay
        budget["padded_dim"] = fbgemm_width(spec.dim)
    parts: dict[str, VariantPlan] = {}
    tt_features = [f for f in spec.features if ranks[f.name] != DENSE]
    if tt_features:
        tt_spec = dataclasses.replace(spec, features=tt_features)
        parts["tt"] = tt_spec.plan("tt", [], storage="module", multihot=True, budget=budget, params={
            "tables": {f: tt_table_params(vocab[f], spec.dim, ranks[f], spec.init_std) for f in tt_spec.names}})
    dense = [f for f in spec.features if ranks[f.name] == DENSE]
    if dense:
        # Plain tables laid out as ``full`` lays them out, under this variant's kind.
        sub = dataclasses.replace(spec, features=dense, budget=None, params=FullParams())
        parts["dense"] = dataclasses.replace(plan_full(sub), kind="tt", capabilities=Capabilities(budget=budget))
    if len(parts) == 1:
        return next(iter(parts.values()))
    return GroupedEmbeddingLayer({name: assemble(p, spec.device) for name, p in parts.items()}, spec.names)


@register_module_assembler("tt")
def assemble_tt(plan: VariantPlan, device: torch.device | None = None) -> TTEmbeddingLayer:
    """The TT layer of a ``storage: module`` plan."""
    return TTEmbeddingLayer.from_plan(plan, device)


def _row_std(init_std: float | None, rows: int) -> float:
    """The std rows should start with: ``init_std``, else torchrec's default ``U(+-1/sqrt(rows))``'s std."""
    return init_std if init_std is not None else 1.0 / math.sqrt(3.0 * rows)
