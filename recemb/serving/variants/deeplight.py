"""numpy twin of the ``deeplight`` variant: rows from CSR (torch: ``recemb.embeddings.deeplight``).

Stored form (``stored_csr``): the group's stacked table (features one after another at
``params.offsets``) as CSR of its served weights: of the weights the schedule kept (``mask``),
the ``params.nnz`` largest in magnitude, ties to the lowest flat index (``served_mask``, the
torch layer's ``kept``, bit for bit). ``indptr`` (``rows + 1`` row pointers,
``params.indptr_dtype``), ``indices`` (column of each stored value, ``params.indices_dtype``,
ascending within a row), ``values`` (fp32). A row is zeros with its stored values at their
columns; bags sum rows. ``pep`` is stored and read the same way (``recemb.serving.variants.pep``).

Example:
    >>> dense = np.array([[0, 2.0, 0], [0, 0, 0], [1.0, 0, 3.0]], np.float32)
    >>> csr = csr_encode(dense, dense != 0, "int32", "uint8")
    >>> csr["indptr"].tolist(), csr["indices"].tolist(), csr["values"].tolist()
    ([0, 1, 1, 3], [1, 0, 2], [2.0, 1.0, 3.0])
    >>> csr_rows(csr, np.array([2, 1]), 3).tolist()
    [[1.0, 0.0, 3.0], [0.0, 0.0, 0.0]]
"""

from __future__ import annotations

import numpy as np

from recemb.embeddings.plan import VariantPlan
from recemb.serving.lookup import Arrays, register_np_module, register_np_stored, segment_sum


def top_k_np(score: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of the ``k`` largest of a flat ``score``, ties at the cut to the lowest indices
    (``recemb.embeddings.rowwise.top_k_mask``'s rule).

    Example:
        >>> top_k_np(np.array([0.5, 2.0, 0.5, 1.0], np.float32), 3).tolist()
        [True, True, False, True]
    """
    n = score.size
    if k >= n:
        return np.ones(n, bool)
    if k <= 0:
        return np.zeros(n, bool)
    cut = np.partition(score, n - k)[n - k]
    above = score > cut
    tie = score == cut
    return above | (tie & (np.cumsum(tie) <= k - int(above.sum())))


def served_mask(weight: np.ndarray, mask: np.ndarray, nnz: int) -> np.ndarray:
    """DeepLight's served mask: the ``nnz`` largest ``|weight|`` where ``mask``."""
    score = (np.abs(weight) * mask).reshape(-1)
    return top_k_np(score, nnz).reshape(weight.shape)


def csr_encode(values: np.ndarray, kept: np.ndarray, indptr_dtype: str, indices_dtype: str) -> Arrays:
    """CSR (``indptr``, ``indices``, ``values``) of the entries of ``values`` (``[rows, dim]``) where ``kept``."""
    kept = np.asarray(kept, bool)
    row, col = np.nonzero(kept)  # row-major: ascending rows, ascending columns within a row
    indptr = np.zeros(kept.shape[0] + 1, np.int64)
    np.cumsum(kept.sum(axis=1), out=indptr[1:])
    return {"indptr": indptr.astype(indptr_dtype), "indices": col.astype(indices_dtype),
            "values": np.ascontiguousarray(values[row, col], dtype=np.float32)}


def csr_rows(csr: Arrays, rows: np.ndarray, dim: int) -> np.ndarray:
    """``[len(rows), dim]`` float32 rows of the CSR table at (stacked) ``rows``."""
    indptr = csr["indptr"]
    start = indptr[rows].astype(np.int64)
    count = indptr[rows + 1].astype(np.int64) - start
    out = np.zeros((len(rows), dim), np.float32)
    total = int(count.sum())
    if total:
        which = np.repeat(np.arange(len(rows)), count)
        pos = np.arange(total) - np.repeat(np.cumsum(count) - count, count) + np.repeat(start, count)
        out[which, csr["indices"][pos].astype(np.int64)] = csr["values"][pos]
    return out


def stored_csr(plan: VariantPlan, tensors: Arrays) -> Arrays:
    """The stored form of a trained ``deeplight`` layer: CSR of ``weight`` where ``served_mask``."""
    p = plan.params
    kept = served_mask(tensors["weight"], tensors["mask"], int(p["nnz"]))
    return csr_encode(tensors["weight"], kept, p["indptr_dtype"], p["indices_dtype"])


def sparse_lookup(plan: VariantPlan, csr: Arrays, feature: str, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``[B, dim]``: per row, the sum of its ids' CSR rows (``csr``: the stored form)."""
    rows = plan.full_rows[feature]
    if values.size and (values.min() < 0 or values.max() >= rows):
        raise IndexError(f"{feature}: id outside [0, {rows})")
    dim = plan.dims[feature]
    return segment_sum(csr_rows(csr, values + plan.params["offsets"][feature], dim), lengths)


@register_np_module("deeplight")
def deeplight_np(plan: VariantPlan, weights: Arrays, feature: str, values: np.ndarray,
                 lengths: np.ndarray) -> np.ndarray:
    """``[B, dim]`` pooled rows; ``weights`` is the stored form (or the layer's tensors, converted first)."""
    csr = weights if "indptr" in weights else stored_csr(plan, weights)
    return sparse_lookup(plan, csr, feature, values, lengths)


register_np_stored("deeplight")(stored_csr)
