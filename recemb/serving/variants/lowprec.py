"""numpy twin of the ``lowprec`` variant: dequantised int rows (torch: ``recemb.embeddings.lowprec``).

Weights are the layer's state_dict: ``table`` (int8/int16 codes ``[total_rows, dim]``, the
features stacked at ``params.offsets``) and ``log_scale`` (fp32 log step sizes, one per
row or one for the table). A row is ``codes * exp(log_scale)``; bags sum their rows.
"""

from __future__ import annotations

import numpy as np

from recemb.embeddings.plan import VariantPlan
from recemb.serving.lookup import Arrays, register_np_module, segment_sum


def dequantize_np(table: np.ndarray, log_scale: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``[len(rows), dim]`` float32: the codes of ``rows`` times their step sizes.

    Example:
        >>> dequantize_np(np.array([[2, -4]], np.int8), np.log(np.array([0.5], np.float32)), np.array([0]))
        array([[ 1., -2.]], dtype=float32)
    """
    scale = np.exp(log_scale.astype(np.float32, copy=False))
    codes = table[rows].astype(np.float32)
    return codes * (scale[rows][:, None] if scale.size > 1 else scale.reshape(1, 1))


@register_np_module("lowprec")
def lowprec_np(plan: VariantPlan, weights: Arrays, feature: str, values: np.ndarray,
               lengths: np.ndarray) -> np.ndarray:
    """``[B, dim]``: per row, the sum of its ids' dequantised rows."""
    rows_of_feature = plan.full_rows[feature]
    if values.size and (values.min() < 0 or values.max() >= rows_of_feature):
        raise IndexError(f"{feature}: id outside [0, {rows_of_feature})")
    rows = values + plan.params["offsets"][feature]
    return segment_sum(dequantize_np(weights["table"], weights["log_scale"], rows), lengths)
