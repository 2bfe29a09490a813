"""numpy twins of the ``hybrid`` variant: hot rows below a per-feature threshold, cold ids
also hashed into a shared table, the two lookups added (torch: ``recemb.embeddings.hybrid``)."""

from __future__ import annotations

import numpy as np

from recemb.embeddings.idhash import bucket_ids_np
from recemb.embeddings.plan import VariantPlan
from recemb.serving.lookup import Arrays, register_np_combiner
from recemb.serving.transforms import PhysicalIds, register_np_transform


@register_np_transform("frequency_hybrid")
def frequency_hybrid_np(plan: VariantPlan, feature: str, values: np.ndarray,
                        lengths: np.ndarray) -> list[PhysicalIds]:
    """Hot key: ``min(id, K_f + 1)`` for every id (``K_f + 1`` is the shared cold row); cold
    key: ``bucket_ids_np(id, seed_f, rows, hash)`` for the ids above ``K_f`` only, bag by bag."""
    params = plan.transform.params
    spec = params["features"][feature]
    k = int(plan.arrays["hot_ids"][plan.features.index(feature)])
    cold = values > k
    bag = np.repeat(np.arange(len(lengths)), lengths)
    cold_lengths = np.bincount(bag[cold], minlength=len(lengths)).astype(np.int64)
    return [
        PhysicalIds(spec["hot_key"], np.minimum(values, k + 1), lengths),
        PhysicalIds(spec["cold_key"], bucket_ids_np(values[cold], spec["seed"], params["rows"],
                                                   params.get("hash", "splitmix64")), cold_lengths),
    ]


@register_np_combiner("hot_plus_cold")
def hot_plus_cold_np(plan: VariantPlan, feature: str, pooled: Arrays, dense: Arrays) -> np.ndarray:
    """The feature's hot lookup plus its cold lookup."""
    hot_key, cold_key = plan.combiner.params["parts"][feature]
    return pooled[hot_key] + pooled[cold_key]
