"""numpy twin of the ``autosrh`` variant: rows from per-group dense blocks (torch: ``recemb.embeddings.autosrh``).

Stored form (``stored_autosrh``): the group's stacked table (features one after another at
``params.offsets``), each feature's ids in frequency groups of ``params.group_rows`` ids (a
"slot" per feature and group, in order). ``kept`` (uint8 ``[slots, ceil(dim / 8)]``): each
slot's dim mask, packed bits (``np.packbits``, big-endian within a byte); ``values`` (fp32): for
each slot in order, its rows' kept columns, row after row (a ``rows_g x kept_g`` block). While
the layer is still searching (``updates < params.search_steps``) the values are the rows times
their slot's ``alpha`` row (``scope: group``: the group's, shared by the features), as served.

Example:
    >>> plan = VariantPlan(kind="autosrh", features=["a"], dims={"a": 2}, full_rows={"a": 3},
    ...                    params={"offsets": {"a": 0}, "group_rows": {"a": [1, 2]}})
    >>> stored = {"kept": np.packbits(np.array([[1, 1], [0, 1]], np.uint8), axis=1),
    ...           "values": np.array([1, 2, 3, 4], np.float32)}
    >>> autosrh_np(plan, stored, "a", np.array([0, 2, 1]), np.array([1, 2])).tolist()
    [[1.0, 2.0], [0.0, 7.0]]
"""

from __future__ import annotations

import numpy as np

from recemb.embeddings.plan import VariantPlan
from recemb.serving.lookup import Arrays, register_np_module, register_np_stored, segment_sum


def slot_starts(plan: VariantPlan) -> np.ndarray:
    """First stacked row of every slot, and the table's rows at the end (int64, ``slots + 1``)."""
    sizes = [n for f in plan.features for n in plan.params["group_rows"][f]]
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)


def stored_autosrh(plan: VariantPlan, tensors: Arrays) -> Arrays:
    """The stored form of a trained ``autosrh`` layer (module docstring)."""
    p = plan.params
    weight = tensors["weight"].astype(np.float32, copy=False)
    kept = np.asarray(tensors["kept"], bool)
    starts = slot_starts(plan)
    per_row = np.repeat(np.arange(kept.shape[0]), np.diff(starts))
    if int(np.asarray(tensors["updates"]).reshape(-1)[0]) < int(p["search_steps"]):  # a 0-d or [1] count
        alpha = tensors["alpha"].astype(np.float32, copy=False)
        weight = weight * alpha[per_row if p["scope"] == "field_group" else per_row % int(p["groups"])]
    values = weight[kept[per_row]]  # row-major: slot after slot, row after row, kept columns ascending
    return {"kept": np.packbits(kept.astype(np.uint8), axis=1),
            "values": np.ascontiguousarray(values, dtype=np.float32)}


def stored_rows(plan: VariantPlan, stored: Arrays, rows: np.ndarray, dim: int) -> np.ndarray:
    """``[len(rows), dim]`` float32 rows of the stored table at (stacked) ``rows``."""
    kept = np.unpackbits(stored["kept"], axis=1, count=dim).astype(bool)
    starts = slot_starts(plan)
    width = kept.sum(axis=1).astype(np.int64)
    block = np.concatenate([[0], np.cumsum(np.diff(starts) * width)])[:-1]
    slot = np.searchsorted(starts, rows, side="right") - 1
    count = width[slot]
    base = block[slot] + (rows - starts[slot]) * count
    out = np.zeros((len(rows), dim), np.float32)
    total = int(count.sum())
    if total:
        which = np.repeat(np.arange(len(rows)), count)
        j = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
        columns = np.argsort(~kept, axis=1, kind="stable")  # each slot's kept columns first, ascending
        out[which, columns[slot[which], j]] = stored["values"][np.repeat(base, count) + j]
    return out


@register_np_module("autosrh")
def autosrh_np(plan: VariantPlan, weights: Arrays, feature: str, values: np.ndarray,
               lengths: np.ndarray) -> np.ndarray:
    """``[B, dim]`` pooled rows; ``weights`` is the stored form (or the layer's tensors, converted first)."""
    stored = weights if "values" in weights else stored_autosrh(plan, weights)
    rows = plan.full_rows[feature]
    if values.size and (values.min() < 0 or values.max() >= rows):
        raise IndexError(f"{feature}: id outside [0, {rows})")
    dim = plan.dims[feature]
    return segment_sum(stored_rows(plan, stored, values + plan.params["offsets"][feature], dim), lengths)


register_np_stored("autosrh")(stored_autosrh)
