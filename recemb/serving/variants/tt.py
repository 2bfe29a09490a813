"""numpy twin of the ``tt`` variant: rows contracted from the TT cores (torch: ``recemb.embeddings.tt``).

Weights are the layer's state_dict: ``cores.<feature>.g1 [n1, d1, r]``, ``g2 [n2, r, d2, r]``,
``g3 [n3, r, d3]``. Id ``x`` is the core index triple ``(x // (n2 n3), x // n3 % n2, x % n3)``;
its row is ``g1[i1] g2[i2] g3[i3]`` flattened as ``(d1, d2, d3)``. The plain tables a TT group
keeps for small features are a table plan and take the ordinary lookup.
"""

from __future__ import annotations

import numpy as np

from recemb.embeddings.plan import VariantPlan
from recemb.serving.lookup import Arrays, register_np_module, segment_sum


def tt_rows(g1: np.ndarray, g2: np.ndarray, g3: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``[len(ids), d1*d2*d3]`` float32 rows of ``ids`` from the three cores.

    Example:
        >>> g1, g2, g3 = np.ones((2, 1, 1)), np.ones((2, 1, 2, 1)), np.ones((2, 1, 1))
        >>> tt_rows(g1, g2, g3, np.array([0, 7])).shape
        (2, 2)
    """
    n2, n3 = g2.shape[0], g3.shape[0]
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= g1.shape[0] * n2 * n3):
        raise IndexError(f"TT id outside [0, {g1.shape[0] * n2 * n3})")
    prefix = ids // n3
    # Contract the first two cores first, as the torch layer does: [N, d1, d2, r] then @ g3.
    left = np.einsum("nar,nrbs->nabs", g1[prefix // n2], g2[prefix % n2])
    rows = np.einsum("nabs,nsc->nabc", left, g3[ids % n3])
    return rows.reshape(len(ids), -1).astype(np.float32, copy=False)


@register_np_module("tt")
def tt_np(plan: VariantPlan, weights: Arrays, feature: str, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``[B, dim]``: per row, the sum of its ids' TT rows (each distinct id contracted once)."""
    unique, inverse = np.unique(values, return_inverse=True)
    prefix = f"cores.{feature}."
    rows = tt_rows(weights[prefix + "g1"], weights[prefix + "g2"], weights[prefix + "g3"], unique)
    return segment_sum(rows[inverse.reshape(-1)], lengths)
