"""numpy twin of the ``pep`` variant: DeepLight's CSR rows (``recemb.serving.variants.deeplight``).

Stored form (``stored_pep``): CSR of the served weights where ``kept``. Once retraining
(``updates >= params.search_steps``) they are the weights; during the search they are the
soft-thresholded weights ``sign(w) * max(|w| - sigmoid(s), 0)``, ``s`` the layer's
``thresholds`` (``[features or 1, dim or 1]``, broadcast to each feature's rows).
"""

from __future__ import annotations

import numpy as np

from recemb.embeddings.plan import VariantPlan
from recemb.serving.lookup import Arrays, register_np_module, register_np_stored
from recemb.serving.variants.deeplight import csr_encode, sparse_lookup


def soft_threshold_np(plan: VariantPlan, weight: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``sign(w) * max(|w| - sigmoid(s), 0)`` over the stacked table (float32)."""
    g = (1.0 / (1.0 + np.exp(-thresholds.astype(np.float32)))).astype(np.float32)
    per_row = np.repeat(np.arange(len(plan.features)), [plan.full_rows[f] for f in plan.features])
    gate = g[per_row] if g.shape[0] > 1 else np.broadcast_to(g, (weight.shape[0], g.shape[1]))
    return (np.sign(weight) * np.maximum(np.abs(weight) - gate, np.float32(0))).astype(np.float32)


def stored_pep(plan: VariantPlan, tensors: Arrays) -> Arrays:
    """The stored form of a trained ``pep`` layer (module docstring)."""
    p = plan.params
    weight = tensors["weight"]
    if int(np.asarray(tensors["updates"]).reshape(-1)[0]) < int(p["search_steps"]):  # a 0-d or [1] count
        weight = soft_threshold_np(plan, weight, tensors["thresholds"])
    return csr_encode(weight, tensors["kept"], p["indptr_dtype"], p["indices_dtype"])


@register_np_module("pep")
def pep_np(plan: VariantPlan, weights: Arrays, feature: str, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``[B, dim]`` pooled rows; ``weights`` is the stored form (or the layer's tensors, converted first)."""
    csr = weights if "indptr" in weights else stored_pep(plan, weights)
    return sparse_lookup(plan, csr, feature, values, lengths)


register_np_stored("pep")(stored_pep)
