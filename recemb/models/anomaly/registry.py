"""The anomaly family in the top-level model registry: ``ape`` and how it is built from a config.

``build_ape`` builds the entity embeddings through ``build_embedding_layer`` (any variant,
projected to ``embedding.dim`` where a variant gives other widths), optional 4-wide unary
tables next to them (derived like CTR first-order tables, prefix ``unary_``), and the noise
distributions from the feature map's training counts of every entity type.

Example:
    >>> model = build_model(ModelConfig(name="ape", params={"noise_samples": 5}), fm,
    ...                     EmbeddingConfig(kind="unified", budget=0.1))   # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from recemb.config.experiment import EmbeddingConfig
from recemb.data.schema import FeatureMap
from recemb.embeddings.registry import build_embedding_layer
from recemb.errors import ConfigError
from recemb.models.anomaly.ape import APE, APE_METRICS, APEParams
from recemb.models.anomaly.noise import UnigramNoise
from recemb.models.ctr.registry import linear_embedding_config
from recemb.models.registry import ModelEntry, ModelNeeds, register_model


def check_ape_data(params: APEParams, feature_map: FeatureMap | None) -> None:
    """APE reads events: >= 2 single-valued entity types, more than ``noise_types`` of them."""
    if feature_map is None:
        return
    multi = [f.name for f in feature_map.features if f.kind == "multihot"]
    if multi:
        raise ConfigError(f"model 'ape' needs one entity per type and event; multi-valued features {multi} "
                          f"cannot be entity types (make them kind: sparse)")
    types = feature_map.sparse_features
    if len(types) < 2:
        raise ConfigError(f"model 'ape' needs at least 2 entity types (sparse features), the data has {types}")
    if params.noise_types > len(types):
        raise ConfigError(f"model.params.noise_types={params.noise_types} but the events have only "
                          f"{len(types)} entity types")


def noise_counts(feature_map: FeatureMap) -> list[np.ndarray]:
    """Training counts of every entity type's ids; a type without a vocabulary (hashed feature)
    gets one count per id except the OOV id, i.e. uniform noise."""
    out = []
    for name in feature_map.sparse_features:
        counts = feature_map.id_counts(name)
        if counts is None:
            info = feature_map.feature(name)
            counts = np.ones(info.num_embeddings, dtype=np.int64)
            counts[info.oov_id] = 0
        out.append(counts)
    return out


def build_ape(params: APEParams, feature_map: FeatureMap, embedding_cfg: EmbeddingConfig,
              device: torch.device | None = None) -> nn.Module:
    """APE over ``feature_map``'s sparse features (the entity types)."""
    embedding = build_embedding_layer(feature_map, embedding_cfg, device=device, project_to=embedding_cfg.dim)
    unary = None
    if params.unary:
        unary = build_embedding_layer(feature_map, linear_embedding_config(embedding_cfg), device=device,
                                      name_prefix="unary_")
    noise = UnigramNoise(noise_counts(feature_map), exponent=params.noise_exponent, device=device)
    oov_ids = [feature_map.feature(name).oov_id for name in feature_map.sparse_features]
    return APE(embedding, unary, noise, oov_ids, params)


register_model(ModelEntry(
    name="ape", family="anomaly", params=APEParams,
    build=build_ape,
    needs=ModelNeeds(equal_dims=True, linear=False), metrics=APE_METRICS, check=check_ape_data,
))
