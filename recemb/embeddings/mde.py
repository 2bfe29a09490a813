"""The ``mde`` variant: mixed-dimension embeddings (Ginart et al., 2021), projected to ``dim``.

Each feature (or each frequency block of a feature, ``blocks > 1``) is its own table
whose width follows the power law ``d = scale * p**alpha`` on the mean per-id
probability ``p`` of its ids (``1/num_embeddings`` per feature; from training counts
per block): rarer ids get narrower rows. Widths are multiples of 4 (FBGEMM) in
``[4, dim]``, or ``dim`` itself; a per-table linear projection (counted in the bytes)
brings each narrower table back to ``dim``, and the blocks of a feature add up.

Any ``embedding.dim`` works: at ``dim: 10`` the widths are 4, 8 or 10, and a 10-wide table
(no projection) is held 12 wide in training and its lookups cut back
(``TableEmbeddingLayer.pad_for_fbgemm``, ``fbgemm_width``); the budget solver pays for that padding.

The plan's transform (``mixed_dim``) lists every table's id range, rows and seed; its
combiner (``project_sum``) names the projections, whose weights the model holds. A budget
covers the transform's lookup buffers too. numpy twin: ``recemb.serving.variants.mde``.

Example (YAML):
    embedding: {kind: mde, dim: 16, budget: 0.01, params: {alpha: 0.3, blocks: 4}}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recemb.embeddings.base import (
    BYTES_PER_FLOAT,
    FBGEMM_WIDTH,
    Combiner,
    IdTransform,
    by_key,
    jagged,
    key_weights,
    one_id_per_bag,
    register_combiner,
    register_transform,
)
from recemb.embeddings.budget import BudgetError, budget_bytes, largest_at_most
from recemb.embeddings.hashing import bucket_ids, hash_keys, salted_seed
from recemb.embeddings.plan import CombinerPlan, TransformPlan, VariantPlan
from recemb.embeddings.registry import VariantSpec, register_variant
from recemb.embeddings.robe import ordered_by
from recemb.errors import ConfigError

MIN_DIM = FBGEMM_WIDTH  # narrower widths are multiples of this, so only a full-width table ever pads


@dataclass
class MdeParams:
    """``alpha``: power-law exponent (0 = all widths equal; the paper uses 0.1-0.5);
    ``blocks``: frequency blocks per feature (needs training counts; 1 = one table per feature;
    a budget too small for the blocks' tables falls back to one table per feature)."""

    alpha: float = 0.3
    blocks: int = 1


@dataclass(frozen=True)
class MdeTable:
    """One physical table: ids ``[start, start + size)`` of feature ``feature``, ``rows`` x ``width``.

    ``rows < size`` means the ids are hashed into the rows (a budget below the
    narrowest layout's bytes).
    """

    feature: int
    block: int
    start: int
    size: int
    width: int
    rows: int
    seed: int

    @property
    def hashed(self) -> bool:
        """True when ids share rows through a hash."""
        return self.rows < self.size


def frequency_blocks(counts: np.ndarray | None, num_embeddings: int, blocks: int) -> list[tuple[int, int, float]]:
    """``(start, size, p)`` per block: ids split so each block holds an equal share of the counts.

    Ids are sorted by count (id 1 most frequent), so blocks are id ranges; the OOV
    id 0 goes with the head block. ``p`` is the block's mean per-id probability.
    Without counts (or with ``blocks == 1``) the feature is one block with ``p = 1/n``.

    Example:
        >>> frequency_blocks(np.array([0, 60, 20, 10, 5, 5]), 6, blocks=2)
        [(0, 2, 0.3), (2, 4, 0.1)]
    """
    total = 0 if counts is None else int(counts.sum())
    if blocks <= 1 or total == 0 or num_embeddings < 3:
        return [(0, num_embeddings, 1.0 / num_embeddings)]
    cum = np.cumsum(counts[1:]) / total
    # First id of block k: just past where the cumulative share reaches k / blocks.
    cuts = {1 + int(np.searchsorted(cum, k / blocks, side="left")) + 1 for k in range(1, blocks)}
    bounds = [0, *sorted(c for c in cuts if 1 < c < num_embeddings), num_embeddings]
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        out.append((lo, hi - lo, float(counts[lo:hi].sum()) / total / (hi - lo)))
    return out


def power_law_widths(probs: np.ndarray, alpha: float, scale: float, dim: int) -> np.ndarray:
    """``scale * p**alpha`` rounded to the nearest multiple of 4, clamped to ``[4, dim]`` (to ``dim``
    below 4): a width is a multiple of 4 or ``dim`` itself.

    Example:
        >>> power_law_widths(np.array([1.0, 0.1, 1e-6]), 0.3, 12.0, 10).tolist()
        [10, 8, 4]
    """
    raw = scale * np.power(probs, alpha)
    return np.clip(MIN_DIM * np.floor(raw / MIN_DIM + 0.5), min(MIN_DIM, dim), dim).astype(np.int64)


def mde_bytes(rows: np.ndarray, widths: np.ndarray, dim: int) -> int:
    """Table bytes plus the ``width x dim`` projections of the tables narrower than ``dim``.

    Tables count as training holds them: a width not divisible by 4 (``dim`` itself, at
    ``dim: 10``) counts ``fbgemm_width`` columns, so a budget pays for the padding. The
    projections are dense parameters and need none.

    Example:
        >>> mde_bytes(np.array([100, 1000]), np.array([10, 4]), dim=10)  # (100*12 + 1000*4 + 4*10) * 4
        20960
    """
    physical = -(-widths // FBGEMM_WIDTH) * FBGEMM_WIDTH  # fbgemm_width of each
    tables = int((rows * physical).sum())
    projections = int((widths * dim * (widths < dim)).sum())
    return (tables + projections) * BYTES_PER_FLOAT


def solve_mde(
    sizes: Sequence[int], probs: Sequence[float], dim: int, alpha: float, target: int | None
) -> tuple[np.ndarray, int | None]:
    """Widths per table and the row cap (``None``: no hashing) for ``target`` bytes.

    Without a target the most popular table gets ``dim`` (the reference code's
    ``d0`` rule). With one, the scale of the power law is chosen among the values
    where some width changes so that the bytes are the largest within ``target``.
    When even all-4 widths overflow (about 1/4 of full at dim 16), the widths stay
    at the ``d0`` rule and every table is capped at the largest common row count
    ``R`` that fits (tables larger than ``R`` hash their ids into ``R`` rows).
    Raises ``BudgetError`` when one row per table does not fit.

    Example:
        >>> widths, cap = solve_mde([10, 1000], [0.1, 0.001], dim=16, alpha=0.3, target=None)
        >>> widths.tolist(), cap
        ([16, 4], None)
    """
    n = np.asarray(sizes, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    q = np.power(p, alpha)
    d0_widths = power_law_widths(p, alpha, dim / q.max(), dim)
    if target is None:
        return d0_widths, None
    # Candidate scales: zero (all 4) and every point where some table's width rounds up.
    steps = np.arange(MIN_DIM, dim, MIN_DIM) + MIN_DIM / 2
    scales = np.concatenate([[0.0], (steps[None, :] / q[:, None]).ravel()])
    best: tuple[int, float] | None = None
    for scale in np.unique(scales):
        cost = mde_bytes(n, power_law_widths(p, alpha, scale, dim), dim)
        if cost <= target and (best is None or cost >= best[0]):
            best = (cost, float(scale))
    if best is not None:
        return power_law_widths(p, alpha, best[1], dim), None
    cap = largest_at_most(lambda r: mde_bytes(np.minimum(n, r), d0_widths, dim), target, 1, int(n.max()))
    if cap is None:
        smallest = mde_bytes(np.ones_like(n), d0_widths, dim)
        raise BudgetError(
            f"embedding.kind=mde: {len(n)} tables of one row plus their projections take {smallest:,} bytes, "
            f"over the budget of {target:,} bytes; raise embedding.budget or lower params.blocks"
        )
    return d0_widths, cap


def buffer_bytes(num_features: int, max_blocks: int, num_tables: int, hash_name: str = "splitmix64") -> int:
    """Bytes of the transform's buffers when it needs them (blocks or capped tables): the first
    id and table index of each (feature, block) and, per table, its start, rows, whether it hashes
    and its hash constants (one int for ``splitmix64``, two for ``mulshift``), all int64.

    Example:
        >>> buffer_bytes(26, 1, 26), buffer_bytes(26, 1, 26, "mulshift")
        (1248, 1456)
    """
    per_table = 5 if hash_name == "mulshift" else 4
    return 8 * (2 * num_features * max_blocks + per_table * num_tables)


def solve_mde_with_buffers(
    sizes: Sequence[int], probs: Sequence[float], dim: int, alpha: float, target: int | None,
    num_features: int, max_blocks: int, hash_name: str = "splitmix64",
) -> tuple[np.ndarray, int | None, int]:
    """``solve_mde`` with the transform's buffers inside ``target``: widths, row cap and the
    buffer bytes reserved (0 when the layout needs no buffers: one block per feature, no cap).

    Achieved bytes count every buffer, so a layout that needs them is solved for the target
    less their bytes.
    """
    reserve = buffer_bytes(num_features, max_blocks, len(sizes), hash_name)
    if target is None:
        widths, cap = solve_mde(sizes, probs, dim, alpha, None)
        return widths, cap, 0
    if max_blocks == 1:
        try:
            widths, cap = solve_mde(sizes, probs, dim, alpha, target)
            if cap is None:
                return widths, cap, 0
        except BudgetError:
            pass
    widths, cap = solve_mde(sizes, probs, dim, alpha, target - reserve)
    return widths, cap, reserve


@register_transform("mixed_dim")
class MdeTransform(IdTransform):
    """Logical id -> (table of its frequency block, row): ``id - start``, or its hash when the table is capped.

    Output keys are one per table (``{feature}__m{block}``); each sample's ids go to the key
    of their block (so a key's bag may be empty). A capped table's row is
    ``bucket_ids_np(id - start, seed, rows, hash)`` with ``seed = salted_seed(spec_seed, f, block)``.

    Plan params: ``tables: [{key, feature, block, start, size, rows, hashed, seed}]``,
    feature-major, and ``hash`` (``idhash.HASHES``; absent in plans written before it:
    ``splitmix64``). With blocks or capped tables the lookup constants are non-persistent
    buffers made from the plan and refilled by ``reset_buffers`` (a meta-device build gets
    them back as zeros); one uncapped table per feature needs none.
    """

    def __init__(self, features: list[str], tables: list[dict[str, Any]], device: torch.device | None = None,
                 hash_name: str = "splitmix64") -> None:
        super().__init__()
        self.features = list(features)
        self.hash_name = hash_name
        self.keys = [t["key"] for t in tables]
        self.max_blocks = max(t["block"] for t in tables) + 1
        self._plain = self.max_blocks == 1 and not any(t["hashed"] for t in tables)
        self._sources: dict[str, np.ndarray] = {}
        if not self._plain:
            fidx = {f: i for i, f in enumerate(self.features)}
            starts = np.full((len(self.features), self.max_blocks), np.iinfo(np.int64).max, dtype=np.int64)
            index = np.zeros((len(self.features), self.max_blocks), dtype=np.int64)
            for i, t in enumerate(tables):
                starts[fidx[t["feature"]], t["block"]] = t["start"]
                index[fidx[t["feature"]], t["block"]] = i
            constants = hash_keys([t["seed"] for t in tables], hash_name).view(len(tables), -1).numpy()
            per_table = np.concatenate([np.array([[t["start"], t["rows"], int(t["hashed"])] for t in tables],
                                                 dtype=np.int64), constants], axis=1)
            self._sources = {"starts": starts, "index": index, "per_table": per_table}
        for name, source in self._sources.items():
            self.register_buffer(name, torch.empty(source.shape, dtype=torch.int64, device=device), persistent=False)
        if device is None or device.type != "meta":
            self.reset_buffers()
        self._hashed = any(t["hashed"] for t in tables)
        self._sort_dtype = next(d for d in (torch.uint8, torch.int16, torch.int32, torch.int64)
                                if len(tables) - 1 <= torch.iinfo(d).max)

    @classmethod
    def from_plan(cls, plan: VariantPlan, device: torch.device | None = None) -> MdeTransform:
        p = plan.transform.params
        return cls(plan.features, p["tables"], device, p.get("hash", "splitmix64"))

    def reset_buffers(self) -> None:
        """Refill the buffers from the plan's data (after a meta-device build)."""
        for name, source in self._sources.items():
            buffer = getattr(self, name)
            if buffer.device.type != "meta":
                buffer.copy_(torch.from_numpy(source))

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """One pass over all ids (``route``), each (table, sample) bag's count, then one stable sort
        by table (on the smallest integer type that holds the table count: a radix sort).

        When every bag holds one id (single-hot batches) each id's bag is its table's row plus its
        column of the ``[features, batch]`` grid, and the counts are ones written at the bags (no
        count over all ``tables x batch`` bags); otherwise the bags are counted.
        """
        kjt = ordered_by(kjt, self.features)
        values, lengths, per_key = kjt.values().to(torch.int64), kjt.lengths(), kjt.length_per_key()
        batch = kjt.stride()
        if self._plain:
            return jagged(self.keys, values, lengths, batch, per_key)
        device, n, features = values.device, values.numel(), len(self.features)
        single = one_id_per_bag(lengths, n)
        table, local = self.route(values, lengths, per_key, batch, single)
        bags = len(self.keys) * batch
        if single:
            bag = (table.view(features, batch) * batch).add_(torch.arange(batch, device=device)).view(-1)
            out_lengths = torch.zeros(bags, dtype=lengths.dtype, device=device).index_fill_(0, bag, 1)
        else:
            sample = torch.arange(batch, device=device).repeat(len(per_key)).repeat_interleave(lengths, output_size=n)
            out_lengths = torch.bincount(sample.add_(table * batch), minlength=bags).to(lengths.dtype)
        if self.max_blocks > 1:
            # Values are ordered (feature, sample); the KJT wants (table, sample).
            order = torch.sort(table.to(self._sort_dtype), stable=True).indices
            local = local.index_select(0, order)
        out_per_key = torch.bincount(table, minlength=len(self.keys)).tolist()
        return jagged(self.keys, local, out_lengths, batch, out_per_key)

    def route(self, values: torch.Tensor, lengths: torch.Tensor, per_key: list[int], batch: int,
              single: bool, first_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each id's table (index into ``keys``) and row in it, in the KJT's (feature, sample) order,
        for int64 ``values`` ordered by ``features``; ``single``: every bag holds one id. With
        ``first_rows`` (one per table) each row is offset by its table's: a row of the tables
        stacked in table order.

        Single-hot, the ids lie in a ``[features, batch]`` grid and an id's block is a comparison
        per block boundary against its row's starts; otherwise the starts are searched per id.
        Under ``mulshift`` every id then takes the same five passes (``_slot_constants``: an
        unhashed table's constants make the hash return ``id - start``) instead of hashing all
        ids and choosing per id.
        """
        device, features = values.device, len(self.features)
        if self._plain:
            table = by_key(torch.arange(features, device=device), per_key, device)
            return table, values if first_rows is None else values + first_rows.index_select(0, table)
        first_slot = torch.arange(features, device=device).mul_(self.max_blocks)
        if single:
            grid = values.view(features, batch)
            slot = first_slot.view(-1, 1).expand(-1, batch).contiguous()
            for b in range(1, self.max_blocks):
                slot += grid >= self.starts[:, b:b + 1]
            slot = slot.view(-1)
        else:
            feature = by_key(torch.arange(features, device=device), per_key, device)
            slot = torch.searchsorted(self.starts.index_select(0, feature), values.view(-1, 1), right=True).view(-1)
            slot.sub_(1).add_(first_slot.index_select(0, feature))
        if self._hashed and self.hash_name == "mulshift":
            constants = self._slot_constants()
            if first_rows is not None:
                constants = torch.cat([constants, first_rows.index_select(0, constants[:, 0]).view(-1, 1)], 1)
            c = constants.index_select(0, slot)
            rows = (values - c[:, 1]).mul_(c[:, 2]).add_(c[:, 3])
            rows.bitwise_right_shift_(32).bitwise_and_(0xFFFFFFFF).mul_(c[:, 4]).bitwise_right_shift_(c[:, 5])
            if first_rows is not None:  # the stacked lookup, which needs no tables
                return c[:, 0], rows.add_(c[:, 6])
            return c[:, 0].contiguous(), rows
        table = self.index.view(-1).index_select(0, slot)
        start, rows, hashed = self.per_table[:, :3].unbind(1)
        local = values - start.index_select(0, table)
        if self._hashed:
            keys = self.per_table[:, 3:].index_select(0, table)
            h = bucket_ids(local, keys.view(-1), rows.index_select(0, table), self.hash_name)
            local = torch.where(hashed.bool().index_select(0, table), h, local)
        return table, local if first_rows is None else local.add_(first_rows.index_select(0, table))

    def _slot_constants(self) -> torch.Tensor:
        """Per (feature, block) slot: its table, start, and the ``mulshift`` multiplier, addend, row
        count and final shift that give its row, ``[features * max_blocks, 6]``. A capped table's
        are its hash's (shift 32: ``mulshift_buckets_``); an uncapped table's are ``2**32``, 0, 1
        and 0, so ``((x * 2**32) >> 32) * 1 >> 0`` is ``x = id - start`` (ids are below ``2**31``).
        Built per call from the buffers (a few ops on ~100 numbers), so nothing goes stale."""
        index = self.index.view(-1)
        per = self.per_table.index_select(0, index)
        hashed = per[:, 2].bool()
        return torch.stack([
            index, per[:, 0],
            torch.where(hashed, per[:, 3], 1 << 32), torch.where(hashed, per[:, 4], 0),
            torch.where(hashed, per[:, 1], 1), hashed.to(torch.int64) * 32,
        ], 1)


@register_combiner("project_sum")
class ProjectSum(Combiner):
    """Projects each table's pooled block to ``dim`` (identity at full width) and adds a feature's blocks.

    Plan params: ``dim`` and ``inputs: [{key, feature, width, proj}]`` in table order, where
    ``proj`` is the name of the ``width x dim`` projection (``proj.p{i}``; null at full width).
    ``CombinerPlan.dense`` lists their weights (``proj.p{i}.weight``: ``[dim, width]``, no bias).
    """

    def __init__(self, features: list[str], inputs: list[dict[str, Any]], dim: int,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.features = list(features)
        owner = {f: i for i, f in enumerate(self.features)}
        self.parts = [(t["key"], owner[t["feature"]], t["proj"]) for t in inputs]
        self.dim = dim
        self.proj = nn.ModuleDict({
            t["proj"]: nn.Linear(t["width"], dim, bias=False, device=device) for t in inputs if t["proj"]
        })
        # Per feature: its tables' (key, projection name or None), in table order.
        self._groups: list[list[tuple[str, str | None]]] = [[] for _ in self.features]
        for key, i, proj in self.parts:
            self._groups[i].append((key, proj))

    @classmethod
    def from_plan(cls, plan: VariantPlan, device: torch.device | None = None) -> ProjectSum:
        p = plan.combiner.params
        return cls(plan.features, p["inputs"], p["dim"], device)

    def lookup_logical(self, transform: IdTransform, ebc: EmbeddingBagCollection,
                       kjt: KeyedJaggedTensor) -> KeyedTensor | None:
        """Single-hot batches without autograd, straight from the logical ids (each id's table and
        row: ``MdeTransform.route``), one of two ways:

        - small tables (fewer rows in all than ids in the batch, as under a tight budget): every
          table projected whole into one stacked ``[rows, dim]`` buffer, then one gather of every
          id's row of it, in output order;
        - otherwise the ids sorted by table (one radix sort; none with one table per feature),
          each table's rows gathered and projected into their run of an ``[ids, dim]`` buffer,
          and one gather puts them in output order.

        The transform's path gives every table a bag per sample, most of them empty with blocks
        (4 blocks: 4x the bags, pooled to zeros and projected); this touches each id once.
        The same sums as that path (a bag of one id pools to its row; a feature's other blocks
        add zeros), up to BLAS rounding: a projection over another number of rows may take another
        MKL kernel (a last-bit difference). None (the transform's path) for multi-hot batches or
        other transforms.

        Example:
            >>> with torch.no_grad():                                               # doctest: +SKIP
            ...     out = layer(kjt)  # TableEmbeddingLayer calls this first
        """
        if torch.is_grad_enabled() or not isinstance(transform, MdeTransform) or not all(self._groups):
            return None
        kjt = ordered_by(kjt, transform.features)
        values, lengths = kjt.values().to(torch.int64), kjt.lengths()
        weights = key_weights(ebc, transform.keys)
        if weights is None or not one_id_per_bag(lengths, values.numel()):
            return None
        batch, features = kjt.stride(), len(transform.features)
        starts = [0]
        for w in weights:
            starts.append(starts[-1] + w.shape[0])
        stacked = starts[-1] <= values.numel()
        first_rows = torch.tensor(starts[:-1], device=values.device) if stacked else None
        table, index = transform.route(values, lengths, kjt.length_per_key(), batch, single=True, first_rows=first_rows)
        projections = [None if proj is None else self.proj[proj].weight.t() for _key, _owner, proj in self.parts]
        if stacked:
            buf = self._stacked(weights, projections, starts)
        else:
            buf, index = self._sorted(weights, projections, table, index, transform._sort_dtype)
        # index is in (feature, sample) order; the output wants (sample, feature)
        out = buf.index_select(0, index.view(features, batch).t().reshape(-1)).view(batch, features * self.dim)
        return KeyedTensor(keys=list(self.features), length_per_key=[self.dim] * features, values=out)

    def _stacked(self, weights: list[torch.Tensor], projections: list[torch.Tensor | None],
                 starts: list[int]) -> torch.Tensor:
        """Every table projected whole into its rows (``starts``) of one ``[rows, dim]`` buffer."""
        buf = weights[0].new_empty(starts[-1], self.dim)
        for weight, proj, lo, hi in zip(weights, projections, starts[:-1], starts[1:], strict=True):
            if proj is None:
                buf[lo:hi].copy_(weight)
            else:
                torch.mm(weight, proj, out=buf[lo:hi])
        return buf

    def _sorted(self, weights: list[torch.Tensor], projections: list[torch.Tensor | None], table: torch.Tensor,
                local: torch.Tensor, sort_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The ids' rows gathered and projected table by table into runs of one buffer (ids sorted by
        table); where each id's row went."""
        order = None
        if len(weights) > len(self.features):  # blocks; with one table per feature the ids are in table order
            order = torch.sort(table.to(sort_dtype), stable=True).indices
            local = local.index_select(0, order)
        counts = torch.bincount(table, minlength=len(weights)).tolist()
        buf = weights[0].new_empty(local.numel(), self.dim)
        pos = 0
        for weight, proj, count in zip(weights, projections, counts, strict=True):
            if count:
                rows, dest = local[pos:pos + count], buf[pos:pos + count]
                if proj is None:
                    torch.index_select(weight, 0, rows, out=dest)
                else:
                    torch.mm(weight.index_select(0, rows), proj, out=dest)
                pos += count
        n = local.numel()
        if order is None:
            return buf, torch.arange(n, device=local.device)
        return buf, torch.empty_like(order).scatter_(0, order, torch.arange(n, device=order.device))

    def forward(self, pooled: KeyedTensor) -> KeyedTensor:
        return self.combine(pooled.keys(), list(pooled.values().split(pooled.length_per_key(), dim=1)))

    def combine(self, keys: list[str], blocks: list[torch.Tensor]) -> KeyedTensor:
        """Projections and sums straight from the pooled blocks, each projection's sum folded into
        its matmul (``addmm``: ``y + x @ W.T`` in one BLAS call instead of a matmul and an addition).

        Without autograd every feature's sum is built in place in its columns of the output
        (no side-by-side copy of the features after); with it, out of place, then laid side by side.
        A projection's input is made contiguous first: blocks cut from one pooled tensor (a padded or
        sharded collection's output) are column views, and BLAS sums a strided input in another
        order, so the same rows would project to values a bit apart from the direct lookup's.
        """
        parts = dict(zip(keys, blocks, strict=True))
        if torch.is_grad_enabled():  # autograd takes no out= arguments
            vecs: list[torch.Tensor] = []
            for group in self._groups:
                vec: torch.Tensor | None = None
                for key, proj in group:
                    x = parts[key]
                    if proj is None:
                        vec = x if vec is None else vec + x
                    else:
                        x = x.contiguous()
                        w = self.proj[proj].weight
                        vec = F.linear(x, w) if vec is None else torch.addmm(vec, x, w.t())
                if vec is not None:
                    vecs.append(vec)
            return KeyedTensor.from_tensor_list(self.features, vecs)
        present = [i for i, group in enumerate(self._groups) if group]
        out = blocks[0].new_empty(blocks[0].shape[0], self.dim * len(present))
        for col, i in enumerate(present):
            vec = out[:, col * self.dim:(col + 1) * self.dim]
            for j, (key, proj) in enumerate(self._groups[i]):
                x = parts[key]
                if proj is None:
                    vec.add_(x) if j else vec.copy_(x)
                    continue
                x = x.contiguous()
                if j:
                    vec.addmm_(x, self.proj[proj].weight.t())
                else:
                    torch.mm(x, self.proj[proj].weight.t(), out=vec)
        return KeyedTensor(keys=[self.features[i] for i in present], length_per_key=[self.dim] * len(present),
                           values=out)


@register_variant("mde", MdeParams)
def plan_mde(spec: VariantSpec) -> VariantPlan:
    """Per-feature (or per-frequency-block) tables of power-law widths, projected to ``spec.dim``."""
    params: MdeParams = spec.params
    if not 0 <= params.alpha < float("inf") or params.blocks < 1:
        raise ConfigError(
            f"embedding.params: alpha={params.alpha} must be >= 0 and blocks={params.blocks} >= 1"
        )
    names, vocab = spec.names, spec.vocab
    target = None
    if spec.budget is not None:
        target = budget_bytes(spec.budget, sum(vocab.values()) * spec.dim * BYTES_PER_FLOAT)
    # Blocks multiply the tables (and their minimum bytes): a budget too small for them gets one per feature.
    for n_blocks in dict.fromkeys((params.blocks, 1)):
        layout: list[tuple[int, int, int, int, float]] = []  # feature, block, start, size, p
        for fi, f in enumerate(names):
            counts = spec.id_counts(f) if n_blocks > 1 else None
            for b, (start, size, p) in enumerate(frequency_blocks(counts, vocab[f], n_blocks)):
                layout.append((fi, b, start, size, p))
        max_blocks = max(b for _, b, *_ in layout) + 1
        try:
            widths, cap, reserved = solve_mde_with_buffers(
                [s for _, _, _, s, _ in layout], [p for *_, p in layout], spec.dim, params.alpha, target,
                len(names), max_blocks, spec.hash_name,
            )
            break
        except BudgetError:
            if n_blocks == 1:
                raise
    tables = [
        MdeTable(feature=fi, block=b, start=start, size=size, width=int(w),
                 rows=size if cap is None else min(size, cap), seed=salted_seed(spec.seed, fi, b))
        for (fi, b, start, size, _), w in zip(layout, widths, strict=True)
    ]
    keys = [f"{names[t.feature]}__m{t.block}" for t in tables]
    transform = [
        {"key": k, "feature": names[t.feature], "block": t.block, "start": t.start, "size": t.size,
         "rows": t.rows, "hashed": t.hashed, "seed": t.seed}
        for k, t in zip(keys, tables, strict=True)
    ]
    inputs = [
        {"key": k, "feature": names[t.feature], "width": t.width, "proj": f"p{i}" if t.width != spec.dim else None}
        for i, (k, t) in enumerate(zip(keys, tables, strict=True))
    ]
    return spec.plan(
        "mde",
        [spec.table(f"mde_{names[t.feature]}_{t.block}", t.rows, t.width, [k]) for k, t in zip(keys, tables, strict=True)],
        transform=TransformPlan("mixed_dim", {"tables": transform, "hash": spec.hash_name}),
        combiner=CombinerPlan("project_sum", {"dim": spec.dim, "inputs": inputs},
                              dense=[f"proj.{t['proj']}.weight" for t in inputs if t["proj"]]),
        budget={"solver": "solve_mde", "budget": spec.budget, "target_bytes": target, "buffer_bytes": reserved,
                "alpha": params.alpha, "blocks": params.blocks, "blocks_used": max_blocks, "row_cap": cap},
    )
