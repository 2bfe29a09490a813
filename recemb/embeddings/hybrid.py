"""The ``hybrid`` variant: frequent ids own full rows, rare ids add a shared hashed row.

Prepared ids are sorted by training count (id 1 the most frequent, id 0 the OOV
bucket), so the hot ids of a feature are ``0..K``: a threshold, trivially exported.
Each feature has a hot table of ``K + 1`` owned rows plus one shared *cold* row
that every cold id (``id > K``) reads; cold ids also read a row of one hashed table
shared by all features (salted per feature), and the two lookups add. Hot ids
read only their own row, so they never collide.

The plan holds each feature's ``K`` as the array ``hot_ids`` and the hash seeds as params;
a budget covers the transform's two small buffers too. numpy twin:
``recemb.serving.variants.hybrid``.

Any ``embedding.dim`` works: at ``dim: 10`` the tables are held 12 wide in training
(``TableEmbeddingLayer.pad_for_fbgemm``) and the budget pays for that padding (rows cost
``padded_row_bytes``), so the padded layer stays within it.

Example (YAML):
    embedding: {kind: hybrid, dim: 16, budget: 0.01, params: {hot_fraction_of_budget: 0.5}}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recemb.embeddings.base import (
    BYTES_PER_FLOAT,
    Combiner,
    IdTransform,
    by_key,
    fbgemm_width,
    in_order,
    jagged,
    key_weights,
    one_id_per_bag,
    register_combiner,
    register_transform,
)
from recemb.embeddings.budget import BudgetError, budget_bytes, largest_at_most, padded_row_bytes
from recemb.embeddings.hashing import bucket_ids, hash_keys, salted_seed
from recemb.embeddings.plan import CombinerPlan, TransformPlan, VariantPlan
from recemb.embeddings.registry import VariantSpec, register_variant
from recemb.embeddings.robe import ordered_by
from recemb.errors import ConfigError


@dataclass
class HybridParams:
    """Without a budget: ``hot`` is the share of each feature's ids that are hot and
    ``rows`` the hashed table's rows. With one: ``hot_fraction_of_budget`` of the
    target bytes goes to hot rows, the rest to the hashed table."""

    hot: float = 0.1
    rows: int = 65536
    hot_fraction_of_budget: float = 0.5


def hot_rows(num_embeddings: int, hot_ids: int) -> int:
    """Rows of a hot table: ids ``0..hot_ids`` own one each, plus the cold row if any id is cold.

    Example:
        >>> hot_rows(100, 9), hot_rows(10, 9)
        (11, 10)
    """
    owned = min(hot_ids, num_embeddings - 1) + 1
    return owned + (1 if owned < num_embeddings else 0)


def solve_hot_ids(
    vocab: Sequence[int], counts: Sequence[np.ndarray] | None, row_budget: int
) -> list[int]:
    """Hot ids ``K_f`` per feature with ``sum(hot_rows) <= row_budget``, as many as fit.

    With training counts the hot ids are the most frequent ids across all features
    (one global count threshold: an id is hot when its count reaches it), which
    maximises the training occurrences served by owned rows. Without counts every
    feature gets ``min(n_f - 1, K)`` hot ids for the largest common ``K`` (small
    features first, like ``cap_rows``). At least the OOV row and the cold row stay
    per feature, even when ``row_budget`` is smaller.

    Example:
        >>> solve_hot_ids([5, 100], None, row_budget=20)
        [4, 13]
    """
    if counts is None:
        top = max(vocab) - 1
        k = largest_at_most(lambda k: sum(hot_rows(n, min(k, n - 1)) for n in vocab), row_budget, 0, top)
        return [min(k or 0, n - 1) for n in vocab]
    tails = [np.asarray(c[1:]) for c in counts]
    levels = np.unique(np.concatenate([t[t > 0] for t in tails] + [np.zeros(0, dtype=np.int64)]))[::-1]

    def ids_at(i: int) -> list[int]:
        # i = 0: no id is hot; i > 0: ids with a count >= the i-th largest distinct count.
        return [0 if i == 0 else int((t >= levels[i - 1]).sum()) for t in tails]

    i = largest_at_most(
        lambda i: sum(hot_rows(n, k) for n, k in zip(vocab, ids_at(i), strict=True)), row_budget, 0, len(levels)
    )
    return ids_at(i or 0)


def solve_hybrid(
    vocab: Sequence[int], counts: Sequence[np.ndarray] | None, dim: int, target: int, hot_fraction: float
) -> tuple[list[int], int]:
    """Hot ids per feature and hashed rows for ``target`` bytes.

    Hot rows get ``hot_fraction`` of the target (at least one OOV and one cold row
    per feature); the hashed table gets every row that is left, so the total is
    within one row of ``target``. Rows cost what training holds (``padded_row_bytes``:
    a 10-wide row 12 floats), so a padded layer stays within ``target`` too. Raises
    ``BudgetError`` when not even one hashed row is left.

    Example:
        >>> solve_hybrid([5, 100], None, dim=4, target=40 * 16, hot_fraction=0.5)
        ([4, 13], 20)
        >>> solve_hybrid([5, 100], None, dim=10, target=40 * 48, hot_fraction=0.5)  # 48 bytes a row
        ([4, 13], 20)
    """
    row_bytes = padded_row_bytes(dim)
    hot = solve_hot_ids(vocab, counts, int(hot_fraction * target) // row_bytes)
    used = sum(hot_rows(n, k) for n, k in zip(vocab, hot, strict=True))
    rows = target // row_bytes - used
    if rows < 1:
        smallest = (sum(hot_rows(n, 0) for n in vocab) + 1) * row_bytes
        raise BudgetError(
            f"embedding.kind=hybrid: the OOV and cold rows of {len(vocab)} features plus one hashed row take "
            f"{smallest:,} bytes, over the budget of {target:,} bytes; raise embedding.budget"
        )
    return hot, rows


@register_transform("frequency_hybrid")
class HybridTransform(IdTransform):
    """id -> hot row ``min(id, K_f + 1)`` (``K_f + 1`` is the cold row) and, for cold ids,
    hashed row ``bucket_ids_np(id, seed_f, rows, hash)`` with ``seed_f = salted_seed(seed, f)``.

    Output keys: every feature's hot key (the input's lengths), then every feature's cold
    key holding only the cold ids of each bag. Plan params: ``rows``, ``features: {f:
    {hot_key, cold_key, seed}}`` and ``hash`` (``idhash.HASHES``; absent in plans written before
    it: ``splitmix64``); plan array ``hot_ids`` (``K_f`` per feature, int64).

    ``K_f`` and the hash keys are non-persistent buffers made from the plan, refilled by
    ``reset_buffers`` (a meta-device build gets them back as zeros).
    """

    def __init__(self, features: dict[str, dict[str, Any]], hot_ids: np.ndarray, rows: int,
                 device: torch.device | None = None, hash_name: str = "splitmix64") -> None:
        super().__init__()
        self.features = list(features)
        self.rows = rows
        self.hash_name = hash_name
        self.keys = [features[f]["hot_key"] for f in self.features] + [features[f]["cold_key"] for f in self.features]
        self._sources = {
            "hot_ids": np.asarray(hot_ids, dtype=np.int64),
            "hash_keys": hash_keys([features[f]["seed"] for f in self.features], hash_name).numpy(),
        }
        for name, source in self._sources.items():
            self.register_buffer(name, torch.empty(source.shape, dtype=torch.int64, device=device), persistent=False)
        if device is None or device.type != "meta":
            self.reset_buffers()

    @classmethod
    def from_plan(cls, plan: VariantPlan, device: torch.device | None = None) -> HybridTransform:
        p = plan.transform.params
        return cls(p["features"], plan.arrays["hot_ids"], p["rows"], device, p.get("hash", "splitmix64"))

    def reset_buffers(self) -> None:
        """Refill the buffers from the plan's data (after a meta-device build)."""
        for name, source in self._sources.items():
            buffer = getattr(self, name)
            if buffer.device.type != "meta":
                buffer.copy_(torch.from_numpy(source))

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """One pass over all ids: each id's ``K_f`` and hash key gathered by segment, the hot rows
        clamped, the cold ids hashed at once; each bag's cold count from a running count of cold
        ids read at the bag offsets.

        When every bag holds one id (single-hot batches) the ids lie (feature, sample) in a
        ``[features, batch]`` grid: ``K_f`` is broadcast along its row, a cold id's feature is its
        row, and a bag's cold count is whether its id is cold (no running count, no offsets)."""
        kjt = ordered_by(kjt, self.features)
        values, lengths, per_key = kjt.values().to(torch.int64), kjt.lengths(), kjt.length_per_key()
        device, n, bags = values.device, values.numel(), lengths.numel()
        out_lengths = torch.empty(2 * bags, dtype=lengths.dtype, device=device)
        out_lengths[:bags] = lengths
        if one_id_per_bag(lengths, n):
            grid = values.view(len(per_key), -1)
            limit = self.hot_ids.view(-1, 1)
            cold = grid > limit
            where = cold.view(-1).nonzero().squeeze(1)
            out = torch.empty(n + where.numel(), dtype=torch.int64, device=device)
            torch.minimum(grid, limit + 1, out=out[:n].view_as(grid))
            feature = torch.div(where, grid.shape[1], rounding_mode="floor")
            out_lengths[bags:] = cold.view(-1)
            cold_per_key = cold.sum(1).tolist()
        else:
            limit = by_key(self.hot_ids, per_key, device)
            cold = values > limit
            where = cold.nonzero().squeeze(1)
            out = torch.empty(n + where.numel(), dtype=torch.int64, device=device)
            torch.minimum(values, limit.add_(1), out=out[:n])
            # The feature of each cold id: which key's slice of the values it lies in.
            bounds = torch.tensor(kjt.offset_per_key()[1:], device=device)
            feature = torch.searchsorted(bounds, where, right=True)
            seen = torch.zeros(n + 1, dtype=torch.int64, device=device)
            torch.cumsum(cold, 0, out=seen[1:])
            at_offsets = seen.index_select(0, kjt.offsets().to(torch.int64))
            out_lengths[bags:] = at_offsets[1:] - at_offsets[:-1]
            cold_per_key = out_lengths[bags:].view(len(per_key), -1).sum(1).tolist()
        out[n:] = bucket_ids(values.index_select(0, where), self.hash_keys.index_select(0, feature), self.rows,
                             self.hash_name)
        return jagged(self.keys, out, out_lengths, kjt.stride(), per_key + cold_per_key)


@register_combiner("hot_plus_cold")
class HotPlusCold(Combiner):
    """Each feature's hot lookup plus its cold (hashed) lookup.

    Plan params: ``parts: {feature: [hot_key, cold_key]}`` and ``dim``. No dense parameters."""

    def __init__(self, parts: dict[str, list[str]], dim: int) -> None:
        super().__init__()
        self.features = list(parts)
        self.keys = [parts[f][0] for f in self.features] + [parts[f][1] for f in self.features]
        self.dim = dim
        self.width = dim * len(self.features)

    @classmethod
    def from_plan(cls, plan: VariantPlan, device: torch.device | None = None) -> HotPlusCold:
        return cls(plan.combiner.params["parts"], plan.combiner.params["dim"])

    def forward(self, pooled: KeyedTensor) -> KeyedTensor:
        values = in_order(pooled, self.keys).values()
        return KeyedTensor(
            keys=self.features,
            length_per_key=[self.dim] * len(self.features),
            values=values[:, : self.width] + values[:, self.width :],
        )

    def combine(self, keys: list[str], blocks: list[torch.Tensor]) -> KeyedTensor:
        """Hot plus cold per feature straight from the pooled blocks into the output's columns
        (instead of copying both halves side by side and adding them after)."""
        parts = dict(zip(keys, blocks, strict=True))
        half = len(self.features)
        pairs = zip(self.keys[:half], self.keys[half:], strict=True)
        if torch.is_grad_enabled():  # autograd takes no out= arguments
            sums = [parts[hot] + parts[cold] for hot, cold in pairs]
            return KeyedTensor(keys=self.features, length_per_key=[self.dim] * half, values=torch.cat(sums, 1))
        out = blocks[0].new_empty(blocks[0].shape[0], self.width)
        for i, (hot, cold) in enumerate(pairs):
            torch.add(parts[hot], parts[cold], out=out[:, i * self.dim:(i + 1) * self.dim])
        return KeyedTensor(keys=self.features, length_per_key=[self.dim] * half, values=out)


    def lookup_logical(self, transform: IdTransform, ebc: EmbeddingBagCollection,
                       kjt: KeyedJaggedTensor) -> KeyedTensor | None:
        """Without autograd, for single-hot batches, straight from the logical ids: each feature's
        hot rows (``min(id, K_f + 1)``) gathered into its output columns (when the hot tables have
        fewer rows in all than the batch has ids: stacked, and one gather), then every id's hashed
        row of the shared table gathered in (sample, feature) order and added where the id is cold
        (``out + cold * is_cold``: one multiply-add pass). None (the transform's path) for multi-hot
        or weighted batches and other transforms.

        Bit for bit the transform -> collection -> ``combine`` path: a bag of one id pools to its
        row, an empty cold bag to zeros, and each place gets one addition (``cold * 1`` is
        ``cold``, ``cold * 0`` a zero). It builds no physical KJT (the cold ids' positions: a
        ``nonzero``), pools no bag per (key, sample) and scatters nothing: hashing all ids and
        gathering a row for each costs less than finding the cold ones (a quarter of the ids at
        1/100 of the bytes on the 1M-row benchmark).

        Example:
            >>> with torch.no_grad():                                               # doctest: +SKIP
            ...     out = layer(kjt)  # TableEmbeddingLayer calls this first
        """
        if (torch.is_grad_enabled() or not isinstance(transform, HybridTransform) or transform.features != self.features
                or kjt.weights_or_none() is not None):
            return None
        kjt = ordered_by(kjt, transform.features)
        values = kjt.values().to(torch.int64)
        half, batch = len(self.features), kjt.stride()
        weights = key_weights(ebc, self.keys)
        if weights is None or not one_id_per_bag(kjt.lengths(), values.numel()):
            return None
        grid = values.view(half, batch)
        ids = grid.t().contiguous()  # (sample, feature): the output's order
        if sum(w.shape[0] for w in weights[:half]) <= values.numel():  # small hot tables: stacked, one gather
            starts = [0]
            for w in weights[:half - 1]:
                starts.append(starts[-1] + w.shape[0])
            hot = torch.minimum(ids, transform.hot_ids + 1).add_(torch.tensor(starts, device=ids.device))
            out = torch.cat(weights[:half]).index_select(0, hot.view(-1)).view(batch, half, self.dim)
        else:
            hot = torch.minimum(grid, transform.hot_ids.view(-1, 1) + 1)
            out = weights[0].new_empty(batch, half, self.dim)
            for i in range(half):
                torch.index_select(weights[i], 0, hot[i], out=out[:, i])
        rows = bucket_ids(ids, transform.hash_keys, transform.rows, transform.hash_name)
        cold = weights[half].index_select(0, rows.view(-1))
        is_cold = (ids > transform.hot_ids).to(out.dtype).view(-1, 1)
        out.view(-1, self.dim).addcmul_(cold, is_cold)
        return KeyedTensor(keys=self.features, length_per_key=[self.dim] * half, values=out.view(batch, -1))


def buffer_bytes(num_features: int, hash_name: str = "splitmix64") -> int:
    """Bytes of the transform's buffers: ``K_f`` and the hash constants per feature (int64 each:
    one key for ``splitmix64``, a multiplier and an addend for ``mulshift``).

    The budget covers them (achieved bytes count every buffer), so the solver gets the
    target less these.

    Example:
        >>> buffer_bytes(26), buffer_bytes(26, "mulshift")
        (416, 624)
    """
    return (3 if hash_name == "mulshift" else 2) * 8 * num_features


@register_variant("hybrid", HybridParams)
def plan_hybrid(spec: VariantSpec) -> VariantPlan:
    """Per-feature hot tables (``K_f + 2`` rows) plus one hashed table shared by all features."""
    params: HybridParams = spec.params
    names = spec.names
    vocab = [spec.vocab[f] for f in names]
    if spec.budget is None:
        if not 0 <= params.hot <= 1 or params.rows < 1:
            raise ConfigError(f"embedding.params: hot={params.hot} must be in [0, 1] and rows={params.rows} >= 1")
        hot = [round(params.hot * (n - 1)) for n in vocab]
        rows = params.rows
        budget: dict[str, Any] = {"solver": "none", "hot": params.hot, "rows": rows}
    else:
        if not 0 < params.hot_fraction_of_budget < 1:
            raise ConfigError(
                f"embedding.params.hot_fraction_of_budget={params.hot_fraction_of_budget}: must be in (0, 1)"
            )
        counts = [spec.id_counts(f) for f in names]
        usable = None if any(c is None for c in counts) else counts
        target = budget_bytes(spec.budget, sum(vocab) * spec.dim * BYTES_PER_FLOAT)
        reserved = buffer_bytes(len(names), spec.hash_name)
        hot, rows = solve_hybrid(vocab, usable, spec.dim, target - reserved, params.hot_fraction_of_budget)
        budget = {"solver": "solve_hybrid", "budget": spec.budget, "target_bytes": target,
                  "buffer_bytes": reserved, "hot_fraction_of_budget": params.hot_fraction_of_budget,
                  "by_counts": usable is not None, "rows": rows}
        if fbgemm_width(spec.dim) != spec.dim:  # the width rows were paid at; only where training pads
            budget["padded_dim"] = fbgemm_width(spec.dim)
    keys = {f: {"hot_key": f"{f}__hot", "cold_key": f"{f}__cold", "seed": salted_seed(spec.seed, i)}
            for i, f in enumerate(names)}
    tables = [spec.table(f"hot_{f}", hot_rows(n, k), spec.dim, [keys[f]["hot_key"]])
              for f, n, k in zip(names, vocab, hot, strict=True)]
    tables.append(spec.table("hashed", rows, spec.dim, [keys[f]["cold_key"] for f in names]))
    return spec.plan(
        "hybrid", tables,
        transform=TransformPlan("frequency_hybrid", {"rows": rows, "features": keys, "hash": spec.hash_name},
                                arrays=["hot_ids"]),
        combiner=CombinerPlan("hot_plus_cold", {"parts": {f: [keys[f]["hot_key"], keys[f]["cold_key"]] for f in names},
                                                "dim": spec.dim}),
        arrays={"hot_ids": np.asarray(hot, dtype=np.int64)},
        budget=budget,
    )
