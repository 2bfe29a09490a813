"""numpy twins of the ``mde`` variant: ids split into frequency-block tables (capped tables
hash), each block projected to the model's dim and a feature's blocks added
(torch: ``recemb.embeddings.mde``)."""

from __future__ import annotations

import numpy as np

from recemb.embeddings.idhash import bucket_ids_np
from recemb.embeddings.plan import VariantPlan
from recemb.serving.lookup import Arrays, register_np_combiner
from recemb.serving.transforms import PhysicalIds, register_np_transform


@register_np_transform("mixed_dim")
def mixed_dim_np(plan: VariantPlan, feature: str, values: np.ndarray, lengths: np.ndarray) -> list[PhysicalIds]:
    """One key per block table of ``feature``: the ids in ``[start, start + size)``, as
    ``id - start`` or, in a capped table, ``bucket_ids_np(id - start, seed, rows, hash)``."""
    tables = [t for t in plan.transform.params["tables"] if t["feature"] == feature]
    hash_name = plan.transform.params.get("hash", "splitmix64")
    starts = np.array([t["start"] for t in tables], dtype=np.int64)
    block = np.searchsorted(starts, values, side="right") - 1
    bag = np.repeat(np.arange(len(lengths)), lengths)
    out = []
    for b, t in enumerate(tables):
        mine = block == b
        local = values[mine] - t["start"]
        rows = bucket_ids_np(local, t["seed"], t["rows"], hash_name) if t["hashed"] else local
        out.append(PhysicalIds(t["key"], rows, np.bincount(bag[mine], minlength=len(lengths)).astype(np.int64)))
    return out


@register_np_combiner("project_sum")
def project_sum_np(plan: VariantPlan, feature: str, pooled: Arrays, dense: Arrays) -> np.ndarray:
    """Sum over the feature's blocks of ``pooled @ W.T`` (``W = combiner.proj.p{i}.weight``,
    ``[dim, width]``; the block itself at full width)."""
    total: np.ndarray | None = None
    for t in plan.combiner.params["inputs"]:
        if t["feature"] != feature:
            continue
        vec = pooled[t["key"]]
        if t["proj"]:
            vec = vec @ dense[f"combiner.proj.{t['proj']}.weight"].T
        total = vec if total is None else total + vec
    if total is None:
        raise KeyError(f"mde: feature '{feature}' has no tables in the plan")
    return total
