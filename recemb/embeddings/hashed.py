"""The ``hashed`` variant: the hashing trick, one table of fewer rows per feature.

Each feature whose vocabulary is larger than its row count maps id ``x`` to row
``hash_ids(x, seed_f, rows_f)`` (seeded splitmix64, bit-exact in numpy for
serving); features that fit keep their ids (no collisions). A ``budget`` picks
the rows by water-filling: every feature gets ``min(vocab, R)`` rows with the
largest cap ``R`` that fits (the remainder one row each to the largest), so
small features stay exact and large ones share about ``R`` rows.

Example (YAML):
    embedding: {kind: hashed, dim: 16, budget: 0.01}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recemb.embeddings.base import (
    BYTES_PER_FLOAT,
    EmbeddingLayer,
    IdTransform,
    TableEmbeddingLayer,
    join_keys,
    split_by_key,
)
from recemb.embeddings.budget import BudgetError, budget_bytes, full_bytes, water_fill
from recemb.embeddings.hashing import hash_ids, salted_seed
from recemb.embeddings.registry import VariantSpec, init_fn, register_variant
from recemb.errors import ConfigError


@dataclass
class HashedParams:
    """``rows``: the row cap when no budget is given (0 = no cap); ``per_feature``: explicit rows."""

    rows: int = 0
    per_feature: dict[str, int] = field(default_factory=dict)


def hashed_rows(vocab: dict[str, int], dim: int, budget: float | None, params: HashedParams) -> dict[str, int]:
    """Rows per feature: explicit ``per_feature`` first, then the budget's (or ``rows``') cap.

    Example:
        >>> hashed_rows({"a": 10, "b": 1000}, 4, budget=0.1, params=HashedParams())
        {'a': 10, 'b': 91}
    """
    unknown = sorted(set(params.per_feature) - set(vocab))
    if unknown:
        raise ConfigError(f"embedding.params.per_feature: unknown feature '{unknown[0]}'")
    bad = {f: r for f, r in params.per_feature.items() if r < 1}
    if params.rows < 0 or bad:
        raise ConfigError(f"embedding.params: rows must be >= 0 and per_feature rows >= 1 (got rows={params.rows}, "
                          f"per_feature={bad or {}})")
    fixed = {f: min(r, vocab[f]) for f, r in params.per_feature.items()}
    rest = {f: v for f, v in vocab.items() if f not in fixed}
    if budget is not None:
        target = budget_bytes(budget, full_bytes(list(vocab.values()), [dim] * len(vocab)))
        row_budget = target // (dim * BYTES_PER_FLOAT) - sum(fixed.values())
        if fixed and row_budget < len(rest):
            raise BudgetError(
                f"embedding.params.per_feature takes {sum(fixed.values()):,} rows of the budget's "
                f"{target // (dim * BYTES_PER_FLOAT):,}, leaving less than one row for each other feature; "
                "lower per_feature or raise embedding.budget"
            )
        if not rest:
            return fixed
        fitted = dict(zip(rest, water_fill(list(rest.values()), row_budget), strict=True))
        return {f: fixed.get(f, fitted.get(f, 0)) for f in vocab}
    cap = params.rows or max(vocab.values())
    return {f: fixed.get(f, min(v, cap)) for f, v in vocab.items()}


class HashTransform(IdTransform):
    """Per-feature seeded hash into ``rows[f]`` buckets; features with ``rows[f] >= vocab`` pass through."""

    def __init__(self, features: list[str], rows: dict[str, int], vocab: dict[str, int], seed: int) -> None:
        super().__init__()
        self.features = list(features)
        self.rows = dict(rows)
        self.hashed = {f: rows[f] < vocab[f] for f in features}
        self.seeds = {f: salted_seed(seed, i) for i, f in enumerate(features)}

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        parts = []
        for f, (values, lengths) in zip(kjt.keys(), split_by_key(kjt), strict=True):
            if self.hashed[f]:
                values = hash_ids(values, self.seeds[f], self.rows[f])
            parts.append((values, lengths))
        return join_keys(kjt.keys(), parts, kjt.stride())

    def to_manifest(self) -> dict[str, Any]:
        return {
            "kind": "hash",
            "hash": "splitmix64(id ^ key(seed)) >> 1 mod rows",
            "features": {
                f: {"seed": self.seeds[f], "rows": self.rows[f]} if self.hashed[f] else {"identity": True}
                for f in self.features
            },
        }


@register_variant("hashed", HashedParams)
def build_hashed(spec: VariantSpec) -> EmbeddingLayer:
    """One ``rows[f] x dim`` table per feature behind a seeded hash."""
    vocab = {f.name: f.num_embeddings for f in spec.features}
    rows = hashed_rows(vocab, spec.dim, spec.budget, spec.params)
    names = [f.name for f in spec.features]
    tables = [
        EmbeddingBagConfig(
            name=f"{spec.prefix}h_{f}", num_embeddings=rows[f], embedding_dim=spec.dim, feature_names=[f],
            pooling=PoolingType.SUM, init_fn=init_fn(spec.init_std),
        )
        for f in names
    ]
    layer = TableEmbeddingLayer(
        features=names, dims={f: spec.dim for f in names}, full_rows=vocab, tables=tables,
        transform=HashTransform(names, rows, vocab, spec.seed), device=spec.device,
    )
    layer.sharding = {t.name: spec.sharding for t in tables}
    return layer
