"""numpy twins of the ``pruned`` variant: the remap (-1 = pruned, dropped from its bag) and the
layer's lookup with its zero/OOV fill (torch: ``recemb.embeddings.pruned``).

``pruned`` is a module variant (its layer, not a combiner, sees which bags the remap emptied),
so its lookup is one function: remap, gather and sum from the compact table, then the OOV
vector for every bag left empty (all ids pruned, or no ids at all).
"""

from __future__ import annotations

import numpy as np

from recemb.embeddings.plan import VariantPlan
from recemb.serving.lookup import Arrays, pooled_lookup, register_np_module, table_of_keys
from recemb.serving.transforms import PhysicalIds, apply_transform, register_np_transform


@register_np_transform("remap")
def remap_np(plan: VariantPlan, feature: str, values: np.ndarray, lengths: np.ndarray) -> list[PhysicalIds]:
    """Ids -> compact rows through the feature's ``remap/<f>`` array; pruned ids (-1) leave their bags."""
    rows = plan.arrays[f"remap/{feature}"][values].astype(np.int64)
    keep = rows >= 0
    bag = np.repeat(np.arange(len(lengths)), lengths)
    kept = np.bincount(bag[keep], minlength=len(lengths)).astype(np.int64)
    return [PhysicalIds(feature, rows[keep], kept)]


@register_np_module("pruned")
def pruned_lookup_np(plan: VariantPlan, weights: Arrays, feature: str, values: np.ndarray,
                     lengths: np.ndarray) -> np.ndarray:
    """``[B, dims[f]]``: sum of the kept rows per bag; an empty bag reads zeros, or the feature's slice of
    the layer's flat ``oov`` parameter with ``pruned_vector: oov``."""
    (ids,) = apply_transform(plan, feature, values, lengths)
    dim = plan.dims[feature]
    table = table_of_keys(plan).get(feature)
    out = np.zeros((len(lengths), dim), dtype=np.float32) if table is None else pooled_lookup(weights[table.name], ids)
    if plan.params["pruned_vector"] == "oov":
        lo = sum(plan.dims[f] for f in plan.features[: plan.features.index(feature)])
        empty = (ids.lengths == 0).astype(np.float32)[:, None]
        out = out + empty * weights["oov"][lo: lo + dim][None, :]
    return out
