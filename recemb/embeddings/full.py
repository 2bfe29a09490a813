"""The ``full`` variant: one uncompressed table per feature (or shared where asked).

Logical ids are physical ids; the tables are plain torchrec configs, so every
sharding type and FBGEMM's fused optimizers apply. This is the byte baseline
that every compressed variant is measured against.

Example (YAML):
    embedding: {kind: full, dim: 16, params: {shared: [[C3, C4]]}}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from recemb.embeddings.plan import TablePlan, VariantPlan
from recemb.embeddings.registry import VariantSpec, register_variant
from recemb.errors import ConfigError


@dataclass
class FullParams:
    """``shared``: lists of features that use one table (sized to the largest)."""

    shared: list[list[str]] = field(default_factory=list)


@register_variant("full", FullParams)
def plan_full(spec: VariantSpec) -> VariantPlan:
    """One table per feature, ``spec.dim`` wide; features in a ``shared`` list share one."""
    params: FullParams = spec.params
    if spec.budget is not None:
        raise ConfigError(
            "embedding.kind=full takes no budget (it is the uncompressed baseline); pick a compressed kind "
            "such as unified or hashed, or drop embedding.budget"
        )
    vocab = spec.vocab
    grouped: dict[str, list[str]] = {}
    for i, names in enumerate(params.shared):
        unknown = [n for n in names if n not in vocab]
        if unknown:
            raise ConfigError(f"embedding.params.shared[{i}]: unknown feature '{unknown[0]}'")
        grouped[f"shared{i}"] = list(names)
    taken = {n for names in grouped.values() for n in names}
    for f in spec.names:
        if f not in taken:
            grouped[f"t_{f}"] = [f]
    tables: list[TablePlan] = [
        spec.table(table, max(vocab[n] for n in names), spec.dim, names) for table, names in grouped.items()
    ]
    return spec.plan("full", tables, budget={"solver": "none"})
