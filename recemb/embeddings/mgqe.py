"""The ``mgqe`` variant: multi-granular quantized embeddings (Kang et al., WWW 2020).

DPQ (``recemb.embeddings.dpq``) with two granularities: the frequent ids of each feature
(the top ``hot_share`` of its ids by training count, ``FeatureMap.id_counts``) take any of
``K`` centroids per sub-vector, the rare ids only the first ``cold_centroids`` of the same
codebooks (nested, as in the paper). With ``cold_centroids <= 16`` the rare rows' codes are
4 bits each (packed two a byte), so at equal bytes the budget can afford more sub-vectors (a
finer code) than DPQ: the solver picks ``D`` and ``K`` as for DPQ with the cheaper rare rows.
Rare ids see few examples, so a coarser code costs them little.

Preparation numbers each feature's ids by training count, so the hot ids are an id prefix
(``0..n-1``, with the OOV bucket 0): the plan records ``n`` per feature, no id list.
numpy twin: ``recemb.serving.variants.mgqe``.

Example (YAML):
    embedding: {kind: mgqe, dim: 16, budget: 0.1, params: {hot_share: 0.1, cold_centroids: 16}}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recemb.embeddings.base import EmbeddingLayer
from recemb.embeddings.dpq import DPQParams, ProductQuantizedLayer, plan_product_quantized
from recemb.embeddings.plan import VariantPlan
from recemb.embeddings.registry import VariantSpec, register_module_assembler, register_variant
from recemb.errors import ConfigError


@dataclass
class MGQEParams(DPQParams):
    """DPQ's settings plus ``hot_share`` (the share of each feature's ids, by training count, that may
    use every centroid; in (0, 1]) and ``cold_centroids`` (the centroids the other ids may use;
    at most 16 gives 4-bit codes)."""

    hot_share: float = 0.1
    cold_centroids: int = 16


@register_variant("mgqe", MGQEParams)
def plan_mgqe(spec: VariantSpec) -> VariantPlan | EmbeddingLayer:
    """Product-quantized rows, fewer centroids for rare ids; see the module docstring."""
    params: MGQEParams = spec.params
    if not 0 < params.hot_share <= 1:
        raise ConfigError(f"embedding.params.hot_share must be in (0, 1], got {params.hot_share}")
    if not 2 <= params.cold_centroids <= params.centroids:
        raise ConfigError(f"embedding.params.cold_centroids must be in 2..centroids ({params.centroids}), "
                          f"got {params.cold_centroids}")
    return plan_product_quantized(spec, "mgqe", params, hot_share=params.hot_share,
                                  cold_centroids=params.cold_centroids)


@register_module_assembler("mgqe")
def assemble_mgqe(plan: VariantPlan, device: torch.device | None = None) -> ProductQuantizedLayer:
    """The product-quantized layer of an ``mgqe`` module plan."""
    return ProductQuantizedLayer.from_plan(plan, device)


__all__ = ["MGQEParams", "plan_mgqe"]
