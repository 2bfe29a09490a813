"""numpy twins of the ``unified`` variant: salted multi-probe hashes and the chunk concatenation
(torch: ``recemb.embeddings.unified``)."""

from __future__ import annotations

import numpy as np

from recemb.embeddings.idhash import bucket_ids_np
from recemb.embeddings.plan import VariantPlan
from recemb.serving.lookup import Arrays, register_np_combiner
from recemb.serving.transforms import PhysicalIds, register_np_transform


@register_np_transform("multi_probe")
def multi_probe_np(plan: VariantPlan, feature: str, values: np.ndarray, lengths: np.ndarray) -> list[PhysicalIds]:
    """``unified``: one key per chunk, ``bucket_ids_np(x, chunk seed, rows, hash)``; an exempt feature keeps its ids."""
    spec = plan.transform.params["features"][feature]
    if spec["exempt"]:
        return [PhysicalIds(feature, values, lengths)]
    rows, hash_name = plan.transform.params["rows"], plan.transform.params.get("hash", "splitmix64")
    return [PhysicalIds(c["key"], bucket_ids_np(values, c["seed"], rows, hash_name), lengths) for c in spec["chunks"]]


@register_np_combiner("concat_chunks")
def concat_chunks_np(plan: VariantPlan, feature: str, pooled: Arrays, dense: Arrays) -> np.ndarray:
    """The feature's chunks side by side, in the plan's order."""
    return np.concatenate([pooled[k] for k in plan.combiner.params["groups"][feature]], axis=1)
