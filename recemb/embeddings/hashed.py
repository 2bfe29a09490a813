"""The ``hashed`` variant: the hashing trick, one table of fewer rows per feature.

Each feature whose vocabulary is larger than its row count maps id ``x`` to row
``bucket_ids_np(x, seed_f, rows_f, hash)`` (seeded multiply-add-shift by default,
``embedding.hash``; bit-exact in numpy for serving); features that fit keep their ids (no collisions). A ``budget`` picks
the rows by water-filling: every feature gets ``min(vocab, R)`` rows with the
largest cap ``R`` that fits (the remainder one row each to the largest), so
small features stay exact and large ones share about ``R`` rows.

Any ``embedding.dim`` works: at ``dim: 10`` the tables are held 12 wide in training
(``TableEmbeddingLayer.pad_for_fbgemm``) and the budget pays for that padding
(rows cost ``padded_row_bytes``), so the padded layer stays within it.

Example (YAML):
    embedding: {kind: hashed, dim: 16, budget: 0.01}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recemb.embeddings.base import IdTransform, fbgemm_width, jagged, register_transform
from recemb.embeddings.budget import BudgetError, budget_bytes, full_bytes, padded_row_bytes, water_fill
from recemb.embeddings.hashing import hash_keys, hash_segments, salted_seed
from recemb.embeddings.plan import TransformPlan, VariantPlan
from recemb.embeddings.registry import VariantSpec, register_variant
from recemb.errors import ConfigError


@dataclass
class HashedParams:
    """``rows``: the row cap when no budget is given (0 = no cap); ``per_feature``: explicit rows."""

    rows: int = 0
    per_feature: dict[str, int] = field(default_factory=dict)


def hashed_rows(vocab: dict[str, int], dim: int, budget: float | None, params: HashedParams) -> dict[str, int]:
    """Rows per feature: explicit ``per_feature`` first, then the budget's (or ``rows``') cap.

    The budget is a share of the full tables at ``dim`` and pays for rows as training holds
    them (``padded_row_bytes``: a 10-wide row costs 12 floats), so fewer rows fit at widths
    not divisible by 4 and the padded layer stays within the budget.

    Example:
        >>> hashed_rows({"a": 10, "b": 1000}, 4, budget=0.1, params=HashedParams())
        {'a': 10, 'b': 91}
        >>> hashed_rows({"a": 10, "b": 1000}, 10, budget=0.1, params=HashedParams())  # 4,040 bytes: 84 rows of 48
        {'a': 10, 'b': 74}
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
        rows_in_budget = target // padded_row_bytes(dim)
        row_budget = rows_in_budget - sum(fixed.values())
        if fixed and row_budget < len(rest):
            raise BudgetError(
                f"embedding.params.per_feature takes {sum(fixed.values()):,} rows of the budget's "
                f"{rows_in_budget:,}, leaving less than one row for each other feature; "
                "lower per_feature or raise embedding.budget"
            )
        if not rest:
            return fixed
        fitted = dict(zip(rest, water_fill(list(rest.values()), row_budget), strict=True))
        return {f: fixed.get(f, fitted.get(f, 0)) for f in vocab}
    cap = params.rows or max(vocab.values())
    return {f: fixed.get(f, min(v, cap)) for f, v in vocab.items()}


@register_transform("hash")
class HashTransform(IdTransform):
    """Per-feature seeded hash into ``rows[f]`` buckets; features with ``rows[f] >= vocab`` pass through.

    One pass over the whole batch (``hash_segments``): each id's seed key and row count are its
    feature's, gathered by segment, and one hash and one modulo run over all ids; the pass-through
    features' ids are copied back. The KJT keeps the input's keys and lengths.

    Plan params: ``features: {f: {hashed, seed, rows}}`` and ``hash`` (``idhash.HASHES``; absent in
    plans written before it: ``splitmix64``); twin: ``recemb.serving.variants.hashed``.
    """

    def __init__(self, features: dict[str, dict[str, Any]], hash_name: str = "splitmix64") -> None:
        super().__init__()
        self.spec = {f: dict(v) for f, v in features.items()}
        self.hash_name = hash_name
        self._constants: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor, list[int]]] = {}

    @classmethod
    def from_plan(cls, plan: VariantPlan, device: torch.device | None = None) -> HashTransform:
        return cls(plan.transform.params["features"], plan.transform.params.get("hash", "splitmix64"))

    def _per_key(self, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Hash constants (``hash_keys``) and row counts per input key (0 and 1 where it passes through), and the
        indices of the pass-through keys; cached per key order."""
        found = self._constants.get(tuple(keys))
        if found is None:
            hashed = [self.spec[k]["hashed"] for k in keys]
            salts = hash_keys([self.spec[k]["seed"] if h else None for k, h in zip(keys, hashed, strict=True)],
                              self.hash_name)
            rows = torch.tensor([self.spec[k]["rows"] if h else 1 for k, h in zip(keys, hashed, strict=True)])
            found = (salts, rows, [i for i, h in enumerate(hashed) if not h])
            self._constants[tuple(keys)] = found
        return found

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = kjt.keys()
        salts, rows, passed = self._per_key(keys)
        if len(passed) == len(keys):
            return kjt
        lengths_per_key = kjt.length_per_key()
        hashed = hash_segments(kjt.values(), salts, rows, lengths_per_key, keep=passed, hash_name=self.hash_name)
        return jagged(keys, hashed, kjt.lengths(), kjt.stride(), lengths_per_key)


@register_variant("hashed", HashedParams)
def plan_hashed(spec: VariantSpec) -> VariantPlan:
    """One ``rows[f] x dim`` table per feature behind a seeded hash."""
    vocab = spec.vocab
    rows = hashed_rows(vocab, spec.dim, spec.budget, spec.params)
    features = {
        f: {"hashed": rows[f] < vocab[f], "seed": salted_seed(spec.seed, i), "rows": rows[f]}
        for i, f in enumerate(spec.names)
    }
    tables = [spec.table(f"h_{f}", rows[f], spec.dim, [f]) for f in spec.names]
    budget: dict[str, Any] = {"solver": "water_fill", "budget": spec.budget, "rows_cap": spec.params.rows}
    if spec.budget is not None and fbgemm_width(spec.dim) != spec.dim:
        # The width the rows were paid at; only where training pads, so other plans stay as they were.
        budget["padded_dim"] = fbgemm_width(spec.dim)
    return spec.plan("hashed", tables, transform=TransformPlan("hash", {"features": features, "hash": spec.hash_name}),
                     budget=budget)
