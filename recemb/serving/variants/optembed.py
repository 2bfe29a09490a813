"""numpy twin of the ``optembed`` supernet's mask combiner (torch: ``recemb.embeddings.optembed.OptEmbedMask``).

The supernet's transform is the identity and its tables are full; what is its own is the
learned row mask: a pooled vector whose L1 norm is at or under its field's threshold is
pruned (zero, or the field's learned OOV vector). This applies it as the torch layer does
in eval mode at full dims (the search's ``eval_dims`` are not part of the plan).
"""

from __future__ import annotations

import numpy as np

from recemb.embeddings.plan import VariantPlan
from recemb.serving.lookup import Arrays, register_np_combiner


@register_np_combiner("optembed_mask")
def optembed_mask_np(plan: VariantPlan, feature: str, pooled: Arrays, dense: Arrays) -> np.ndarray:
    """``e * keep + (1 - keep) * oov_f`` with ``keep = |e|_1 - t_f > 0`` (``oov_f`` 0 without OOV vectors).

    ``dense`` holds the combiner's parameters by their key under the layer (``combiner.thresholds``,
    ``combiner.oov``); one threshold serves every field with ``threshold_scope: global``.
    """
    e = pooled[feature]
    i = plan.features.index(feature)
    thresholds = dense["combiner.thresholds"]
    t = thresholds[i if thresholds.size > 1 else 0]
    keep = ((np.abs(e).sum(axis=-1) - t) > 0).astype(e.dtype)[:, None]
    out = e * keep
    if "oov" in plan.combiner.dense:
        out = out + (1.0 - keep) * dense["combiner.oov"][i][None, :]
    return out
