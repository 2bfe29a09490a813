"""The ``full`` variant: one uncompressed table per feature (or shared where asked).

Logical ids are physical ids; the tables are plain torchrec configs, so every
sharding type and FBGEMM's fused optimizers apply. This is the byte baseline
that every compressed variant is measured against.

Example (YAML):
    embedding: {kind: full, dim: 16, params: {shared: [[C3, C4]]}}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from recemb.embeddings.base import EmbeddingLayer, TableEmbeddingLayer
from recemb.embeddings.registry import VariantSpec, init_fn, register_variant
from recemb.errors import ConfigError


@dataclass
class FullParams:
    """``shared``: lists of features that use one table (sized to the largest)."""

    shared: list[list[str]] = field(default_factory=list)


@register_variant("full", FullParams)
def build_full(spec: VariantSpec) -> EmbeddingLayer:
    """One table per feature, ``spec.dim`` wide; features in a ``shared`` list share one."""
    params: FullParams = spec.params
    if spec.budget is not None:
        raise ConfigError(
            "embedding.kind=full takes no budget (it is the uncompressed baseline); pick a compressed kind "
            "such as unified or hashed, or drop embedding.budget"
        )
    by_name = {f.name: f for f in spec.features}
    grouped: dict[str, list[str]] = {}
    for i, names in enumerate(params.shared):
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ConfigError(f"embedding.params.shared[{i}]: unknown feature '{unknown[0]}'")
        grouped[f"{spec.prefix}shared{i}"] = list(names)
    taken = {n for names in grouped.values() for n in names}
    tables: list[EmbeddingBagConfig] = []
    for f in spec.features:
        if f.name not in taken:
            grouped[f"{spec.prefix}t_{f.name}"] = [f.name]
    for table, names in grouped.items():
        tables.append(EmbeddingBagConfig(
            name=table,
            num_embeddings=max(by_name[n].num_embeddings for n in names),
            embedding_dim=spec.dim,
            feature_names=names,
            pooling=PoolingType.SUM,
            init_fn=init_fn(spec.init_std),
        ))
    features = [f.name for f in spec.features]
    layer = TableEmbeddingLayer(
        features=features,
        dims={n: spec.dim for n in features},
        full_rows={f.name: f.num_embeddings for f in spec.features},
        tables=tables,
        device=spec.device,
    )
    layer.sharding = {t.name: spec.sharding for t in tables}
    return layer
