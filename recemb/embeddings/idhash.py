"""The id hash of the hashed variants in numpy only: seeds, 64-bit hashes, buckets.

``recemb.embeddings.hashing`` computes the same functions on torch tensors inside the
model; these are their twins for the serving runtime (which must not need torch) and
for the plans (seeds are plain ints derived here). Bit-exact: tests compare both.

Example:
    >>> hash_ids_np(np.array([0, 1, 2]), seed=salted_seed(0, 3), buckets=10).dtype
    dtype('int64')
"""

from __future__ import annotations

import numpy as np

from recemb.data.hashing import mix64

_M1 = 0xBF58476D1CE4E5B9
_MASK64 = (1 << 64) - 1
SEED_SALT = 0x6A09E667F3BCC909  # distinguishes id-hash keys from the data layer's string keys


def seed_key(seed: int) -> int:
    """The 64-bit key (as unsigned int) that a ``seed`` xors into every id."""
    return int(mix64(np.array([(seed ^ SEED_SALT) & _MASK64], dtype=np.uint64))[0])


def salted_seed(seed: int, *salts: int) -> int:
    """One seed from a base seed and integer salts (e.g. feature index, chunk index).

    Example:
        >>> salted_seed(0, 1, 2) != salted_seed(0, 2, 1)
        True
    """
    value = seed & _MASK64
    for salt in salts:
        value = int(mix64(np.array([(value ^ (salt * _M1)) & _MASK64], dtype=np.uint64))[0])
    return value


def hash64_np(ids: np.ndarray, seed: int) -> np.ndarray:
    """Seeded 64-bit hash of int64 ids (uint64 result)."""
    return mix64(np.asarray(ids).astype(np.int64).view(np.uint64) ^ np.uint64(seed_key(seed)))


def hash_ids_np(ids: np.ndarray, seed: int, buckets: int) -> np.ndarray:
    """Ids hashed into ``[0, buckets)`` (int64): the top 63 bits of ``hash64_np`` mod ``buckets``."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    return ((hash64_np(ids, seed) >> np.uint64(1)) % np.uint64(buckets)).astype(np.int64)


def hash_unit_np(ids: np.ndarray, seed: int) -> np.ndarray:
    """A float32 in ``[0, 1)`` per id from its hash (the top 24 bits)."""
    return (hash64_np(ids, seed) >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))
