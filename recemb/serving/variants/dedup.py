"""numpy twin of the ``dedup`` variant (the deduplication itself: ``recemb.embeddings.blockdedup``).

Stored form (``stored_dedup``): ``unique [U, block]`` fp32 (``U <= params.unique``; distinct blocks
in order of first use) and ``index [rows, dim / block]`` (``params.index_dtype``): row ``r``'s
slot ``j`` is ``unique[index[r, j]]``, rows stacked as ``params.offsets`` says. The trained
layer's table is already deduplicated (``deduped_at == updates``), so the stored form is an exact
grouping of its equal blocks; a table trained past its last deduplication is deduplicated here
first (``blockdedup.dedup_table``), as the layer does when evaluated.
"""

from __future__ import annotations

import numpy as np

from recemb.embeddings.blockdedup import dedup_table, group_blocks
from recemb.embeddings.plan import VariantPlan
from recemb.serving.lookup import Arrays, register_np_module, register_np_stored, segment_sum


def served_table(plan: VariantPlan, tensors: Arrays) -> np.ndarray:
    """The table a trained layer serves: its ``weight``, deduplicated first when trained past its last deduplication."""
    p = plan.params
    weight = np.asarray(tensors["weight"], np.float32)
    updates, deduped_at = (int(np.asarray(tensors[k]).reshape(-1)[0]) for k in ("updates", "deduped_at"))
    if updates != deduped_at:
        weight, _ = dedup_table(weight, int(p["block"]), int(p["unique"]), float(p["threshold"]), int(p["lsh_seed"]))
    return weight


def stored_dedup(plan: VariantPlan, tensors: Arrays) -> Arrays:
    """The stored form (module docstring) of a trained ``dedup`` layer's tensors."""
    p = plan.params
    index, unique = group_blocks(served_table(plan, tensors), int(p["block"]))
    if unique.shape[0] > int(p["unique"]):
        raise ValueError(f"dedup: {unique.shape[0]:,} distinct blocks, over the plan's {p['unique']:,} (bug?)")
    return {"unique": unique, "index": index.astype(p["index_dtype"])}


def dedup_rows(plan: VariantPlan, stored: Arrays, feature: str, ids: np.ndarray) -> np.ndarray:
    """``[len(ids), dim]`` float32 rows of ``feature``'s ``ids`` from the stored form."""
    rows = plan.full_rows[feature]
    if ids.size and (ids.min() < 0 or ids.max() >= rows):
        raise IndexError(f"{feature}: id outside [0, {rows})")
    slots = stored["index"][ids + plan.params["offsets"][feature]].astype(np.int64)  # [n, dim / block]
    return stored["unique"][slots].reshape(ids.size, plan.dims[feature])


@register_np_module("dedup")
def dedup_np(plan: VariantPlan, weights: Arrays, feature: str, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``[B, dim]`` pooled rows; ``weights`` is the stored form (or the layer's tensors, converted first)."""
    stored = weights if "index" in weights else stored_dedup(plan, weights)
    return segment_sum(dedup_rows(plan, stored, feature, values), lengths)


register_np_stored("dedup")(stored_dedup)
