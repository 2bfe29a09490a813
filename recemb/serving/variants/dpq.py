"""numpy twin of the ``dpq`` variant: rows from codes and codebooks (torch: ``recemb.embeddings.dpq``).

Stored form (``stored_codes``, what a bundle keeps of the trained layer; the query table, its
optimizer state and softmax's keys stay behind): ``codebook [F, K * dim]`` fp32 (features in plan
order; feature ``f``'s is ``[D_f, K, dim / D_f]``, ``D_f = params.subspaces[f]``), ``codes_hot``
(flat uint8: per feature, the ``D_f`` codes of each of its ids ``0..hot_rows[f]-1``, row after
row; features one after another) and, when some ids are cold (``mgqe``), ``codes_cold`` (the
other ids, likewise). A block whose ``params.hot_bits`` / ``cold_bits`` is 4 holds its codes as
nibbles, two a byte, low nibble first, each feature's block starting on a byte. A row is
``codebook[f][d, code[d]]`` for ``d < D_f``, concatenated; bags sum their rows.

Example:
    >>> packed = pack_nibbles(np.array([1, 15, 7], np.uint8))
    >>> packed.tolist(), nibbles_at(packed, np.array([2, 0, 1])).tolist()
    ([241, 7], [7, 1, 15])
"""

from __future__ import annotations

import numpy as np

from recemb.embeddings.plan import VariantPlan
from recemb.serving.lookup import Arrays, register_np_module, register_np_stored, segment_sum

_LOW = np.uint8(0x0F)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """A flat run of codes below 16 as bytes, two codes a byte (low nibble first)."""
    codes = np.asarray(codes, np.uint8).reshape(-1)
    if codes.size and int(codes.max()) > 15:
        raise ValueError("a 4-bit code is 15 at most")
    if codes.size % 2:
        codes = np.concatenate([codes, np.zeros(1, np.uint8)])
    return np.ascontiguousarray(codes[0::2] | (codes[1::2] << np.uint8(4)))


def nibbles_at(packed: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The codes at ``positions`` of a ``pack_nibbles`` run."""
    return (packed[positions >> 1] >> ((positions & 1) * 4).astype(np.uint8)) & _LOW


def _block_bytes(rows: int, d: int, bits: int) -> int:
    return (rows * d + 1) // 2 if bits == 4 else rows * d


def _starts(plan: VariantPlan) -> tuple[dict[str, int], dict[str, int]]:
    """Each feature's first byte in ``codes_hot`` and in ``codes_cold``."""
    p = plan.params
    hot_at, cold_at, hot_total, cold_total = {}, {}, 0, 0
    for f in plan.features:
        d, hot = int(p["subspaces"][f]), int(p["hot_rows"][f])
        hot_at[f], cold_at[f] = hot_total, cold_total
        hot_total += _block_bytes(hot, d, p["hot_bits"])
        cold_total += _block_bytes(plan.full_rows[f] - hot, d, p["cold_bits"])
    return hot_at, cold_at


def _block(codes: np.ndarray, bits: int) -> np.ndarray:
    return pack_nibbles(codes) if bits == 4 else np.ascontiguousarray(codes, np.uint8).reshape(-1)


def stored_codes(plan: VariantPlan, tensors: Arrays) -> Arrays:
    """The stored form (module docstring) of the layer's tensors: codes split hot/cold and packed, the
    served codebook; nothing else."""
    p = plan.params
    codes, offsets = tensors["codes"], p["offsets"]
    hot, cold = [], []
    for f in plan.features:
        d, start, n_hot = int(p["subspaces"][f]), offsets[f], int(p["hot_rows"][f])
        hot.append(_block(codes[start: start + n_hot, :d], p["hot_bits"]))
        cold.append(_block(codes[start + n_hot: start + plan.full_rows[f], :d], p["cold_bits"]))
    out = {"codebook": np.ascontiguousarray(tensors["codebook"], dtype=np.float32),
           "codes_hot": np.concatenate(hot).astype(np.uint8)}
    cold_codes = np.concatenate(cold).astype(np.uint8)
    if cold_codes.size:
        out["codes_cold"] = cold_codes
    return out


def _read(stream: np.ndarray, start: int, rows: np.ndarray, d: int, bits: int) -> np.ndarray:
    """``[len(rows), d]`` codes of ``rows`` (relative to a block that starts at byte ``start``)."""
    positions = rows[:, None] * d + np.arange(d)[None, :]
    if bits == 4:
        return nibbles_at(stream[start:], positions)
    return stream[start + positions]


def code_rows(plan: VariantPlan, arrays: Arrays, feature: str, ids: np.ndarray) -> np.ndarray:
    """``[len(ids), dim]`` float32 rows of ``feature``'s ``ids`` from stored (or trained) arrays."""
    if "codes_hot" not in arrays:
        arrays = stored_codes(plan, arrays)
    p = plan.params
    rows, dim = plan.full_rows[feature], plan.dims[feature]
    if ids.size and (ids.min() < 0 or ids.max() >= rows):
        raise IndexError(f"{feature}: id outside [0, {rows})")
    d, hot_rows = int(p["subspaces"][feature]), int(p["hot_rows"][feature])
    hot_at, cold_at = _starts(plan)
    hot = ids < hot_rows
    codes = np.empty((ids.size, d), np.uint8)
    codes[hot] = _read(arrays["codes_hot"], hot_at[feature], ids[hot], d, p["hot_bits"])
    if not hot.all():
        codes[~hot] = _read(arrays["codes_cold"], cold_at[feature], ids[~hot] - hot_rows, d, p["cold_bits"])
    book = arrays["codebook"][plan.features.index(feature)].reshape(d, -1, dim // d)  # [D, K, sub]
    return book[np.arange(d)[None, :], codes.astype(np.int64)].reshape(ids.size, dim)


@register_np_module("dpq")
def dpq_np(plan: VariantPlan, weights: Arrays, feature: str, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``[B, dim]``: per row, the sum of its ids' codebook rows."""
    return segment_sum(code_rows(plan, weights, feature, values), lengths)


register_np_stored("dpq")(stored_codes)
