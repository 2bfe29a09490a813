"""numpy twin of the ``autodim`` variant: per-field tables at their searched widths, each projected to ``dim``
(torch: ``recemb.embeddings.autodim``).

Stored form (``stored_autodim``, what a bundle keeps of the trained layer; the ``dim``-wide
training table, its optimizer state, the architecture weights and the transforms of the
candidates not chosen stay behind): ``widths`` (int32, one per feature in plan order),
``rows`` (fp32, flat: per feature its ``full_rows[f] x widths[f]`` table, row-major, features
one after another) and ``projections`` (fp32, flat: per feature its ``dim x widths[f]``
transform, likewise). An id's vector is ``projection @ row``; bags sum their vectors.

Example:
    >>> plan = VariantPlan(kind="autodim", features=["a"], dims={"a": 2}, full_rows={"a": 3})
    >>> stored = {"widths": np.array([1], np.int32), "rows": np.array([1.0, 2.0, 3.0], np.float32),
    ...           "projections": np.array([1.0, -1.0], np.float32)}
    >>> autodim_np(plan, stored, "a", np.array([2, 0, 1]), np.array([1, 2])).tolist()
    [[3.0, -3.0], [3.0, -3.0]]
"""

from __future__ import annotations

import numpy as np

from recemb.embeddings.plan import VariantPlan
from recemb.serving.lookup import Arrays, register_np_module, register_np_stored, segment_sum


def stored_autodim(plan: VariantPlan, tensors: Arrays) -> Arrays:
    """The stored form of a trained ``autodim`` layer (module docstring) from its tensors (``weight``,
    ``chosen``, ``proj``)."""
    p = plan.params
    chosen = np.asarray(tensors["chosen"]).reshape(-1).astype(np.int64)
    widths = np.array([p["candidates"][c] for c in chosen], np.int32)
    weight, proj = tensors["weight"], tensors["proj"]
    rows, projections = [], []
    for i, f in enumerate(plan.features):
        lo, d = int(p["offsets"][f]), int(widths[i])
        rows.append(weight[lo:lo + plan.full_rows[f], :d].reshape(-1))
        projections.append(proj[i, chosen[i], :, :d].reshape(-1))
    return {"widths": widths, "rows": np.concatenate(rows).astype(np.float32),
            "projections": np.concatenate(projections).astype(np.float32)}


def feature_arrays(plan: VariantPlan, stored: Arrays, feature: str) -> tuple[np.ndarray, np.ndarray]:
    """``feature``'s table (``[rows, width]``) and transform (``[dim, width]``) in the stored form."""
    i = plan.features.index(feature)
    widths = stored["widths"].astype(np.int64)
    rows = np.array([plan.full_rows[f] for f in plan.features], np.int64)
    dim = plan.dims[feature]
    at_row = int((rows[:i] * widths[:i]).sum())
    at_proj = dim * int(widths[:i].sum())
    d = int(widths[i])
    table = stored["rows"][at_row:at_row + rows[i] * d].reshape(rows[i], d)
    return table, stored["projections"][at_proj:at_proj + dim * d].reshape(dim, d)


@register_np_module("autodim")
def autodim_np(plan: VariantPlan, weights: Arrays, feature: str, values: np.ndarray,
               lengths: np.ndarray) -> np.ndarray:
    """``[B, dim]`` pooled vectors; ``weights`` is the stored form (or the layer's tensors, converted first)."""
    stored = weights if "widths" in weights else stored_autodim(plan, weights)
    table, proj = feature_arrays(plan, stored, feature)
    if values.size and (values.min() < 0 or values.max() >= table.shape[0]):
        raise IndexError(f"{feature}: id outside [0, {table.shape[0]})")
    return segment_sum((table[values] @ proj.T).astype(np.float32), lengths)


register_np_stored("autodim")(stored_autodim)
