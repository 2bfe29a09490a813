"""The export bundle's layout and its row-wise table codec (numpy only).

A bundle is a folder: ``manifest.json`` (guarded by ``manifest.json.sha256``), table
pieces ``tables/<table>.<row>_<col>.safetensors`` (one per shard of the checkpoint),
plan arrays ``plans/<layer>.<part>.safetensors``, each embedding layer's other tensors
``layers/<layer>.safetensors``, the dense model ``dense.safetensors`` and the data
contract ``data/`` (feature map, vocabularies, dataset config). No pickle anywhere.

Table pieces are stored as ``fp32``, ``fp16`` or row-wise ``int8`` / ``int4`` (values in
``weight``, uint8, int4 packed two per byte, low nibble first; an fp16 ``scale`` and
``bias`` per row, as torchrec/FBGEMM store them; ``dequantize_rows`` reads this layout for
bundles and for torchrec's quantised tables alike). ``quantize_rows`` picks the fp16 bias
at or below the row's minimum and the fp16 scale so that ``bias + levels * scale``
reaches its maximum, so every value lies inside the grid and the stated bound holds:

    |w - dequantize(quantize(w))| <= scale / 2 + 2**-22 * (|bias| + 2 * levels * scale)

per element of a row (``row_bound``); fp16 rows are within ``2**-11 * |w| + 2**-25``.

Example:
    >>> w = np.array([[0.0, 0.5, 1.0, -1.0]], dtype=np.float32)
    >>> arrays = quantize_rows(w, "int8")
    >>> sorted(arrays), arrays["weight"].dtype.name
    (['bias', 'scale', 'weight'], 'uint8')
    >>> bool((np.abs(dequantize_rows(arrays, "int8", 4) - w) <= row_bound(arrays, "int8", 4)[:, None]).all())
    True
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

from recemb.errors import DataError

BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.json.sha256"
DENSE_FILE = "dense.safetensors"
DATA_DIR = "data"
FEATURE_MAP_FILE = "data/feature_map.json"
DATASET_CONFIG_FILE = "data/dataset_config.yaml"

Dtype = Literal["fp32", "fp16", "int8", "int4"]
DTYPES: tuple[str, ...] = get_args(Dtype)
LEVELS = {"int8": 255, "int4": 15}
INT4_MASK = np.uint8(0x0F)
FP16_MAX = 65504.0
FP16_EPS = 2.0**-11  # half an ulp, relative
FP16_SUBNORMAL_HALF_ULP = 2.0**-25
FP32_SLACK = 2.0**-22  # fp32 rounding of the quotient and of the dequantised value (a few ulps)


def table_file(table: str, row: int, col: int) -> str:
    """Bundle path of the piece of ``table`` that starts at ``(row, col)``.

    Example:
        >>> table_file("t_C1", 0, 0)
        'tables/t_C1.0_0.safetensors'
    """
    return f"tables/{table}.{row}_{col}.safetensors"


def check_dtype(dtype: str) -> None:
    """A ``DataError`` naming the known dtypes when ``dtype`` is not one of them."""
    if dtype not in DTYPES:
        raise DataError(f"export dtype '{dtype}' is unknown (known: {', '.join(DTYPES)})")


def _fp16_toward(x: np.ndarray, direction: float) -> np.ndarray:
    """``x`` (fp32) as fp16, rounded toward ``direction`` (-inf: at or below ``x``; +inf: at or above)."""
    h = x.astype(np.float16)
    off = (h.astype(np.float32) > x) if direction < 0 else (h.astype(np.float32) < x)
    h[off] = np.nextafter(h[off], np.float16(direction))
    return h


def quantize_rows(rows: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """``rows`` (``[R, C]`` fp32) stored as ``dtype``: ``{"weight"}`` or ``{"weight", "scale", "bias"}``.

    A value beyond fp16's range cannot be stored as fp16/int8/int4 (scale and bias are fp16):
    a ``DataError`` says to export as fp32.
    """
    check_dtype(dtype)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if dtype == "fp32":
        return {"weight": rows}
    if rows.size and not np.isfinite(rows).all():
        raise DataError("a table holds a non-finite value; the checkpoint is damaged or training diverged")
    if rows.size and float(np.abs(rows).max()) >= FP16_MAX / 2:
        raise DataError(f"a table holds a value beyond fp16's range ({float(np.abs(rows).max()):.3g}); "
                        "export with --dtype fp32")
    if dtype == "fp16":
        return {"weight": rows.astype(np.float16)}
    levels = LEVELS[dtype]
    n, cols = rows.shape
    lo = rows.min(axis=1) if cols else np.zeros(n, np.float32)
    hi = rows.max(axis=1) if cols else np.zeros(n, np.float32)
    bias = _fp16_toward(lo, -np.inf)
    b32 = bias.astype(np.float32)
    scale = _fp16_toward(((hi - b32) / np.float32(levels)).astype(np.float32), np.inf)
    while True:  # the top of the grid must reach the row's maximum in fp32 arithmetic
        short = scale.astype(np.float32) * np.float32(levels) + b32 < hi
        if not short.any():
            break
        scale[short] = np.nextafter(scale[short], np.float16(np.inf))
    s32 = scale.astype(np.float32)
    safe = np.where(s32 > 0, s32, np.float32(1.0))
    q = np.rint((rows - b32[:, None]) / safe[:, None])
    q = np.clip(np.where(s32[:, None] > 0, q, 0.0), 0, levels).astype(np.uint8)
    if dtype == "int4":
        if cols % 2:
            q = np.concatenate([q, np.zeros((n, 1), np.uint8)], axis=1)
        q = (q[:, 0::2] | (q[:, 1::2] << np.uint8(4))).astype(np.uint8)
    return {"weight": np.ascontiguousarray(q), "scale": scale, "bias": bias}


def dequantize_rows(arrays: dict[str, np.ndarray], dtype: str, cols: int,
                    index: np.ndarray | None = None) -> np.ndarray:
    """fp32 rows (``[R, cols]``, or ``[len(index), cols]`` for the rows at ``index``) of stored ``arrays``.

    The one dequantiser of the project: bundles read their tables with it, and it is the
    numpy twin of torchrec/FBGEMM's row-wise lookups (``QuantizedTableLayer.table_arrays``
    gives the same arrays; a test compares them bit for bit). It computes what FBGEMM does,
    ``float(q) * float(scale) + float(bias)`` in fp32; stored columns past ``cols`` (FBGEMM's
    row alignment) are padding and dropped.

    Example (int4, low nibble first):
        >>> arrays = {"weight": np.array([[0x21, 0x0F]], np.uint8),
        ...           "scale": np.array([0.5], np.float16), "bias": np.array([-1.0], np.float16)}
        >>> dequantize_rows(arrays, "int4", 4)
        array([[-0.5,  0. ,  6.5, -1. ]], dtype=float32)
    """
    check_dtype(dtype)
    # np.take along rows: 3x faster than fancy indexing for a gather of rows
    weight = arrays["weight"] if index is None else np.take(arrays["weight"], index, axis=0)
    if dtype in ("fp32", "fp16"):
        return weight[:, :cols].astype(np.float32, copy=False)
    if dtype == "int4":
        unpacked = np.empty((weight.shape[0], weight.shape[1] * 2), np.uint8)
        unpacked[:, 0::2] = weight & INT4_MASK
        unpacked[:, 1::2] = weight >> np.uint8(4)
        weight = unpacked
    scale = arrays["scale"] if index is None else np.take(arrays["scale"], index, axis=0)
    bias = arrays["bias"] if index is None else np.take(arrays["bias"], index, axis=0)
    codes = weight[:, :cols].astype(np.float32)
    return codes * scale.astype(np.float32)[:, None] + bias.astype(np.float32)[:, None]


def row_bound(arrays: dict[str, np.ndarray], dtype: str, cols: int) -> np.ndarray:
    """The stated largest absolute error per row (``[R]``) of stored ``arrays`` against the fp32 rows.

    int8/int4: ``scale / 2 + 2**-22 * (|bias| + 2 * levels * scale)``; fp16:
    ``2**-11 * max |w| + 2**-25`` (from the stored halves); fp32: 0.
    """
    weight = arrays["weight"]
    if dtype == "fp32":
        return np.zeros(weight.shape[0], np.float32)
    if dtype == "fp16":
        top = np.abs(weight.astype(np.float32)).max(axis=1) if cols else np.zeros(weight.shape[0], np.float32)
        return (top * (FP16_EPS / (1 - FP16_EPS)) + FP16_SUBNORMAL_HALF_ULP).astype(np.float32)
    scale = arrays["scale"].astype(np.float64)
    bias = np.abs(arrays["bias"].astype(np.float64))
    return (scale / 2 + FP32_SLACK * (bias + 2 * LEVELS[dtype] * scale)).astype(np.float32)


BOUND_TEXT = {
    "fp32": "exact",
    "fp16": "|w - w16| <= 2**-11 * max|w16| / (1 - 2**-11) + 2**-25 per element of a row",
    "int8": "|w - deq| <= scale/2 + 2**-22 * (|bias| + 2*255*scale) per element of a row",
    "int4": "|w - deq| <= scale/2 + 2**-22 * (|bias| + 2*15*scale) per element of a row",
}


__all__ = ["BOUND_TEXT", "BUNDLE_FORMAT", "DATASET_CONFIG_FILE", "DATA_DIR", "DENSE_FILE", "DTYPES",
           "FEATURE_MAP_FILE", "LEVELS", "MANIFEST", "MANIFEST_DIGEST", "Dtype", "check_dtype", "dequantize_rows",
           "quantize_rows", "row_bound", "table_file"]
