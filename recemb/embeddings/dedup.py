"""The ``dedup`` variant: near-duplicate blocks of the tables merged by locality-sensitive hashing.

After the dedup of Zhou et al. (VLDB 2022), as the VLDB'24 compression survey runs it: the
group's stacked table is cut into blocks of ``block`` values (``dim / block`` slots a row), blocks
that an L2 LSH puts in one cell merge into one copy (their mean) and every (row, slot) keeps an
index to its copy. Stored: the unique blocks (fp32) and the index (uint8, uint16 or int32, the
narrowest that numbers them): ``dedup_bytes``. The hashing is ``dedup_table`` in
``recemb.embeddings.blockdedup`` (numpy, torch-free): the numpy twin and this layer run the same code.

Why this design: training keeps the full fp32 table (a ``RowTableLayer``: row-wise Adagrad in
backward, data parallel), so blocks learn freely and similar ones can be found. Whenever the layer
is put in eval mode after an update (and, with ``dedup_every`` > 0, every that many row updates)
the table is deduplicated *in place*: each block takes its copy's value, and training goes on from
the merged table (merged blocks may drift apart until the next deduplication). So every evaluated
model and every checkpoint is a model of the budget's bytes, what the bundle serves, and the phase
(``deduped_at``, the update count of the last deduplication) is layer state: a resumed run goes on
alike.

The budget sets the block size and the threshold: ``unique``, the most blocks the budget's bytes
hold next to the index, is the cap, and the LSH cell width is bisected to the smallest that leaves
at most ``unique`` cells (``params.threshold``: a floor on it, relative to the blocks' RMS norm).
``params.block`` None: the divisor of ``dim`` that keeps the largest share of blocks unique (at
tight budgets, whole rows: the index is then smallest). Where budgets cannot be reached: the index
takes at least a byte per block, so at ``block = dim = 16`` no budget under 1/64 of the full
tables; between 1/64 and 1/32 only uint8 indices fit, so at most 256 unique blocks, and the
stored bytes fall short of the budget (so they do just above where uint16 indices begin to fit, by up to
~15%: 256 unique blocks of uint8 beat fewer of uint16). At 1/10 and dim 16 about 7% of the rows stay unique.
``stats()`` reports the blocks and how many merged (also logged at each deduplication).
Measured (DCNv2, 400k synthetic rows, 1 epoch of 78 steps, 1/10): test AUC 0.73523 against full's
0.73572 deduplicating only at the end, 0.73490 every 10 updates, 0.73469 with blocks of 8.

Example (YAML):
    embedding: {kind: dedup, dim: 16, budget: 0.1, params: {dedup_every: 0}}
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from recemb.embeddings.blockdedup import DedupResult, dedup_table
from recemb.embeddings.budget import BudgetError, budget_bytes
from recemb.embeddings.hashing import salted_seed
from recemb.embeddings.lowprec import stack_offsets
from recemb.embeddings.plan import BYTES_PER_FLOAT, VariantPlan
from recemb.embeddings.registry import VariantSpec, register_module_assembler, register_variant
from recemb.embeddings.rowwise import RowTableLayer, resolve_update, row_init_std, row_table_args
from recemb.errors import ConfigError

log = logging.getLogger("recemb.embeddings.dedup")
# Index dtypes, narrowest first, with how many unique blocks each can number.
INDEX_DTYPES = (("uint8", 2**8), ("uint16", 2**16), ("int32", 2**31 - 1))


@dataclass
class DedupParams:
    """``block``: values a block (a divisor of ``dim``; None: the budget picks); ``unique_share``:
    without a budget, the share of blocks kept unique; ``threshold``: blocks closer than this times
    the blocks' RMS norm always merge (a floor on the LSH cell width; 0: the budget alone sets it);
    ``dedup_every``: row updates between deduplications while training (0, the default: only when
    evaluated and exported, which measured best on the synthetic data); ``optimizer`` and ``lr`` (None: ``embedding.lr``) update the rows."""

    block: int | None = None
    unique_share: float | None = None
    threshold: float = 0.0
    dedup_every: int = 0
    optimizer: str = "rowwise_adagrad"
    lr: float | None = None


@dataclass(frozen=True)
class DedupLayout:
    """A solved layout: ``block`` values a block, at most ``unique`` unique blocks, ``index_dtype`` numbering them."""

    block: int
    unique: int
    index_dtype: str


def index_dtype_for(unique: int) -> str:
    """The narrowest index dtype that numbers ``unique`` blocks.

    Example:
        >>> index_dtype_for(256), index_dtype_for(257), index_dtype_for(70_000)
        ('uint8', 'uint16', 'int32')
    """
    return next(dtype for dtype, limit in INDEX_DTYPES if unique <= limit)


def dedup_bytes(rows: int, dim: int, layout: DedupLayout) -> int:
    """Stored bytes: ``unique`` fp32 blocks and one index per (row, slot).

    Example:
        >>> dedup_bytes(1000, 16, DedupLayout(block=16, unique=100, index_dtype="uint8"))  # 100 * 64 + 1000
        7400
    """
    slots = rows * (dim // layout.block)
    return layout.unique * layout.block * BYTES_PER_FLOAT + slots * np.dtype(layout.index_dtype).itemsize


def unique_within(rows: int, dim: int, block: int, target: int) -> DedupLayout | None:
    """The most unique blocks of ``block`` values whose stored form fits ``target`` bytes (None: not one fits).

    Example:
        >>> unique_within(1000, 16, 16, 7400)
        DedupLayout(block=16, unique=100, index_dtype='uint8')
    """
    blocks = rows * (dim // block)
    best: DedupLayout | None = None
    for dtype, limit in INDEX_DTYPES:
        room = target - blocks * np.dtype(dtype).itemsize
        unique = min(room // (block * BYTES_PER_FLOAT), limit, blocks)
        if unique >= 1 and (best is None or unique > best.unique):
            best = DedupLayout(block, int(unique), index_dtype_for(int(unique)))
    return best


def solve_layout(rows: int, dim: int, target: int | None, block: int | None,
                 unique_share: float | None) -> DedupLayout:
    """The layout of ``target`` bytes (or of ``unique_share`` without one); see the module docstring.

    Example:
        >>> solve_layout(10_000, 16, 64_000, None, None)   # 1/10: whole rows, uint16 indices
        DedupLayout(block=16, unique=687, index_dtype='uint16')
    """
    divisors = [d for d in range(dim, 0, -1) if dim % d == 0]
    if block is not None and block not in divisors:
        raise ConfigError(f"embedding.params.block={block} must divide embedding.dim={dim} ({sorted(divisors)})")
    candidates = [block] if block is not None else divisors
    if target is None:
        assert unique_share is not None
        b = candidates[0]
        unique = max(1, round(unique_share * rows * (dim // b)))
        return DedupLayout(b, unique, index_dtype_for(unique))
    best: DedupLayout | None = None
    for b in candidates:  # the largest share of blocks unique; ties to the larger block (a smaller index)
        found = unique_within(rows, dim, b, target)
        if found is not None and (best is None or found.unique * b > best.unique * best.block):
            best = found
    if best is None:
        b = candidates[0]
        smallest = dedup_bytes(rows, dim, DedupLayout(b, 1, "uint8"))
        raise BudgetError(f"embedding.budget: the block index alone takes a byte per block ({rows * (dim // b):,} "
                          f"blocks of {b}: {smallest:,} bytes with one unique block), over the budget of "
                          f"{target:,} bytes; raise embedding.budget (at block = dim it is 1/(4 * dim) of full)")
    return best


class DedupLayer(RowTableLayer):
    """A full fp32 table, deduplicated in place every ``dedup_every`` updates and when evaluated; see the module docstring.

    Buffers beyond the row table's: ``deduped_at`` (the update count of the last deduplication, -1 before the
    first) and ``unique_blocks`` (the unique blocks it left).
    """

    def __init__(self, plan: VariantPlan, device: torch.device | None = None) -> None:
        p = plan.params
        rows, dim, update = row_table_args(plan)
        super().__init__(rows, dim, update, dict(p["init_std"]), p["init_seed"], device)
        self.layout = DedupLayout(int(p["block"]), int(p["unique"]), str(p["index_dtype"]))
        self.threshold, self.dedup_every, self.lsh_seed = float(p["threshold"]), int(p["dedup_every"]), \
            int(p["lsh_seed"])
        self.blocks = self.total_rows * (dim // self.layout.block)
        self.register_buffer("deduped_at", torch.empty((), dtype=torch.int64, device=device))
        self.register_buffer("unique_blocks", torch.empty((), dtype=torch.int64, device=device))
        self.materialize(device)

    def reset_buffers(self) -> None:
        """Initial rows, not yet deduplicated."""
        super().reset_buffers()
        with torch.no_grad():
            self.deduped_at.fill_(-1)
            self.unique_blocks.fill_(self.blocks)

    @property
    def current(self) -> bool:
        """Whether the table is as its last deduplication left it (no update since)."""
        return int(self.deduped_at) == int(self.updates)

    def deduplicate(self) -> DedupResult:
        """Merge the table's near-duplicate blocks in place (``dedup_table``, on the host), on every rank alike."""
        with torch.no_grad():
            merged, result = dedup_table(self.weight.cpu().numpy(), self.layout.block, self.layout.unique,
                                         self.threshold, self.lsh_seed)
            self.weight.copy_(torch.from_numpy(merged).to(self.weight.device))
            self.deduped_at.fill_(int(self.updates))
            self.unique_blocks.fill_(result.unique)
        log.info("dedup at update %d: %d blocks of %d -> %d unique (%d merged, cell width %.3g)", int(self.updates),
                 result.blocks, self.layout.block, result.unique, result.merged, result.width)
        return result

    def stats(self) -> DedupResult:
        """Blocks, unique blocks after the last deduplication (all before the first), and the merged count."""
        return DedupResult(self.blocks, int(self.unique_blocks), float("nan"))

    def train(self, mode: bool = True) -> DedupLayer:
        """``eval()`` deduplicates a table trained since its last deduplication (also one loaded from a checkpoint)."""
        super().train(mode)
        if not mode and self.weight.device.type != "meta" and not self.current:
            self.deduplicate()
        return self

    def rows_of(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return self.query(rows)

    def served_rows(self, rows: torch.Tensor, blocks: list[tuple[int, int, int]]) -> torch.Tensor:
        return self.weight.index_select(0, rows)  # deduplicated on eval()

    def after_update(self, rows: torch.Tensor) -> None:
        """Deduplicate every ``dedup_every`` updates."""
        if self.dedup_every and int(self.updates) % self.dedup_every == 0:
            self.deduplicate()

    def parameter_bytes(self) -> int:
        """The stored bytes at the plan's ``unique`` blocks (what a bundle holds at most)."""
        return dedup_bytes(self.total_rows, self.dim, self.layout)


@register_variant("dedup", DedupParams)
def plan_dedup(spec: VariantSpec) -> VariantPlan:
    """A table over the group deduplicated by blocks to the budget's bytes; see the module docstring."""
    params: DedupParams = spec.params
    if params.dedup_every < 0 or params.threshold < 0:
        raise ConfigError("embedding.params: dedup_every and threshold must be >= 0")
    if spec.budget is not None and params.unique_share is not None:
        raise ConfigError("embedding.kind=dedup: give embedding.budget or embedding.params.unique_share, not both")
    if spec.budget is None and params.unique_share is None:
        raise ConfigError("embedding.kind=dedup needs embedding.budget (a byte share) or embedding.params.unique_share")
    if params.unique_share is not None and not 0 < params.unique_share <= 1:
        raise ConfigError(f"embedding.params.unique_share must be in (0, 1], got {params.unique_share}")
    rows = sum(spec.vocab.values())
    full = rows * spec.dim * BYTES_PER_FLOAT
    target = None if spec.budget is None else budget_bytes(spec.budget, full)
    layout = solve_layout(rows, spec.dim, target, params.block, params.unique_share)
    blocks = rows * (spec.dim // layout.block)
    budget = {"solver": "dedup_blocks", "budget": spec.budget, "target_bytes": target, "block": layout.block,
              "blocks": blocks, "unique": layout.unique, "unique_share": layout.unique / blocks,
              "index_dtype": layout.index_dtype, "solved_bytes": dedup_bytes(rows, spec.dim, layout)}
    update = resolve_update(params.optimizer, params.lr, spec.extra)
    salt = zlib.crc32(f"dedup:{spec.prefix}".encode())
    solved: dict[str, Any] = {
        "offsets": stack_offsets(spec.vocab), "block": layout.block, "unique": layout.unique,
        "index_dtype": layout.index_dtype, "threshold": params.threshold, "dedup_every": params.dedup_every,
        **update.to_dict(), "init_std": {f: row_init_std(spec.init_std, n) for f, n in spec.vocab.items()},
        "init_seed": salted_seed(spec.seed, salt), "lsh_seed": salted_seed(spec.seed, salt + 1),
    }
    return spec.plan("dedup", [], storage="module", multihot=True, params=solved, budget=budget)


@register_module_assembler("dedup")
def assemble_dedup(plan: VariantPlan, device: torch.device | None = None) -> DedupLayer:
    """The deduplicated layer of a ``dedup`` plan."""
    return DedupLayer(plan, device)


__all__ = ["INDEX_DTYPES", "DedupLayer", "DedupLayout", "DedupParams", "dedup_bytes", "index_dtype_for",
           "plan_dedup", "solve_layout", "unique_within"]
