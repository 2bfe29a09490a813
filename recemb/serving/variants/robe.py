"""numpy twins of the ``robe`` variant: hashed blocks with ±1 signs, concatenated
(torch: ``recemb.embeddings.robe``)."""

from __future__ import annotations

import numpy as np

from recemb.embeddings.idhash import hash64_np, mulshift_rows_np, mulshift_z_np
from recemb.embeddings.plan import VariantPlan
from recemb.serving.lookup import Arrays, register_np_combiner
from recemb.serving.transforms import PhysicalIds, register_np_transform


@register_np_transform("robe_z")
def robe_z_np(plan: VariantPlan, feature: str, values: np.ndarray, lengths: np.ndarray) -> list[PhysicalIds]:
    """One key per block of ``feature``: row = top 63 bits of the block's splitmix64 hash mod ``rows``,
    weight = ``1 - 2 * (hash & 1)`` when ``signed`` (no weights otherwise); with the plan's ``hash``
    ``mulshift``, row = ``mulshift_rows_np(z)`` and weight ``1 - 2 * ((z >> 31) & 1)`` for
    ``z = a * id + b``."""
    params = plan.transform.params
    rows, signed = np.uint64(params["rows"]), params["signed"]
    out = []
    for block in params["blocks"][feature]:
        if params.get("hash", "splitmix64") == "mulshift":
            z = mulshift_z_np(values, block["seed"])
            weights = (1.0 - 2.0 * ((z >> np.uint64(31)) & np.uint64(1)).astype(np.float32)) if signed else None
            out.append(PhysicalIds(block["key"], mulshift_rows_np(z, int(rows)), lengths, weights))
            continue
        h = hash64_np(values, block["seed"])
        ids = ((h >> np.uint64(1)) % rows).astype(np.int64)
        weights = (1.0 - 2.0 * (h & np.uint64(1)).astype(np.float32)) if signed else None
        out.append(PhysicalIds(block["key"], ids, lengths, weights))
    return out


@register_np_combiner("block_concat")
def block_concat_np(plan: VariantPlan, feature: str, pooled: Arrays, dense: Arrays) -> np.ndarray:
    """The feature's pooled blocks side by side, in block order, cut to the plan's ``dim`` where the
    blocks cover more (a dim not divisible by 4: the last block is read for its first floats only)."""
    params = plan.combiner.params
    vec = np.concatenate([pooled[k] for k in params["blocks"][feature]], axis=1)
    return vec[:, :params["dim"]] if "dim" in params else vec
