"""Seeded, vectorised 64-bit hashing of strings and row indices (never Python's ``hash()``).

Hashed features, the per-row split draw and the vocabulary lookup all use these
functions, so ids are identical across processes, machines and Python versions.
The exact formulas are part of the prepared-data contract (serving re-applies them).

Example:
    >>> import pyarrow as pa
    >>> hash_buckets(pa.array(["a", None]), seed=0, buckets=10).tolist()[1]
    0
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_LEN_SALT = 0x5851F42D4C957F2D
_ROW_SALT = 0x2545F4914F6CDD1D
_MASK64 = (1 << 64) - 1


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of a uint64 array (wrapping arithmetic, a bijection).

    Example:
        >>> int(mix64(np.array([0], dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF
        True
    """
    z = np.array(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z += _GOLDEN
        z ^= z >> np.uint64(30)
        z *= _M1
        z ^= z >> np.uint64(27)
        z *= _M2
        z ^= z >> np.uint64(31)
    return z


def _seed_key(seed: int, salt: int) -> np.uint64:
    return np.uint64(int(mix64(np.array([(seed ^ salt) & _MASK64], dtype=np.uint64))[0]))


def _string_buffers(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (int64, length n+1) and the data bytes of a string/binary array."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_large_string(values.type) or pa.types.is_large_binary(values.type):
        off_type = np.int64
    elif pa.types.is_string(values.type) or pa.types.is_binary(values.type):
        off_type = np.int32
    else:
        raise TypeError(f"hash_strings expects a string or binary array, got {values.type}")
    bufs = values.buffers()
    n = len(values)
    offsets = np.frombuffer(bufs[1], dtype=off_type)[values.offset : values.offset + n + 1].astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return offsets, data


def hash_strings(values: pa.Array, seed: int) -> np.ndarray:
    """64-bit seeded hash of each UTF-8 string (``uint64``; null hashes like ``""``).

    The bytes are read as little-endian 64-bit words (the last one zero-padded); word
    ``j`` contributes ``mix64(w ^ key ^ (j + 1) * K)``; the sum (mod 2**64) is mixed with
    the byte length. Vectorised over all words of all strings at once.

    Example:
        >>> import pyarrow as pa
        >>> h = hash_strings(pa.array(["x", "x"]), seed=1)
        >>> bool(h[0] == h[1])
        True
    """
    return hash_strings_multi(values, (seed,))[0]


def hash_strings_multi(values: pa.Array, seeds: tuple[int, ...]) -> list[np.ndarray]:
    """``hash_strings`` for several seeds at once, sharing the word extraction.

    Example:
        >>> import pyarrow as pa
        >>> h1, h2 = hash_strings_multi(pa.array(["x"]), (1, 2))
        >>> bool(h1[0] == hash_strings(pa.array(["x"]), 1)[0])
        True
    """
    offsets, data = _string_buffers(values)
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    nwords = (lengths + 7) >> 3
    total = int(nwords.sum())
    words = j = first = nonempty = None
    if total:
        lo, hi = int(offsets[0]), int(offsets[-1])
        padded = np.zeros(hi - lo + 8, dtype=np.uint8)
        padded[: hi - lo] = data[lo:hi]
        windows = np.ndarray(shape=(hi - lo + 1,), dtype="<u8", buffer=padded, strides=(1,))
        if (nwords == 1).all():  # short strings (most ids): one word each
            j = np.zeros(n, np.int64)
            first = np.arange(n, dtype=np.int64)
            words = windows[offsets[:-1] - lo]
            remaining = lengths
        else:
            owner = np.repeat(np.arange(n), nwords)
            first = np.cumsum(nwords) - nwords
            j = np.arange(total, dtype=np.int64) - first[owner]
            words = windows[(offsets[:-1] - lo)[owner] + 8 * j]
            remaining = lengths[owner] - 8 * j
        short = remaining < 8
        if short.any():
            shift = (8 * remaining[short]).astype(np.uint64)
            words[short] &= (np.uint64(1) << shift) - np.uint64(1)
        with np.errstate(over="ignore"):
            words ^= (j + 1).astype(np.uint64) * _M2
        nonempty = np.flatnonzero(nwords > 0)
    lens = lengths.astype(np.uint64)
    out = []
    for seed in seeds:
        sums = np.zeros(n, dtype=np.uint64)
        if words is not None:
            terms = mix64(words ^ _seed_key(seed, 0))
            if len(terms) == n and len(nonempty) == n:
                sums = terms
            else:
                sums[nonempty] = np.add.reduceat(terms, first[nonempty])
        sums ^= mix64(lens ^ _seed_key(seed, _LEN_SALT))
        out.append(mix64(sums))
    return out


def hash_buckets(values: pa.Array, seed: int, buckets: int) -> np.ndarray:
    """Ids of hashed values in ``[0, buckets)``: null -> 0, a value -> ``1 + h % (buckets - 1)``.

    Example:
        >>> import pyarrow as pa
        >>> ids = hash_buckets(pa.array(["a", "b", None]), seed=0, buckets=1000)
        >>> ids.dtype, int(ids[2])
        (dtype('int64'), 0)
    """
    if buckets < 2:
        raise ValueError(f"hash_buckets must be >= 2 (id 0 is kept for missing), got {buckets}")
    h = hash_strings(values, seed)
    ids = (h % np.uint64(buckets - 1)).astype(np.int64) + 1
    if values.null_count:
        ids[np.asarray(values.is_null())] = 0
    return ids


def row_uniform(file_index: int, lines: np.ndarray, seed: int) -> np.ndarray:
    """A uniform in ``[0, 1)`` per row, from a seeded hash of (file index, line number).

    Example:
        >>> u = row_uniform(0, np.array([1, 2, 3]), seed=7)
        >>> bool(((u >= 0) & (u < 1)).all())
        True
    """
    key = _seed_key(seed, _ROW_SALT)
    x = (np.uint64(file_index) << np.uint64(40)) | np.asarray(lines, dtype=np.uint64)
    h = mix64(mix64(x ^ key))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def string_keys(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """An exact-or-96-bit key ``(k1: uint64, k2: uint32)`` per string, for hash tables of values.

    A string of at most 8 bytes is its own key: its bytes (little-endian, zero-padded) and
    its length, so two such strings share a key only when they are equal. A longer string
    is keyed by two seeded ``hash_strings`` (64 + 31 bits) with the top bit of ``k2`` set,
    so it never shares a key with a short one. Nulls key like ``""``.

    Example:
        >>> import pyarrow as pa
        >>> k1, k2 = string_keys(pa.array(["ab", "ab\\x00", "a" * 20]))
        >>> int(k1[0]) == int(k1[1]), k2[:2].tolist(), bool(k2[2] >> 31)
        (True, [2, 3], True)
    """
    offsets, data = _string_buffers(values)
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    k1 = np.zeros(n, np.uint64)
    k2 = lengths.astype(np.uint32)
    if not n:
        return k1, k2
    lo, hi = int(offsets[0]), int(offsets[-1])
    padded = np.zeros(hi - lo + 8, dtype=np.uint8)
    padded[: hi - lo] = data[lo:hi]
    windows = np.ndarray(shape=(hi - lo + 1,), dtype="<u8", buffer=padded, strides=(1,))
    short = lengths <= 8
    if short.all():
        k1 = windows[offsets[:-1] - lo].astype(np.uint64)
        keep = lengths < 8
        if keep.any():
            k1[keep] &= (np.uint64(1) << (8 * lengths[keep]).astype(np.uint64)) - np.uint64(1)
        return k1, k2
    at = np.flatnonzero(short)
    k1[at] = windows[offsets[:-1][at] - lo]
    keep = at[lengths[at] < 8]
    k1[keep] &= (np.uint64(1) << (8 * lengths[keep]).astype(np.uint64)) - np.uint64(1)
    long = np.flatnonzero(~short)
    h1, h2 = hash_strings_multi(values.take(pa.array(long)), _KEY_SEEDS)
    k1[long] = h1
    k2[long] = (h2 >> np.uint64(33)).astype(np.uint32) | np.uint32(1 << 31)
    return k1, k2


_KEY_SEEDS = (0x5EED, 0xC0FFEE)
