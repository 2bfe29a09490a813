"""numpy twin of the ``mgqe`` variant: DPQ's stored form and lookup (``recemb.serving.variants.dpq``),
with the rare ids' codes in ``codes_cold`` (4-bit, packed, when ``params.cold_bits`` is 4)."""

from __future__ import annotations

from recemb.serving.lookup import register_np_module, register_np_stored
from recemb.serving.variants.dpq import dpq_np, stored_codes

register_np_module("mgqe")(dpq_np)
register_np_stored("mgqe")(stored_codes)
