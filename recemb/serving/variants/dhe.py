"""numpy twin of the ``dhe`` variant: hash encoding then the MLP decoder (torch: ``recemb.embeddings.dhe``).

An id's encoding is ``k`` values from its hashes under the feature's seeds (the plan's
``params.seeds``): uniform ``2u - 1``, or Box-Muller normals from pairs of uniforms, where
``u`` is the top 24 bits of the seeded 64-bit hash. The decoder named ``shared`` (or the
feature's own) is Linear layers with ``params.activation`` between them; its weights are
the layer's state_dict entries ``decoders.<name>.<index>.weight`` / ``.bias`` (activations
take the odd indices of the ``nn.Sequential``).
"""

from __future__ import annotations

import math

import numpy as np

from recemb.embeddings.idhash import hash64_np, salted_seed
from recemb.embeddings.plan import VariantPlan
from recemb.serving.lookup import Arrays, register_np_module, segment_sum

UNIT_BITS = 24  # as ``hashing.hash_unit``: the top 24 bits of the 64-bit hash


def encode_np(ids: np.ndarray, seeds: list[int], k: int, encoding: str) -> np.ndarray:
    """``[len(ids), k]`` float32 encoding of ``ids`` from their hashes under ``seeds``.

    Example:
        >>> encode_np(np.array([1, 2]), [5, 6], 2, "uniform").shape
        (2, 2)
    """
    u = np.stack(
        [(hash64_np(ids, s) >> np.uint64(64 - UNIT_BITS)).astype(np.float32) / np.float32(1 << UNIT_BITS)
         for s in seeds], axis=1,
    ).reshape(len(ids), len(seeds))
    if encoding == "uniform":
        return u[:, :k] * np.float32(2.0) - np.float32(1.0)
    if encoding != "gaussian":
        raise ValueError(f"unknown DHE encoding '{encoding}'")
    radius = np.sqrt(np.float32(-2.0) * np.log1p(-u[:, 0::2]))  # 1 - u is in (0, 1]: log is finite
    angle = np.float32(2.0 * math.pi) * u[:, 1::2]
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=2).reshape(len(u), -1)[:, :k]


def dhe_encoding_np(ids: np.ndarray, seed: int, feature_index: int, k: int, encoding: str) -> np.ndarray:
    """The encoding of feature ``feature_index`` of a layer built with ``seed`` (the builder's seeds)."""
    count = k if encoding == "uniform" else k + k % 2
    return encode_np(ids, [salted_seed(seed, feature_index, j) for j in range(count)], k, encoding)


def _activation(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "relu":
        return np.maximum(x, np.float32(0.0))
    if kind == "mish":  # x * tanh(softplus(x)); logaddexp keeps softplus finite for large x
        return x * np.tanh(np.logaddexp(np.float32(0.0), x))
    raise ValueError(f"unknown DHE activation '{kind}'")


def decode_np(codes: np.ndarray, weights: Arrays, name: str, layers: int, activation: str) -> np.ndarray:
    """The decoder ``name``'s ``layers`` Linear layers over ``codes`` (float32)."""
    x = codes.astype(np.float32, copy=False)
    for i in range(layers):
        prefix = f"decoders.{name}.{2 * i}."
        x = x @ weights[prefix + "weight"].T + weights[prefix + "bias"]
        if i < layers - 1:
            x = _activation(x, activation)
    return x.astype(np.float32, copy=False)


@register_np_module("dhe")
def dhe_np(plan: VariantPlan, weights: Arrays, feature: str, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``[B, dim]``: per row, the sum of its ids' decoded encodings (each distinct id once)."""
    p = plan.params
    name = "shared" if p["shared"] else feature
    unique, inverse = np.unique(values, return_inverse=True)
    codes = encode_np(unique, p["seeds"][feature], p["k"], p["encoding"])
    rows = decode_np(codes, weights, name, len(p["decoders"][name]) - 1, p["activation"])
    return segment_sum(rows[inverse.reshape(-1)], lengths)
