"""The ``qr`` variant: compositional quotient-remainder embeddings (Shi et al., KDD 2020).

Id ``x`` of a feature with modulus ``m`` reads row ``x // m`` of a quotient table
(``ceil(V/m)`` rows) and row ``x % m`` of a remainder table (``m`` rows); the two
vectors combine by ``mult`` (element-wise product), ``add`` or ``concat`` (each
part half the width). Every id gets a unique pair of rows, so unlike hashing no
two ids share their whole embedding. Features small enough to fit keep a plain
table. A ``budget`` solves one row cap ``R`` over all features and, per
feature, the modulus whose two tables together come closest to ``R`` rows;
below QR's minimum of about ``2 sqrt(V)`` rows the ids are hashed first.

Any ``embedding.dim`` works with ``mult`` and ``add``: at ``dim: 10`` the tables are held
12 wide in training (``TableEmbeddingLayer.pad_for_fbgemm``) and the budget pays for that
padding (rows cost ``padded_row_bytes``; the achieved-bytes check counts the padded tables).
``concat`` needs a dim divisible by 8, so its halves never pad.

Example (YAML):
    embedding: {kind: qr, dim: 16, budget: 0.01, params: {op: mult}}
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recemb.embeddings.base import (
    Combiner,
    IdTransform,
    by_key,
    fbgemm_width,
    jagged,
    key_weights,
    one_id_per_bag,
    register_combiner,
    register_transform,
)
from recemb.embeddings.budget import (
    BudgetError,
    budget_bytes,
    check_achieved,
    full_bytes,
    largest_at_most,
    padded_row_bytes,
    water_fill,
)
from recemb.embeddings.hashing import hash_keys, hash_segments, salted_seed
from recemb.embeddings.plan import CombinerPlan, TablePlan, TransformPlan, VariantPlan
from recemb.embeddings.registry import VariantSpec, register_variant
from recemb.embeddings.robe import ordered_by
from recemb.errors import ConfigError

QrOp = Literal["mult", "add", "concat"]


@dataclass
class QrParams:
    """``op``: how the parts combine; ``modulus``: remainder rows when no budget is given (0 = sqrt(V))."""

    op: QrOp = "mult"
    modulus: int = 0


def qr_modulus(vocab: int, cap: int) -> int:
    """Modulus ``m`` for ``vocab`` ids under a cap of ``cap`` rows (0 = keep a full table).

    The largest ``m`` with ``m + ceil(vocab / m) <= cap`` (fewest quotient
    collisions), or the minimum-rows modulus ``ceil(sqrt(vocab))`` when no ``m`` fits.

    Example:
        >>> qr_modulus(10_000, 10_000), qr_modulus(10_000, 250), qr_modulus(10_000, 50)
        (0, 200, 100)
    """
    if vocab <= cap:
        return 0
    m_min = math.isqrt(vocab - 1) + 1
    if m_min + -(-vocab // m_min) > cap:
        return m_min
    # m + ceil(V/m) increases for m >= sqrt(V): binary search the largest m that fits.
    return largest_at_most(lambda m: m + -(-vocab // m), cap, m_min, cap) or m_min


@dataclass(frozen=True)
class QrLayout:
    """One feature's layout: ``buckets`` > 0 hashes ids first (into that many), ``modulus`` 0 = full table."""

    vocab: int
    buckets: int
    modulus: int

    @property
    def ids(self) -> int:
        """Size of the id range the quotient/remainder split sees."""
        return self.buckets or self.vocab

    @property
    def rows(self) -> int:
        """Rows of the feature's tables together."""
        return self.vocab if self.modulus == 0 else self.modulus + -(-self.ids // self.modulus)


def qr_layout(vocab: int, cap: int, full_cost: int = 1) -> QrLayout:
    """The layout of ``vocab`` ids under ``cap`` rows.

    A full table when it fits; QR when its minimum, about ``2 sqrt(vocab)`` rows,
    fits; below that the ids are first hashed into the largest range whose QR
    fits (hashing + QR, as the QR paper combines them for tight budgets).
    ``full_cost``: what a full-table row costs in part rows (2 for ``concat``,
    whose parts are half as wide as the full table).

    Example:
        >>> qr_layout(10_000, 250).rows, qr_layout(10_000, 20)
        (250, QrLayout(vocab=10000, buckets=100, modulus=10))
    """
    cap = max(cap, 2)
    if vocab * full_cost <= cap:
        return QrLayout(vocab, 0, 0)
    modulus = qr_modulus(vocab, cap) or math.isqrt(vocab - 1) + 1
    if modulus + -(-vocab // modulus) <= cap:
        return QrLayout(vocab, 0, modulus)
    # m + ceil(H/m) == cap exactly with m = cap // 2 and H = m * (cap - m), the largest such H.
    modulus = cap // 2
    return QrLayout(vocab, modulus * (cap - modulus), modulus)


def solve_qr(vocab: dict[str, int], row_budget: int, full_cost: int = 1) -> dict[str, QrLayout]:
    """Layout per feature for at most ``row_budget`` rows in total (2 rows per feature at the least).

    Rows are shared out by water-filling (small features keep full tables),
    then each feature takes the QR layout of its share.

    Example:
        >>> {f: (l.buckets, l.modulus) for f, l in solve_qr({"a": 10, "b": 10_000}, row_budget=310).items()}
        {'a': (0, 0), 'b': (0, 261)}
    """
    if row_budget < 2 * len(vocab):
        raise BudgetError(f"qr needs at least 2 rows per feature ({2 * len(vocab)}), the budget gives {row_budget}")
    shares = water_fill([v * full_cost for v in vocab.values()], row_budget)
    return {f: qr_layout(v, r, full_cost) for (f, v), r in zip(vocab.items(), shares, strict=True)}


@register_transform("qr")
class QrTransform(IdTransform):
    """Feature ``f`` -> keys ``f__q`` (``x // m``) and ``f__r`` (``x % m``), after an optional seeded hash;
    full-table features pass through.

    Plan params: ``features: {f: {modulus, buckets, seed}}`` (``modulus`` 0 = full table, ``buckets`` 0 =
    no hash first) and ``hash`` (``idhash.HASHES``; absent in plans written before it: ``splitmix64``);
    twin: ``recemb.serving.variants.qr``.
    """

    def __init__(self, features: dict[str, dict[str, int]], hash_name: str = "splitmix64") -> None:
        super().__init__()
        self.spec = {f: dict(v) for f, v in features.items()}
        self.hash_name = hash_name
        self._layouts: dict[tuple[str, ...], _QrLayout] = {}

    @classmethod
    def from_plan(cls, plan: VariantPlan, device: torch.device | None = None) -> QrTransform:
        return cls(plan.transform.params["features"], plan.transform.params.get("hash", "splitmix64"))

    def _layout(self, keys: list[str]) -> _QrLayout:
        """The per-key constants and output keys for an input key order (cached per order)."""
        found = self._layouts.get(tuple(keys))
        if found is None:
            spec = [self.spec[k] for k in keys]
            out_keys, planes = [], []
            for i, (f, s) in enumerate(zip(keys, spec, strict=True)):
                if s["modulus"]:
                    out_keys += [f"{f}__q", f"{f}__r"]
                    planes += [(1, i), (2, i)]
                else:
                    out_keys.append(f)
                    planes.append((0, i))
            found = _QrLayout(
                out_keys=out_keys, planes=planes,
                salts=hash_keys([s["seed"] if s["buckets"] else None for s in spec], self.hash_name),
                buckets=torch.tensor([s["buckets"] or 1 for s in spec], dtype=torch.int64),
                unhashed=[i for i, s in enumerate(spec) if not s["buckets"]],
                moduli=torch.tensor([s["modulus"] or 1 for s in spec], dtype=torch.int64),
            )
            self._layouts[tuple(keys)] = found
        return found

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """One pass over all ids: the optional hash (``hash_segments``), then quotient and remainder
        by each id's modulus (gathered by segment); the output keys are slices of the three."""
        lay = self._layout(kjt.keys())
        values, per_key, starts = kjt.values(), kjt.length_per_key(), kjt.offset_per_key()
        if len(lay.unhashed) < len(per_key):
            values = hash_segments(values, lay.salts, lay.buckets, per_key, keep=lay.unhashed, hash_name=self.hash_name)
        width = per_key[0] if per_key and all(n == per_key[0] for n in per_key) else None
        if width:
            return self._grid(kjt, lay, values.view(len(per_key), width))
        moduli = by_key(lay.moduli, per_key, values.device)
        quotient = torch.div(values, moduli, rounding_mode="floor")
        remainder = values - quotient * moduli
        planes = (values, quotient, remainder)
        out = torch.cat([planes[p][starts[i]:starts[i + 1]] for p, i in lay.planes])
        index = torch.tensor([i for _, i in lay.planes], device=values.device)
        lengths = kjt.lengths().view(len(per_key), -1).index_select(0, index).reshape(-1)
        return jagged(lay.out_keys, out, lengths, kjt.stride(), [per_key[i] for _, i in lay.planes])


    def _grid(self, kjt: KeyedJaggedTensor, lay: _QrLayout, grid: torch.Tensor) -> KeyedJaggedTensor:
        """``forward`` when every key has as many ids (single-hot batches): the ids (hashed where the
        plan says), their quotients and remainders as three planes of one ``[3, keys, ids]`` tensor,
        each modulus broadcast along its key's row, and the output keys one gather of its rows."""
        keys, width = grid.shape
        device = grid.device
        planes = torch.empty(3, keys, width, dtype=torch.int64, device=device)
        planes[0] = grid
        moduli = lay.moduli.to(device).view(-1, 1)
        torch.div(grid, moduli, rounding_mode="floor", out=planes[1])
        torch.mul(planes[1], moduli, out=planes[2])
        planes[2].neg_().add_(grid)
        index = torch.tensor([p * keys + i for p, i in lay.planes], device=device)
        out = planes.view(3 * keys, width).index_select(0, index).view(-1)
        rows = index.remainder(keys)
        lengths = kjt.lengths().view(keys, -1).index_select(0, rows).reshape(-1)
        return jagged(lay.out_keys, out, lengths, kjt.stride(), [width] * len(lay.planes))


@dataclass(frozen=True)
class _QrLayout:
    """``QrTransform``'s constants for one input key order: output keys, the (plane, input key) each
    output reads (plane 0 the ids, 1 the quotient, 2 the remainder), per-key hash constants (``hash_keys``), buckets
    (1 where no hash), moduli (1 for full tables) and the keys not hashed."""

    out_keys: list[str]
    planes: list[tuple[int, int]]
    salts: torch.Tensor
    buckets: torch.Tensor
    unhashed: list[int]
    moduli: torch.Tensor


@register_combiner("qr")
class QrCombiner(Combiner):
    """``q op r`` per compressed feature; other features pass through.

    Plan params: ``op`` and ``split`` (the features read as quotient and remainder parts).
    """

    gathers = True  # single-hot batches' rows are gathered, not pooled (``Combiner.lookup``)

    def __init__(self, features: list[str], split: list[str], op: QrOp) -> None:
        super().__init__()
        self.features = list(features)
        self.split = set(split)
        self.op = op

    @classmethod
    def from_plan(cls, plan: VariantPlan, device: torch.device | None = None) -> QrCombiner:
        return cls(plan.features, plan.combiner.params["split"], plan.combiner.params["op"])

    def forward(self, pooled: KeyedTensor) -> KeyedTensor:
        return self.combine(pooled.keys(), list(pooled.values().split(pooled.length_per_key(), dim=1)))

    def lookup_logical(self, transform: IdTransform, ebc: EmbeddingBagCollection,
                       kjt: KeyedJaggedTensor) -> KeyedTensor | None:
        """Without autograd, for single-hot batches, straight from the logical ids: the optional hash
        and the quotients and remainders on the ``[features, batch]`` grid, then per feature its
        rows gathered into its output columns (the quotient's; for ``mult``/``add`` the remainder's
        rows multiplied or added in place), or, for ``mult``/``add`` with fewer table rows in all
        than ids in the batch, two gathers from stacked tables (``_stacked``). None (the
        transform's path) for multi-hot or weighted batches and other transforms.

        Bit for bit the transform -> collection -> ``combine`` path (the same rows, one product or
        sum each); it builds no physical KJT (three planes of ids, a gather of them, the lengths of
        every quotient and remainder key) and writes no intermediate ``[batch, dim]`` blocks.

        Example:
            >>> with torch.no_grad():                                               # doctest: +SKIP
            ...     out = layer(kjt)  # TableEmbeddingLayer calls this first
        """
        if torch.is_grad_enabled() or not isinstance(transform, QrTransform) or kjt.weights_or_none() is not None:
            return None
        kjt = ordered_by(kjt, self.features)
        values = kjt.values().to(torch.int64)
        if not one_id_per_bag(kjt.lengths(), values.numel()):
            return None
        lay = transform._layout(self.features)
        weights = key_weights(ebc, lay.out_keys)
        if weights is None:
            return None
        features, batch = len(self.features), kjt.stride()
        if len(lay.unhashed) < features:
            values = hash_segments(values, lay.salts, lay.buckets, [batch] * features, keep=lay.unhashed,
                                   hash_name=transform.hash_name)
        grid = values.view(features, batch)
        if (self.op != "concat" and len({w.shape[1] for w in weights}) == 1
                and sum(w.shape[0] for w in weights) <= values.numel()):
            return self._stacked(lay, weights, grid)
        moduli = lay.moduli.to(grid.device).view(-1, 1)
        quotient = torch.div(grid, moduli, rounding_mode="floor")
        remainder = grid - quotient * moduli
        source = {f"{f}__q": quotient[i] for i, f in enumerate(self.features) if f in self.split}
        source |= {f"{f}__r": remainder[i] for i, f in enumerate(self.features) if f in self.split}
        source |= {f: grid[i] for i, f in enumerate(self.features) if f not in self.split}
        table = dict(zip(lay.out_keys, weights, strict=True))
        widths = [table[f].shape[1] if f not in self.split else
                  table[f"{f}__q"].shape[1] * (2 if self.op == "concat" else 1) for f in self.features]
        out = weights[0].new_empty(batch, sum(widths))
        col = 0
        for f, width in zip(self.features, widths, strict=True):
            dest = out[:, col:col + width]
            col += width
            if f not in self.split:
                torch.index_select(table[f], 0, source[f], out=dest)
                continue
            q, r = f"{f}__q", f"{f}__r"
            if self.op == "concat":
                torch.index_select(table[q], 0, source[q], out=dest[:, :width // 2])
                torch.index_select(table[r], 0, source[r], out=dest[:, width // 2:])
            else:
                torch.index_select(table[q], 0, source[q], out=dest)
                (dest.mul_ if self.op == "mult" else dest.add_)(table[r].index_select(0, source[r]))
        return KeyedTensor(keys=list(self.features), length_per_key=widths, values=out)

    def _stacked(self, lay: _QrLayout, weights: list[torch.Tensor], grid: torch.Tensor) -> KeyedTensor:
        """``lookup_logical`` for ``mult``/``add`` when the tables have fewer rows in all than the batch
        has ids (QR's tables are small): each feature's first table (its full table or quotient
        table) stacked into one, its remainder tables into another after one neutral row (ones for
        ``mult``, zeros for ``add``), then two gathers in (sample, feature) order and one product or
        sum over the whole output. A full-table feature has modulus 1, so its quotient is its id
        and its remainder 0: the neutral row (``x * 1`` and ``x + 0`` are ``x``)."""
        first, second = [], [weights[0].new_full((1, weights[0].shape[1]), 1.0 if self.op == "mult" else 0.0)]
        first_at, second_at = [], []  # per feature: its first row in each stack
        rows_first, rows_second = 0, 1
        for (plane, _), weight in zip(lay.planes, weights, strict=True):
            if plane == 2:  # the remainder table of the feature just seen (its quotient table came first)
                second_at[-1] = rows_second
                second.append(weight)
                rows_second += weight.shape[0]
            else:
                first_at.append(rows_first)
                second_at.append(0)
                first.append(weight)
                rows_first += weight.shape[0]
        ids = grid.t().contiguous()  # (sample, feature): the output's order
        moduli = lay.moduli.to(ids.device)
        quotient = torch.div(ids, moduli, rounding_mode="floor")
        remainder = ids - quotient * moduli
        quotient += torch.tensor(first_at, device=ids.device)
        remainder += torch.tensor(second_at, device=ids.device)
        out = torch.cat(first).index_select(0, quotient.view(-1))
        parts = torch.cat(second).index_select(0, remainder.view(-1))
        out.mul_(parts) if self.op == "mult" else out.add_(parts)
        batch, dim = ids.shape[0], out.shape[1]
        return KeyedTensor(keys=list(self.features), length_per_key=[dim] * len(self.features),
                           values=out.view(batch, -1))

    def combine(self, keys: list[str], blocks: list[torch.Tensor]) -> KeyedTensor:
        """``q op r`` straight from the pooled blocks into the output's columns (no side-by-side copy
        of all the parts first)."""
        parts = dict(zip(keys, blocks, strict=True))
        widths = [parts[f].shape[1] if f not in self.split else
                  parts[f"{f}__q"].shape[1] * (2 if self.op == "concat" else 1) for f in self.features]
        if torch.is_grad_enabled():  # autograd takes no out= arguments
            return KeyedTensor(keys=self.features, length_per_key=widths, values=torch.cat([
                parts[f] if f not in self.split else self._pair(parts[f"{f}__q"], parts[f"{f}__r"])
                for f in self.features], 1))
        out = blocks[0].new_empty(blocks[0].shape[0], sum(widths))
        col = 0
        for f, width in zip(self.features, widths, strict=True):
            dest = out[:, col:col + width]
            col += width
            if f not in self.split:
                dest.copy_(parts[f])
                continue
            q, r = parts[f"{f}__q"], parts[f"{f}__r"]
            if self.op == "concat":
                dest[:, :width // 2].copy_(q)
                dest[:, width // 2:].copy_(r)
            else:
                (torch.mul if self.op == "mult" else torch.add)(q, r, out=dest)
        return KeyedTensor(keys=self.features, length_per_key=widths, values=out)

    def _pair(self, q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return q * r if self.op == "mult" else q + r if self.op == "add" else torch.cat([q, r], dim=1)


def remainder_init_std(std: float | None) -> float:
    """Remainder tables of ``mult`` start near 1 (mean 1, this std), so ``q * r`` starts near ``q`` (a
    product of two small random vectors would start at ~std**2 and barely train)."""
    return 1e-3 if std is None else std


@register_variant("qr", QrParams)
def plan_qr(spec: VariantSpec) -> VariantPlan:
    """Quotient and remainder tables per feature (or one full table where it fits)."""
    params: QrParams = spec.params
    if params.op == "concat" and spec.dim % 8:
        raise ConfigError(f"embedding.params.op=concat needs dim divisible by 8 (two halves of 4k), got {spec.dim}")
    multi = [f.name for f in spec.features if f.kind == "multihot"]
    if params.op == "mult" and multi:
        raise ConfigError(
            f"embedding.params.op=mult: '{multi[0]}' is multi-hot, and a pooled bag would give "
            "(sum q) * (sum r) instead of sum(q * r); use op: add or concat for multi-hot features"
        )
    if params.modulus < 0:
        raise ConfigError(f"embedding.params.modulus must be >= 0 (0 = sqrt of the vocabulary), got {params.modulus}")
    names, vocab = spec.names, spec.vocab
    part_dim = spec.dim // 2 if params.op == "concat" else spec.dim
    budget: dict[str, Any] = {"solver": "none", "modulus": params.modulus}
    if spec.budget is not None:
        # The budget is a share of the full tables at the dim; rows are paid as training holds them
        # (padded to a multiple of 4), so at dim 10 a row costs 12 floats. With concat (dim divisible
        # by 8) both widths are multiples of 4; with mult/add a full-table row is a part row.
        target = budget_bytes(spec.budget, full_bytes(list(vocab.values()), [spec.dim] * len(vocab)))
        row_budget = target // padded_row_bytes(part_dim)
        layout = solve_qr(vocab, row_budget, full_cost=fbgemm_width(spec.dim) // fbgemm_width(part_dim))
        budget = {"solver": "qr_water_fill", "budget": spec.budget, "target_bytes": target, "row_budget": row_budget,
                  "part_dim": part_dim}
        if fbgemm_width(part_dim) != part_dim:  # only where training pads: other plans stay as they were
            budget["padded_part_dim"] = fbgemm_width(part_dim)
    else:
        layout = {}
        for f, v in vocab.items():
            m = params.modulus or math.isqrt(v - 1) + 1
            layout[f] = QrLayout(v, 0, 0 if m >= v else m)
    tables: list[TablePlan] = []
    for f in names:
        lay = layout[f]
        if not lay.modulus:
            tables.append(spec.table(f"t_{f}", vocab[f], spec.dim, [f]))
            continue
        rest = spec.table(f"r_{f}", lay.modulus, part_dim, [f"{f}__r"])
        if params.op == "mult":
            rest = dataclasses.replace(rest, init_mean=1.0, init_std=remainder_init_std(spec.init_std))
        tables += [spec.table(f"q_{f}", -(-lay.ids // lay.modulus), part_dim, [f"{f}__q"]), rest]
    features = {f: {"modulus": layout[f].modulus, "buckets": layout[f].buckets, "seed": salted_seed(spec.seed, i)}
                for i, f in enumerate(names)}
    plan = spec.plan(
        "qr", tables, transform=TransformPlan("qr", {"features": features, "hash": spec.hash_name}),
        combiner=CombinerPlan("qr", {"op": params.op, "split": [f for f in names if layout[f].modulus]}),
        multihot=params.op != "mult", budget=budget,
    )
    if spec.budget is not None:  # the tables as training holds them (padded), as the solver paid for them
        check_achieved("qr", sum(t.rows * padded_row_bytes(t.dim) for t in plan.tables), budget["target_bytes"])
    return plan
