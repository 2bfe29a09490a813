"""numpy twin of post-training row-wise quantisation's lookups (torch: ``recemb.embeddings.quant``).

FBGEMM stores an int8/int4 row as unsigned codes ``q`` with an fp16 ``scale`` and ``bias``
and reads ``q * scale + bias`` in fp32; fp16 rows are plain halves. ``dequantize_np``
computes exactly that (bit for bit: tests compare it with the quantised torchrec
collection's lookups), from the arrays ``QuantizedTableLayer.table_arrays`` gives:
``weight`` (uint8, int4 packed two per byte, low nibble first), ``scale``, ``bias``.
"""

from __future__ import annotations

import numpy as np

INT4_MASK = np.uint8(0x0F)


def dequantize_np(arrays: dict[str, np.ndarray], dtype: str, dim: int, rows: np.ndarray | None = None) -> np.ndarray:
    """fp32 rows ``[R, dim]`` (or the ``rows`` given) of a table stored as ``dtype`` (int8, int4 or fp16).

    Example:
        >>> arrays = {"weight": np.array([[0x21, 0x0F]], np.uint8),
        ...           "scale": np.array([0.5], np.float16), "bias": np.array([-1.0], np.float16)}
        >>> dequantize_np(arrays, "int4", 4)
        array([[-0.5,  0. ,  6.5, -1. ]], dtype=float32)
    """
    weight = arrays["weight"] if rows is None else arrays["weight"][rows]
    if dtype == "fp16":
        return weight[:, :dim].astype(np.float32)
    if dtype == "int4":
        unpacked = np.empty((weight.shape[0], weight.shape[1] * 2), np.uint8)
        unpacked[:, 0::2] = weight & INT4_MASK
        unpacked[:, 1::2] = weight >> np.uint8(4)
        weight = unpacked
    elif dtype != "int8":
        raise ValueError(f"unknown quantised dtype '{dtype}' (known: int8, int4, fp16)")
    scale = arrays["scale"] if rows is None else arrays["scale"][rows]
    bias = arrays["bias"] if rows is None else arrays["bias"][rows]
    codes = weight[:, :dim].astype(np.float32)
    return codes * scale.astype(np.float32)[:, None] + bias.astype(np.float32)[:, None]
