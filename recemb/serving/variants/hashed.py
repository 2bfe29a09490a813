"""numpy twin of the ``hashed`` variant: the per-feature seeded hash (torch: ``recemb.embeddings.hashed``)."""

from __future__ import annotations

import numpy as np

from recemb.embeddings.idhash import bucket_ids_np
from recemb.embeddings.plan import VariantPlan
from recemb.serving.transforms import PhysicalIds, register_np_transform


@register_np_transform("hash")
def hash_np(plan: VariantPlan, feature: str, values: np.ndarray, lengths: np.ndarray) -> list[PhysicalIds]:
    """``hashed``: ``bucket_ids_np(x, seed_f, rows_f, hash)`` where the feature is hashed, else identity
    (``hash``: the plan's, ``splitmix64`` in plans that name none)."""
    spec = plan.transform.params["features"][feature]
    if spec.get("hashed"):
        values = bucket_ids_np(values, spec["seed"], spec["rows"], plan.transform.params.get("hash", "splitmix64"))
    return [PhysicalIds(feature, values, lengths)]
