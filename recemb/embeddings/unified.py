"""The ``unified`` variant: feature multiplexing (Coleman et al., "Unified Embedding", NeurIPS 2023).

All features share ``T`` physical tables of ``R`` rows and chunk width ``c``.
Feature ``f`` gets ``k_f`` chunks (its output width is ``k_f * c``); chunk ``j``
of an id is looked up with its own salted hash (``salted_seed(seed, f, j)``), in
table ``(global chunk number) % T`` (round-robin, to spread rows and load over
the tables), and the chunks are concatenated. Two ids of any features collide
on a whole embedding only if all their probes collide, which is why one shared
space beats per-feature hashing at the same bytes. Small features may opt out
(``exempt``) and keep a collision-free table of their own.

A ``budget`` fixes ``R``: the exempt tables are paid for first, the rest is
split evenly over the ``T`` shared tables.

Example (YAML):
    embedding: {kind: unified, dim: 16, budget: 0.01, params: {tables: 2, chunk: 8}}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recemb.embeddings.base import (
    BYTES_PER_FLOAT,
    Combiner,
    EmbeddingLayer,
    IdTransform,
    TableEmbeddingLayer,
    concat_keyed,
    join_keys,
    split_by_key,
)
from recemb.embeddings.budget import BudgetError, budget_bytes
from recemb.embeddings.hashing import hash_ids, salted_seed
from recemb.embeddings.registry import VariantSpec, init_fn, register_variant
from recemb.errors import ConfigError


@dataclass
class UnifiedParams:
    """Settings of the shared tables.

    ``tables``: T; ``chunk``: c (0 = half the dim when that is a multiple of 4,
    else the dim); ``chunks``: k per feature (default ``dim // c``);
    ``rows``: R when no budget is given; ``exempt``: features that keep their own
    table; ``exempt_share``: with a budget, also exempt the smallest features
    while their tables together take at most this share of it (0 = none).
    """

    tables: int = 2
    chunk: int = 0
    chunks: dict[str, int] = field(default_factory=dict)
    rows: int = 1 << 16
    exempt: list[str] = field(default_factory=list)
    exempt_share: float = 0.05


@dataclass(frozen=True)
class UnifiedLayout:
    """The solved sizes: rows per shared table, chunk width, chunks per feature, exempt features."""

    tables: int
    rows: int
    chunk: int
    chunks: dict[str, int]
    exempt: list[str]

    def shared_bytes(self) -> int:
        """fp32 bytes of the shared tables."""
        return self.tables * self.rows * self.chunk * BYTES_PER_FLOAT


def chunk_width(dim: int, chunk: int) -> int:
    """The chunk width ``c`` for ``dim`` (``chunk`` = 0 picks ``dim // 2`` when it is a multiple of 4)."""
    if chunk:
        return chunk
    return dim // 2 if dim % 8 == 0 else dim


def solve_unified(
    vocab: dict[str, int], dim: int, budget: float | None, params: UnifiedParams
) -> UnifiedLayout:
    """Chunks per feature, exempt features and rows per shared table for ``budget``.

    Example:
        >>> lay = solve_unified({"a": 10, "b": 100_000}, 16, 0.01, UnifiedParams(tables=2, chunk=8))
        >>> lay.rows, lay.exempt, lay.chunks
        (990, ['a'], {'a': 2, 'b': 2})
    """
    c = chunk_width(dim, params.chunk)
    if c % 4:
        raise ConfigError(f"embedding.params.chunk={c}: FBGEMM needs table widths divisible by 4")
    unknown = sorted((set(params.chunks) | set(params.exempt)) - set(vocab))
    if unknown:
        raise ConfigError(f"embedding.params: unknown feature '{unknown[0]}' in chunks/exempt")
    if params.tables < 1 or params.rows < 1 or not 0 <= params.exempt_share <= 1:
        raise ConfigError(
            f"embedding.params: tables and rows must be >= 1 and exempt_share in [0, 1] (got tables={params.tables}, "
            f"rows={params.rows}, exempt_share={params.exempt_share})"
        )
    if any(k < 1 for k in params.chunks.values()):
        raise ConfigError(f"embedding.params.chunks: every feature needs >= 1 chunk, got {params.chunks}")
    chunks = {f: params.chunks.get(f, max(1, dim // c)) for f in vocab}
    exempt = list(params.exempt)
    if budget is None:
        return UnifiedLayout(params.tables, params.rows, c, chunks, [f for f in vocab if f in exempt])

    def own_bytes(f: str) -> int:
        return vocab[f] * chunks[f] * c * BYTES_PER_FLOAT

    full = sum(own_bytes(f) for f in vocab)
    target = budget_bytes(budget, full)
    spent = sum(own_bytes(f) for f in exempt)
    for f in sorted((f for f in vocab if f not in exempt), key=lambda f: vocab[f]):
        if spent + own_bytes(f) > params.exempt_share * target:
            break
        exempt.append(f)
        spent += own_bytes(f)
    rows = (target - spent) // (params.tables * c * BYTES_PER_FLOAT)
    if rows < 1:
        raise BudgetError(
            f"embedding.kind=unified: the exempt tables take {spent:,} of the {target:,}-byte budget, "
            "leaving no rows for the shared tables; exempt fewer features or raise embedding.budget"
        )
    return UnifiedLayout(params.tables, int(rows), c, chunks, [f for f in vocab if f in exempt])


def chunk_key(feature: str, j: int) -> str:
    """The physical KJT key of chunk ``j`` of ``feature``."""
    return f"{feature}__c{j}"


class MultiProbeTransform(IdTransform):
    """Each shared feature -> one key per chunk, ids hashed with a seed salted by (feature, chunk)."""

    def __init__(self, features: list[str], layout: UnifiedLayout, seed: int) -> None:
        super().__init__()
        self.features = list(features)
        self.rows = layout.rows
        self.exempt = set(layout.exempt)
        self.probes: dict[str, list[tuple[str, int, int]]] = {}  # feature -> [(key, seed, table)]
        n = 0
        for i, f in enumerate(features):
            if f in self.exempt:
                continue
            self.probes[f] = []
            for j in range(layout.chunks[f]):
                self.probes[f].append((chunk_key(f, j), salted_seed(seed, i, j), n % layout.tables))
                n += 1

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        parts, out_keys = [], []
        for f, (values, lengths) in zip(kjt.keys(), split_by_key(kjt), strict=True):  # input order
            if f in self.exempt:
                parts.append((values, lengths))
                out_keys.append(f)
            else:
                parts += [(hash_ids(values, s, self.rows), lengths) for _, s, _ in self.probes[f]]
                out_keys += [k for k, _, _ in self.probes[f]]
        return join_keys(out_keys, parts, kjt.stride())

    def to_manifest(self) -> dict[str, Any]:
        return {
            "kind": "multi_probe_hash",
            "rows": self.rows,
            "features": {
                f: {"identity": True} if f in self.exempt else {
                    "chunks": [{"key": k, "seed": s, "table": t} for k, s, t in self.probes[f]]
                }
                for f in self.features
            },
        }


class ConcatChunks(Combiner):
    """Concatenates each feature's chunks (exempt features pass through)."""

    def __init__(self, groups: dict[str, list[str]]) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, pooled: KeyedTensor) -> KeyedTensor:
        return concat_keyed(pooled, self.groups)


@register_variant("unified", UnifiedParams)
def build_unified(spec: VariantSpec) -> EmbeddingLayer:
    """``T`` shared multi-probe tables plus a table per exempt feature."""
    names = [f.name for f in spec.features]
    vocab = {f.name: f.num_embeddings for f in spec.features}
    layout = solve_unified(vocab, spec.dim, spec.budget, spec.params)
    transform = MultiProbeTransform(names, layout, spec.seed)
    init = init_fn(spec.init_std)
    tables: list[EmbeddingBagConfig] = []
    for t in range(layout.tables):
        keys = [k for f in names if f not in layout.exempt for k, _, table in transform.probes[f] if table == t]
        if keys:
            tables.append(EmbeddingBagConfig(
                name=f"{spec.prefix}u{t}", num_embeddings=layout.rows, embedding_dim=layout.chunk,
                feature_names=keys, pooling=PoolingType.SUM, init_fn=init))
    for f in layout.exempt:
        tables.append(EmbeddingBagConfig(
            name=f"{spec.prefix}t_{f}", num_embeddings=vocab[f], embedding_dim=layout.chunks[f] * layout.chunk,
            feature_names=[f], pooling=PoolingType.SUM, init_fn=init))
    groups = {f: [f] if f in layout.exempt else [p[0] for p in transform.probes[f]] for f in names}
    layer = TableEmbeddingLayer(
        features=names, dims={f: layout.chunks[f] * layout.chunk for f in names}, full_rows=vocab,
        tables=tables, transform=transform, combiner=ConcatChunks(groups), device=spec.device,
    )
    layer.sharding = {t.name: spec.sharding for t in tables}
    return layer
