"""numpy twin of the ``hashed`` variant: the per-feature seeded hash (torch: ``recemb.embeddings.hashed``)."""

from __future__ import annotations

import numpy as np

from recemb.embeddings.idhash import hash_ids_np
from recemb.embeddings.plan import VariantPlan
from recemb.serving.transforms import PhysicalIds, register_np_transform


@register_np_transform("hash")
def hash_np(plan: VariantPlan, feature: str, values: np.ndarray, lengths: np.ndarray) -> list[PhysicalIds]:
    """``hashed``: ``hash_ids(x, seed_f, rows_f)`` where the feature is hashed, else identity."""
    spec = plan.transform.params["features"][feature]
    if spec.get("hashed"):
        values = hash_ids_np(values, spec["seed"], spec["rows"])
    return [PhysicalIds(feature, values, lengths)]
