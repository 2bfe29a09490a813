"""The ``hybrid`` variant: frequent ids own full rows, rare ids add a shared hashed row.

Prepared ids are sorted by training count (id 1 the most frequent, id 0 the OOV
bucket), so the hot ids of a feature are ``0..K``: a threshold, trivially exported.
Each feature has a hot table of ``K + 1`` owned rows plus one shared *cold* row
that every cold id (``id > K``) reads; cold ids also read a row of one hashed table
shared by all features (salted per feature), and the two lookups add. Hot ids
read only their own row, so they never collide.

Example (YAML):
    embedding: {kind: hybrid, dim: 16, budget: 0.01, params: {hot_fraction_of_budget: 0.5}}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recemb.embeddings.base import (
    BYTES_PER_FLOAT,
    Combiner,
    EmbeddingLayer,
    IdTransform,
    TableEmbeddingLayer,
    in_order,
)
from recemb.embeddings.budget import BudgetError, budget_bytes, largest_at_most
from recemb.embeddings.hashing import mix64_torch, salted_seed, seed_key
from recemb.embeddings.registry import VariantSpec, init_fn, register_variant
from recemb.embeddings.robe import ordered_by, signed64
from recemb.errors import ConfigError

_LOW63 = (1 << 63) - 1


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
    within one row of ``target``. Raises ``BudgetError`` when not even one hashed
    row is left.

    Example:
        >>> solve_hybrid([5, 100], None, dim=4, target=40 * 16, hot_fraction=0.5)
        ([4, 13], 20)
    """
    row_bytes = dim * BYTES_PER_FLOAT
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


class HybridTransform(IdTransform):
    """id -> hot row ``min(id, K_f + 1)`` (``K_f + 1`` is the cold row) and, for cold ids,
    hashed row ``hash_ids_np(id, salted_seed(seed, f), rows)``.

    Output keys: ``{feature}__hot`` for every feature (the input's lengths), then
    ``{feature}__cold`` holding only the cold ids of each bag.
    """

    def __init__(self, features: list[str], hot_ids: list[int], rows: int, seed: int) -> None:
        super().__init__()
        self.features = list(features)
        self.hot_ids = list(hot_ids)
        self.rows = rows
        self.seed = seed
        self.seeds = [salted_seed(seed, f) for f in range(len(features))]
        self.keys = [f"{f}__hot" for f in features] + [f"{f}__cold" for f in features]
        self._consts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Plain tensors rebuilt per device from python data: no buffer for meta construction to zero.
        key = str(device)
        if key not in self._consts:
            self._consts[key] = (
                torch.tensor(self.hot_ids, dtype=torch.int64, device=device),
                torch.tensor([signed64(seed_key(s)) for s in self.seeds], dtype=torch.int64, device=device),
            )
        return self._consts[key]

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        kjt = ordered_by(kjt, self.features)
        values, lengths = kjt.values().to(torch.int64), kjt.lengths()
        thresholds, hash_keys = self._constants(values.device)
        segment = torch.repeat_interleave(
            torch.arange(lengths.numel(), device=values.device), lengths, output_size=values.numel()
        )
        feature = segment // kjt.stride()
        limit = thresholds[feature]
        hot = torch.minimum(values, limit + 1)
        cold = values > limit
        h = mix64_torch(values[cold] ^ hash_keys[feature[cold]])
        cold_rows = ((h >> 1) & _LOW63) % self.rows
        cold_lengths = torch.bincount(segment[cold], minlength=lengths.numel()).to(lengths.dtype)
        return KeyedJaggedTensor(
            keys=self.keys,
            values=torch.cat([hot, cold_rows]),
            lengths=torch.cat([lengths, cold_lengths]),
            stride=kjt.stride(),
        )

    def to_manifest(self) -> dict[str, Any]:
        return {
            "kind": "frequency_hybrid",
            "features": self.features,
            "hot_ids": dict(zip(self.features, self.hot_ids, strict=True)),
            "hot_row": "id if id <= hot_ids else hot_ids + 1 (the shared cold row)",
            "hashed_rows": self.rows,
            "seed": self.seed,
            "feature_seeds": dict(zip(self.features, self.seeds, strict=True)),
            "hashed_row": "hash_ids(id, feature_seed, hashed_rows), for cold ids only",
        }


class HotPlusCold(Combiner):
    """Each feature's hot lookup plus its cold (hashed) lookup."""

    def __init__(self, features: list[str], keys: list[str], dim: int) -> None:
        super().__init__()
        self.features = list(features)
        self.keys = list(keys)
        self.width = dim * len(features)

    def forward(self, pooled: KeyedTensor) -> KeyedTensor:
        values = in_order(pooled, self.keys).values()
        return KeyedTensor(
            keys=self.features,
            length_per_key=[self.width // len(self.features)] * len(self.features),
            values=values[:, : self.width] + values[:, self.width :],
        )


@register_variant("hybrid", HybridParams)
def build_hybrid(spec: VariantSpec) -> EmbeddingLayer:
    """Per-feature hot tables (``K_f + 2`` rows) plus one hashed table shared by all features."""
    params: HybridParams = spec.params
    vocab = [f.num_embeddings for f in spec.features]
    if spec.budget is None:
        if not 0 <= params.hot <= 1 or params.rows < 1:
            raise ConfigError(f"embedding.params: hot={params.hot} must be in [0, 1] and rows={params.rows} >= 1")
        hot = [round(params.hot * (n - 1)) for n in vocab]
        rows = params.rows
    else:
        if not 0 < params.hot_fraction_of_budget < 1:
            raise ConfigError(
                f"embedding.params.hot_fraction_of_budget={params.hot_fraction_of_budget}: must be in (0, 1)"
            )
        counts = [spec.id_counts(f.name) for f in spec.features]
        usable = None if any(c is None for c in counts) else counts
        target = budget_bytes(spec.budget, sum(vocab) * spec.dim * BYTES_PER_FLOAT)
        hot, rows = solve_hybrid(vocab, usable, spec.dim, target, params.hot_fraction_of_budget)
    features = [f.name for f in spec.features]
    transform = HybridTransform(features, hot, rows, spec.seed)
    tables = [
        EmbeddingBagConfig(
            name=f"{spec.prefix}hot_{name}",
            num_embeddings=hot_rows(n, k),
            embedding_dim=spec.dim,
            feature_names=[f"{name}__hot"],
            pooling=PoolingType.SUM,
            init_fn=init_fn(spec.init_std),
        )
        for name, n, k in zip(features, vocab, hot, strict=True)
    ]
    tables.append(EmbeddingBagConfig(
        name=f"{spec.prefix}hashed",
        num_embeddings=rows,
        embedding_dim=spec.dim,
        feature_names=[f"{name}__cold" for name in features],
        pooling=PoolingType.SUM,
        init_fn=init_fn(spec.init_std),
    ))
    layer = TableEmbeddingLayer(
        features=features,
        dims={n: spec.dim for n in features},
        full_rows={f.name: f.num_embeddings for f in spec.features},
        tables=tables,
        transform=transform,
        combiner=HotPlusCold(features, transform.keys, spec.dim),
        device=spec.device,
    )
    layer.sharding = {t.name: spec.sharding for t in tables}
    return layer
