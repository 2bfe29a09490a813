"""The id hash of the hashed variants in numpy only: seeds, 64-bit hashes, buckets.

Two bucket hashes exist (``HASHES``): ``splitmix64`` (the top 63 bits of splitmix64's
finaliser of ``id ^ key(seed)``, mod the row count: a dozen passes over the ids and an
integer division) and ``mulshift`` (multiply-add-shift: the top 32 bits of
``a * id + b`` mod 2^64 for a seeded odd ``a`` and a seeded ``b``, mapped onto the rows by
a multiply and a shift, four passes). Multiply-add-shift is Dietzfelbinger's universal
hash for ids below 2^32 (every vocabulary id): two distinct ids share a bucket with
probability about ``1/rows`` over the seeds, which is all the hashing trick asks. A plan
names its hash (``TransformPlan.params["hash"]``); plans written before ``mulshift`` name
none and mean ``splitmix64``, so their ids land on the same rows as when they were trained.

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
HASHES = ("splitmix64", "mulshift")
MULSHIFT_MAX_BUCKETS = 1 << 31  # the 32-bit hash times the row count stays below 2**63 (int64 in torch)
_MULSHIFT_SALT = 0x3C6EF372FE94F82B  # derives the added constant ``b`` from the seed's key
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


def mulshift_key(seed: int) -> tuple[int, int]:
    """The multiplier (odd) and the addend of ``mulshift`` for ``seed``, as unsigned 64-bit ints.

    Example:
        >>> a, b = mulshift_key(7)
        >>> a % 2, 0 <= b < 1 << 64
        (1, True)
    """
    key = seed_key(seed)
    return key | 1, int(mix64(np.array([key ^ _MULSHIFT_SALT], dtype=np.uint64))[0])


def mulshift_ids_np(ids: np.ndarray, seed: int, buckets: int) -> np.ndarray:
    """Ids hashed into ``[0, buckets)`` (int64) by multiply-add-shift: ``u = (a * id + b) >> 32`` (the
    top 32 bits, mod 2^64), then ``(u * buckets) >> 32`` (a multiply and a shift instead of a modulo).

    Example:
        >>> out = mulshift_ids_np(np.arange(1000), seed=3, buckets=10)
        >>> bool(out.min() >= 0 and out.max() < 10), len(set(out.tolist()))
        (True, 10)
    """
    if not 1 <= buckets <= MULSHIFT_MAX_BUCKETS:
        raise ValueError(f"buckets must be in [1, 2**31] for mulshift, got {buckets}")
    return mulshift_rows_np(mulshift_z_np(ids, seed), buckets)


def mulshift_z_np(ids: np.ndarray, seed: int) -> np.ndarray:
    """``a * id + b`` mod 2^64 (uint64) for ``seed``'s constants: what ``mulshift`` buckets take
    their top 32 bits from (ROBE's sign is bit 31, the highest one they do not use)."""
    a, b = mulshift_key(seed)
    with np.errstate(over="ignore"):  # arithmetic mod 2^64 is the point
        return np.asarray(ids).astype(np.int64).view(np.uint64) * np.uint64(a) + np.uint64(b)


def mulshift_rows_np(z: np.ndarray, buckets: int) -> np.ndarray:
    """Rows ``[0, buckets)`` (int64) from ``mulshift_z_np``'s values: ``((z >> 32) * buckets) >> 32``."""
    return (((z >> np.uint64(32)) * np.uint64(buckets)) >> np.uint64(32)).astype(np.int64)


def bucket_ids_np(ids: np.ndarray, seed: int, buckets: int, hash_name: str = "splitmix64") -> np.ndarray:
    """Ids hashed into ``[0, buckets)`` by the plan's hash (``HASHES``; ``splitmix64``: ``hash_ids_np``).

    Example:
        >>> bucket_ids_np(np.array([5]), 1, 10, "mulshift").tolist() == mulshift_ids_np(np.array([5]), 1, 10).tolist()
        True
    """
    if hash_name == "mulshift":
        return mulshift_ids_np(ids, seed, buckets)
    if hash_name == "splitmix64":
        return hash_ids_np(ids, seed, buckets)
    raise ValueError(f"unknown id hash '{hash_name}' (known: {', '.join(HASHES)})")


def hash_unit_np(ids: np.ndarray, seed: int) -> np.ndarray:
    """A float32 in ``[0, 1)`` per id from its hash (the top 24 bits)."""
    return (hash64_np(ids, seed) >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))
