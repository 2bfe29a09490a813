"""The ``mde`` variant: mixed-dimension embeddings (Ginart et al., 2021), projected to ``dim``.

Each feature (or each frequency block of a feature, ``blocks > 1``) is its own table
whose width follows the power law ``d = scale * p**alpha`` on the mean per-id
probability ``p`` of its ids (``1/num_embeddings`` per feature; from training counts
per block): rarer ids get narrower rows. Widths are multiples of 4 (FBGEMM) in
``[4, dim]``; a per-table linear projection (counted in the bytes) brings each table
back to ``dim``, and the blocks of a feature add up.

Example (YAML):
    embedding: {kind: mde, dim: 16, budget: 0.01, params: {alpha: 0.3, blocks: 4}}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recemb.embeddings.base import BYTES_PER_FLOAT, Combiner, EmbeddingLayer, IdTransform, TableEmbeddingLayer
from recemb.embeddings.budget import BudgetError, budget_bytes, largest_at_most
from recemb.embeddings.hashing import mix64_torch, salted_seed, seed_key
from recemb.embeddings.registry import VariantSpec, init_fn, register_variant
from recemb.embeddings.robe import ordered_by, signed64
from recemb.errors import ConfigError

_LOW63 = (1 << 63) - 1
MIN_DIM = 4  # FBGEMM's row widths are multiples of 4


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
    """``scale * p**alpha`` rounded to the nearest multiple of 4, clamped to ``[4, dim]``."""
    raw = scale * np.power(probs, alpha)
    return np.clip(MIN_DIM * np.floor(raw / MIN_DIM + 0.5), MIN_DIM, dim).astype(np.int64)


def mde_bytes(rows: np.ndarray, widths: np.ndarray, dim: int) -> int:
    """Table bytes plus the ``width x dim`` projections of the tables narrower than ``dim``."""
    tables = int((rows * widths).sum())
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


class MdeTransform(IdTransform):
    """Logical id -> (table of its frequency block, row): ``id - start``, or its hash when the table is capped.

    Output keys are ``{feature}__m{block}``; each sample's ids go to the key of
    their block (so a key's bag may be empty). A capped table's row is
    ``hash_ids_np(id - start, seed, rows)`` with ``seed = salted_seed(spec_seed, f, block)``.
    """

    def __init__(self, features: list[str], tables: list[MdeTable]) -> None:
        super().__init__()
        self.features = list(features)
        self.tables = list(tables)
        self.keys = [f"{features[t.feature]}__m{t.block}" for t in tables]
        self.max_blocks = max(t.block for t in tables) + 1
        self._plain = self.max_blocks == 1 and not any(t.hashed for t in tables)
        self._consts: dict[str, tuple[torch.Tensor, ...]] = {}

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        # Plain tensors rebuilt per device from python data: no buffer for meta construction to zero.
        key = str(device)
        if key not in self._consts:
            big = torch.iinfo(torch.int64).max
            starts = torch.full((len(self.features), self.max_blocks), big, dtype=torch.int64)
            index = torch.zeros((len(self.features), self.max_blocks), dtype=torch.int64)
            for i, t in enumerate(self.tables):
                starts[t.feature, t.block] = t.start
                index[t.feature, t.block] = i
            per_table = torch.tensor(
                [[t.start, t.rows, int(t.hashed), signed64(seed_key(t.seed))] for t in self.tables],
                dtype=torch.int64,
            )
            self._consts[key] = (starts.to(device), index.to(device), per_table.to(device))
        return self._consts[key]

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        kjt = ordered_by(kjt, self.features)
        values, lengths = kjt.values().to(torch.int64), kjt.lengths()
        if self._plain:
            return KeyedJaggedTensor(keys=self.keys, values=values, lengths=lengths, stride=kjt.stride())
        starts, index, per_table = self._constants(values.device)
        batch = kjt.stride()
        segment = torch.repeat_interleave(
            torch.arange(lengths.numel(), device=values.device), lengths, output_size=values.numel()
        )
        feature = segment // batch
        block = (values.unsqueeze(1) >= starts[feature]).sum(dim=1) - 1
        table = index[feature, block]
        info = per_table[table]
        local = values - info[:, 0]
        h = mix64_torch(local ^ info[:, 3])
        rows = torch.where(info[:, 2].bool(), ((h >> 1) & _LOW63) % info[:, 1], local)
        if self.max_blocks > 1:
            # Values are ordered (feature, sample); the KJT wants (table, sample).
            order = torch.sort(table, stable=True).indices
            rows, table, segment = rows[order], table[order], segment[order]
        sample = segment % batch
        out_lengths = torch.bincount(table * batch + sample, minlength=len(self.tables) * batch)
        return KeyedJaggedTensor(
            keys=self.keys, values=rows, lengths=out_lengths.to(lengths.dtype), stride=batch
        )

    def to_manifest(self) -> dict[str, Any]:
        return {
            "kind": "mixed_dimension",
            "features": self.features,
            "tables": [
                {"key": k, "feature": self.features[t.feature], "block": t.block, "start": t.start,
                 "size": t.size, "width": t.width, "rows": t.rows, "hashed": t.hashed, "seed": t.seed}
                for k, t in zip(self.keys, self.tables, strict=True)
            ],
            "row": "id - start, or hash_ids(id - start, seed, rows) when hashed",
        }


class ProjectSum(Combiner):
    """Projects each table's pooled block to ``dim`` (identity at full width) and adds a feature's blocks."""

    def __init__(
        self, features: list[str], keys: list[str], owners: list[int], widths: list[int], dim: int,
        device: torch.device | None,
    ) -> None:
        super().__init__()
        self.features = list(features)
        self.keys = list(keys)
        self.owners = list(owners)
        self.dim = dim
        self.proj = nn.ModuleDict({
            f"p{i}": nn.Linear(w, dim, bias=False, device=device) for i, w in enumerate(widths) if w != dim
        })

    def forward(self, pooled: KeyedTensor) -> KeyedTensor:
        parts = pooled.to_dict()
        out: list[torch.Tensor | None] = [None] * len(self.features)
        for i, (key, owner) in enumerate(zip(self.keys, self.owners, strict=True)):
            name = f"p{i}"
            vec = self.proj[name](parts[key]) if name in self.proj else parts[key]
            prev = out[owner]
            out[owner] = vec if prev is None else prev + vec
        return KeyedTensor.from_tensor_list(self.features, [v for v in out if v is not None])


@register_variant("mde", MdeParams)
def build_mde(spec: VariantSpec) -> EmbeddingLayer:
    """Per-feature (or per-frequency-block) tables of power-law widths, projected to ``spec.dim``."""
    params: MdeParams = spec.params
    if spec.dim % MIN_DIM:
        raise ConfigError(f"embedding.kind=mde: embedding.dim={spec.dim} must be a multiple of {MIN_DIM}")
    if not 0 <= params.alpha < float("inf") or params.blocks < 1:
        raise ConfigError(
            f"embedding.params: alpha={params.alpha} must be >= 0 and blocks={params.blocks} >= 1"
        )
    target = None
    if spec.budget is not None:
        full = sum(f.num_embeddings for f in spec.features) * spec.dim * BYTES_PER_FLOAT
        target = budget_bytes(spec.budget, full)
    # Blocks multiply the tables (and their minimum bytes): a budget too small for them gets one per feature.
    for n_blocks in dict.fromkeys((params.blocks, 1)):
        layout: list[tuple[int, int, int, int, float]] = []  # feature, block, start, size, p
        for fi, f in enumerate(spec.features):
            counts = spec.id_counts(f.name) if n_blocks > 1 else None
            for b, (start, size, p) in enumerate(frequency_blocks(counts, f.num_embeddings, n_blocks)):
                layout.append((fi, b, start, size, p))
        sizes = [s for _, _, _, s, _ in layout]
        try:
            widths, cap = solve_mde(sizes, [p for *_, p in layout], spec.dim, params.alpha, target)
            break
        except BudgetError:
            if n_blocks == 1:
                raise
    tables = [
        MdeTable(feature=fi, block=b, start=start, size=size, width=int(w),
                 rows=size if cap is None else min(size, cap), seed=salted_seed(spec.seed, fi, b))
        for (fi, b, start, size, _), w in zip(layout, widths, strict=True)
    ]
    features = [f.name for f in spec.features]
    transform = MdeTransform(features, tables)
    configs = [
        EmbeddingBagConfig(
            name=f"{spec.prefix}mde_{features[t.feature]}_{t.block}",
            num_embeddings=t.rows,
            embedding_dim=t.width,
            feature_names=[key],
            pooling=PoolingType.SUM,
            init_fn=init_fn(spec.init_std),
        )
        for t, key in zip(tables, transform.keys, strict=True)
    ]
    combiner = ProjectSum(
        features, transform.keys, [t.feature for t in tables], [t.width for t in tables], spec.dim, spec.device
    )
    layer = TableEmbeddingLayer(
        features=features,
        dims={n: spec.dim for n in features},
        full_rows={f.name: f.num_embeddings for f in spec.features},
        tables=configs,
        transform=transform,
        combiner=combiner,
        device=spec.device,
    )
    layer.sharding = {c.name: spec.sharding for c in configs}
    return layer
