"""numpy twins of the ``qr`` variant: quotient/remainder split and its combiner (torch: ``recemb.embeddings.qr``)."""

from __future__ import annotations

import numpy as np

from recemb.embeddings.idhash import bucket_ids_np
from recemb.embeddings.plan import VariantPlan
from recemb.serving.lookup import Arrays, register_np_combiner
from recemb.serving.transforms import PhysicalIds, register_np_transform


@register_np_transform("qr")
def qr_np(plan: VariantPlan, feature: str, values: np.ndarray, lengths: np.ndarray) -> list[PhysicalIds]:
    """``qr``: ids hashed into ``buckets`` first where set, then keys ``f__q`` (``x // m``) and ``f__r``
    (``x % m``); a feature with modulus 0 keeps its ids (a full table)."""
    spec = plan.transform.params["features"][feature]
    if spec["buckets"]:
        values = bucket_ids_np(values, spec["seed"], spec["buckets"], plan.transform.params.get("hash", "splitmix64"))
    m = spec["modulus"]
    if not m:
        return [PhysicalIds(feature, values, lengths)]
    # numpy // and % floor as torch.div(rounding_mode="floor") and torch % do, negative ids included.
    return [PhysicalIds(f"{feature}__q", values // m, lengths), PhysicalIds(f"{feature}__r", values % m, lengths)]


@register_np_combiner("qr")
def qr_combine_np(plan: VariantPlan, feature: str, pooled: Arrays, dense: Arrays) -> np.ndarray:
    """``q * r``, ``q + r`` or ``[q, r]`` for a split feature (``op``), the table's vector otherwise."""
    if feature not in plan.combiner.params["split"]:
        return pooled[feature]
    q, r = pooled[f"{feature}__q"], pooled[f"{feature}__r"]
    op = plan.combiner.params["op"]
    return q * r if op == "mult" else q + r if op == "add" else np.concatenate([q, r], axis=1)
