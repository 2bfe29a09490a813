"""numpy twin of post-training row-wise quantisation's lookups (torch: ``recemb.embeddings.quant``).

FBGEMM stores an int8/int4 row as unsigned codes ``q`` with an fp16 ``scale`` and ``bias``
and reads ``q * scale + bias`` in fp32; fp16 rows are plain halves. Export bundles store
their quantised tables in the same layout, so one dequantiser serves both:
``recemb.export.format.dequantize_rows`` (numpy only), applied to the arrays
``QuantizedTableLayer.table_arrays`` gives (``weight``: uint8, int4 packed two per byte,
low nibble first, columns padded to FBGEMM's row alignment; ``scale``; ``bias``). Tests
compare it bit for bit with the quantised torchrec collection's lookups. This module holds
no code of its own: it names the twin where the other variants' twins live.

Example (an int8 row of 4 values as FBGEMM stores it, padded to 16 columns):
    >>> import numpy as np
    >>> from recemb.export.format import dequantize_rows
    >>> arrays = {"weight": np.pad(np.array([[0, 1, 2, 255]], np.uint8), ((0, 0), (0, 12))),
    ...           "scale": np.array([0.25], np.float16), "bias": np.array([-1.0], np.float16)}
    >>> dequantize_rows(arrays, "int8", 4)
    array([[-1.  , -0.75, -0.5 , 62.75]], dtype=float32)
"""

from __future__ import annotations
