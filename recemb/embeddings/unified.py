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

Any ``embedding.dim`` works: a chunk (or exempt table) whose width FBGEMM cannot run (10
at ``dim: 10``) is held ``fbgemm_width`` wide in training (12) and its lookups are cut back
(``TableEmbeddingLayer.pad_for_fbgemm``); the budget pays for those padding columns too.

Example (YAML):
    embedding: {kind: unified, dim: 16, budget: 0.01, params: {tables: 2, chunk: 8}}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recemb.embeddings.base import (
    BYTES_PER_FLOAT,
    Combiner,
    IdTransform,
    concat_keyed,
    fbgemm_width,
    jagged,
    one_id_per_bag,
    register_combiner,
    register_transform,
    regroup,
)
from recemb.embeddings.budget import BudgetError, budget_bytes
from recemb.embeddings.hashing import (
    buckets_of,
    hash_keys,
    hash_segments,
    mix64_keyed,
    mulshift_buckets_,
    salted_seed,
)
from recemb.embeddings.plan import CombinerPlan, TablePlan, TransformPlan, VariantPlan
from recemb.embeddings.registry import VariantSpec, register_variant
from recemb.errors import ConfigError


@dataclass
class UnifiedParams:
    """Settings of the shared tables.

    ``tables``: T; ``chunk``: c (0 = half the dim when that is a multiple of 4,
    else the dim; a width not divisible by 4 is padded in training, see the module
    docstring); ``chunks``: k per feature (default ``dim // c``);
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
        """fp32 bytes of the shared tables as training holds them (chunk padded to ``fbgemm_width``)."""
        return self.tables * self.rows * fbgemm_width(self.chunk) * BYTES_PER_FLOAT


def chunk_width(dim: int, chunk: int) -> int:
    """The chunk width ``c`` for ``dim`` (``chunk`` = 0 picks ``dim // 2`` when it is a multiple of 4,
    else ``dim``: one chunk, padded once rather than two half chunks padded each).

    Example:
        >>> [chunk_width(d, 0) for d in (16, 12, 10, 6)], chunk_width(10, 5)
        ([8, 12, 10, 6], 5)
    """
    if chunk:
        return chunk
    return dim // 2 if dim % 8 == 0 else dim


def solve_unified(
    vocab: dict[str, int], dim: int, budget: float | None, params: UnifiedParams
) -> UnifiedLayout:
    """Chunks per feature, exempt features and rows per shared table for ``budget``.

    The budget is a share of the full tables at the logical widths (``chunks * c``), and pays for
    the tables as training holds them: a width not divisible by 4 counts ``fbgemm_width`` columns
    (a chunk of 10 counts 12), so a padded layer's bytes stay within it. At widths divisible by 4
    nothing changes.

    Example:
        >>> lay = solve_unified({"a": 10, "b": 100_000}, 16, 0.01, UnifiedParams(tables=2, chunk=8))
        >>> lay.rows, lay.exempt, lay.chunks
        (990, ['a'], {'a': 2, 'b': 2})
    """
    if params.chunk < 0:
        raise ConfigError(f"embedding.params.chunk={params.chunk}: must be >= 1 (or 0 to pick it from the dim)")
    c = chunk_width(dim, params.chunk)
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

    def own_bytes(f: str) -> int:  # an exempt table as training holds it
        return vocab[f] * fbgemm_width(chunks[f] * c) * BYTES_PER_FLOAT

    full = sum(vocab[f] * chunks[f] * c * BYTES_PER_FLOAT for f in vocab)
    target = budget_bytes(budget, full)
    spent = sum(own_bytes(f) for f in exempt)
    for f in sorted((f for f in vocab if f not in exempt), key=lambda f: vocab[f]):
        if spent + own_bytes(f) > params.exempt_share * target:
            break
        exempt.append(f)
        spent += own_bytes(f)
    rows = (target - spent) // (params.tables * fbgemm_width(c) * BYTES_PER_FLOAT)
    if rows < 1:
        raise BudgetError(
            f"embedding.kind=unified: the exempt tables take {spent:,} of the {target:,}-byte budget, "
            "leaving no rows for the shared tables; exempt fewer features or raise embedding.budget"
        )
    return UnifiedLayout(params.tables, int(rows), c, chunks, [f for f in vocab if f in exempt])


def chunk_key(feature: str, j: int) -> str:
    """The physical KJT key of chunk ``j`` of ``feature``."""
    return f"{feature}__c{j}"


def probe_plan(features: list[str], layout: UnifiedLayout, seed: int) -> dict[str, dict[str, Any]]:
    """Per feature: ``exempt`` and its ``chunks`` (``[{key, seed, table}]``; seeds salted by feature and
    chunk, tables round-robin over the shared ones by global chunk number), the transform's plan params."""
    out: dict[str, dict[str, Any]] = {}
    n = 0
    for i, f in enumerate(features):
        if f in layout.exempt:
            out[f] = {"exempt": True, "chunks": []}
            continue
        chunks = []
        for j in range(layout.chunks[f]):
            chunks.append({"key": chunk_key(f, j), "seed": salted_seed(seed, i, j), "table": n % layout.tables})
            n += 1
        out[f] = {"exempt": False, "chunks": chunks}
    return out


@register_transform("multi_probe")
class MultiProbeTransform(IdTransform):
    """Each shared feature -> one key per chunk, ids hashed with a seed salted by (feature, chunk).

    Plan params: ``rows`` (of every shared table), ``features`` (``probe_plan``) and ``hash``
    (``idhash.HASHES``; absent in plans written before it: ``splitmix64``); twin:
    ``recemb.serving.variants.unified``.
    """

    def __init__(self, rows: int, features: dict[str, dict[str, Any]], hash_name: str = "splitmix64") -> None:
        super().__init__()
        self.rows = rows
        self.hash_name = hash_name
        self.exempt = {f for f, p in features.items() if p["exempt"]}
        self.probes = {f: [(c["key"], c["seed"]) for c in p["chunks"]] for f, p in features.items() if not p["exempt"]}
        self._layouts: dict[tuple[str, ...], tuple[list[str], list[int], torch.Tensor, list[int]]] = {}

    @classmethod
    def from_plan(cls, plan: VariantPlan, device: torch.device | None = None) -> MultiProbeTransform:
        p = plan.transform.params
        return cls(p["rows"], p["features"], p.get("hash", "splitmix64"))

    def _layout(self, keys: list[str]) -> tuple[list[str], list[int], torch.Tensor, list[int]]:
        """For an input key order: the output keys, the input key each copies, each one's hash
        constants (``hash_keys``; none when exempt) and the exempt outputs' positions; cached per key order."""
        found = self._layouts.get(tuple(keys))
        if found is None:
            out_keys, sources, seeds, exempt = [], [], [], []
            for i, f in enumerate(keys):  # input order
                if f in self.exempt:
                    exempt.append(len(out_keys))
                    out_keys.append(f)
                    sources.append(i)
                    seeds.append(None)
                    continue
                for key, seed in self.probes[f]:
                    out_keys.append(key)
                    sources.append(i)
                    seeds.append(seed)
            found = (out_keys, sources, hash_keys(seeds, self.hash_name), exempt)
            self._layouts[tuple(keys)] = found
        return found

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Every feature's ids copied once per chunk (one ``regroup``), then one hash of them all,
        each chunk with its own seed (``hash_segments``); exempt features' ids pass through.

        When every key has as many ids (single-hot batches) the copies are one gather of the rows
        of the ``[keys, ids]`` grid, hashed in place (multiply-add-shift, or splitmix64's xor, finaliser
        and buckets), and the exempt rows copied back from the grid: no second buffer."""
        out_keys, sources, salts, exempt = self._layout(kjt.keys())
        per_feature = kjt.length_per_key()
        width = per_feature[0] if per_feature and all(n == per_feature[0] for n in per_feature) else None
        if width is None or width == 0:
            values, lengths, per_key = regroup(kjt, sources)
            hashed = hash_segments(values, salts, self.rows, per_key, keep=exempt, hash_name=self.hash_name)
            return jagged(out_keys, hashed, lengths, kjt.stride(), per_key)
        device = kjt.values().device
        grid = kjt.values().to(torch.int64).view(len(per_feature), width)
        index = torch.tensor(sources, device=device)
        z = grid.index_select(0, index)
        salts = salts.to(device)
        if self.hash_name == "mulshift":
            out = mulshift_buckets_(z.mul_(salts[:, :1]).add_(salts[:, 1:]), self.rows)
        else:
            z.bitwise_xor_(salts.view(-1, 1))
            out = buckets_of(mix64_keyed(z.view(-1)), self.rows).view_as(z)
        if exempt:
            kept = torch.tensor(exempt, device=device)
            out.index_copy_(0, kept, grid.index_select(0, index.index_select(0, kept)))
        lengths = kjt.lengths().view(len(per_feature), -1).index_select(0, index).reshape(-1)
        return jagged(out_keys, out.view(-1), lengths, kjt.stride(), [width] * len(sources))


@register_combiner("concat_chunks")
class ConcatChunks(Combiner):
    """Concatenates each feature's chunks (exempt features pass through).

    Plan params: ``groups`` (feature -> its physical keys, in concatenation order)."""

    def __init__(self, groups: dict[str, list[str]]) -> None:
        super().__init__()
        self.groups = {f: list(keys) for f, keys in groups.items()}

    @classmethod
    def from_plan(cls, plan: VariantPlan, device: torch.device | None = None) -> ConcatChunks:
        return cls(plan.combiner.params["groups"])

    def forward(self, pooled: KeyedTensor) -> KeyedTensor:
        return concat_keyed(pooled, self.groups)

    def lookup(self, ebc: EmbeddingBagCollection, kjt: KeyedJaggedTensor) -> KeyedTensor | None:
        """Without autograd, a batch of one id per bag (single-hot): each key's rows gathered straight
        into its columns of the output; else None (pooled blocks, then ``combine``).

        Bit for bit the pooled chunks laid side by side (a bag of one id is its row), without
        pooling a bag per (key, sample) or copying every chunk into place after."""
        flat = [k for keys in self.groups.values() for k in keys]
        if torch.is_grad_enabled() or kjt.keys() != flat:
            return None
        values = kjt.values()
        if not one_id_per_bag(kjt.lengths(), values.numel()):
            return None
        table = {k: c.name for c in ebc.embedding_bag_configs() for k in c.feature_names}
        weights = [ebc.embedding_bags[table[k]].weight.detach() for k in flat]
        widths = [w.shape[1] for w in weights]
        starts = kjt.offset_per_key()
        out = weights[0].new_empty(kjt.stride(), sum(widths))
        col = 0
        for i, (weight, width) in enumerate(zip(weights, widths, strict=True)):
            torch.index_select(weight, 0, values[starts[i]:starts[i + 1]], out=out[:, col:col + width])
            col += width
        sizes = iter(widths)
        return KeyedTensor(keys=list(self.groups), values=out,
                           length_per_key=[sum(next(sizes) for _ in keys) for keys in self.groups.values()])


@register_variant("unified", UnifiedParams)
def plan_unified(spec: VariantSpec) -> VariantPlan:
    """``T`` shared multi-probe tables plus a table per exempt feature."""
    names, vocab = spec.names, spec.vocab
    layout = solve_unified(vocab, spec.dim, spec.budget, spec.params)
    probes = probe_plan(names, layout, spec.seed)
    tables: list[TablePlan] = []
    for t in range(layout.tables):
        keys = [c["key"] for f in names for c in probes[f]["chunks"] if c["table"] == t]
        if keys:
            tables.append(spec.table(f"u{t}", layout.rows, layout.chunk, keys))
    for f in layout.exempt:
        tables.append(spec.table(f"t_{f}", vocab[f], layout.chunks[f] * layout.chunk, [f]))
    groups = {f: [f] if f in layout.exempt else [c["key"] for c in probes[f]["chunks"]] for f in names}
    params: UnifiedParams = spec.params
    # Only where training pads (a chunk width not divisible by 4): plans at other widths stay as they were.
    padded = {"padded_chunk": fbgemm_width(layout.chunk)} if fbgemm_width(layout.chunk) != layout.chunk else {}
    return spec.plan(
        "unified", tables, dims={f: layout.chunks[f] * layout.chunk for f in names},
        transform=TransformPlan("multi_probe", {"rows": layout.rows, "features": probes, "hash": spec.hash_name}),
        combiner=CombinerPlan("concat_chunks", {"groups": groups}),
        budget={"solver": "none" if spec.budget is None else "exempt_then_even_split", "budget": spec.budget,
                "exempt_share": params.exempt_share, "tables": layout.tables, "rows": layout.rows,
                "chunk": layout.chunk, "exempt": list(layout.exempt), **padded},
    )
