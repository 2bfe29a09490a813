"""Seeded hashing of integer ids inside the model (torch), bit-exact with numpy.

Hashed variants (``hashed``, ``unified``, ``robe``, ``dhe``, ``hybrid``) map a
logical id to physical rows with these functions. The hash is splitmix64's
finaliser of ``id ^ key(seed)``, computed in wrapping int64 arithmetic with
logical shifts emulated by masks, so the torch result on CPU or CUDA equals
``recemb.data.hashing.mix64`` on uint64 bit for bit: a serving process (numpy
only) reproduces every physical row (``hash_ids_np``).

Python's ``hash`` is never used (it is salted per process for strings).

New plans of ``hashed``, ``unified``, ``qr``, ``robe``, ``hybrid`` and ``mde`` bucket ids with
``mulshift`` (multiply-add-shift, ``recemb.embeddings.idhash``: four passes instead of a
dozen and a division); ``hash_keys`` builds either hash's per-segment constants and the
bucket functions take the plan's hash by name.

Example:
    >>> ids = torch.tensor([0, 1, 2, 3])
    >>> hash_ids(ids, seed=7, buckets=10).tolist() == hash_ids_np(ids.numpy(), 7, 10).tolist()
    True
"""

from __future__ import annotations

import itertools

import torch

from recemb.embeddings.base import by_key
from recemb.embeddings.idhash import (
    HASHES,
    MULSHIFT_MAX_BUCKETS,
    bucket_ids_np,
    hash64_np,
    hash_ids_np,
    hash_unit_np,
    mulshift_ids_np,
    mulshift_key,
    salted_seed,
    seed_key,
)

_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    """The int64 two's-complement value with the bits of unsigned 64-bit ``x``."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (z >> s).bitwise_and_((1 << (64 - s)) - 1)


_MIX_CHUNK = 1 << 16  # ids per pass of the finaliser: two int64 buffers of it stay in a core's L2


def _mix_(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser after its first addition, in place on an int64 tensor the caller owns.

    In place, with one scratch tensor for the shifts: the hash is a dozen passes over every id
    of a batch, and a fresh tensor per pass (memory the allocator hands out untouched) costs
    more than the pass itself. A long contiguous batch (ROBE's and unified's copies per block)
    is finished ``_MIX_CHUNK`` ids at a time, so the dozen passes read and write the cache, not
    memory (about a fifth faster at 200K ids; every id gets the same operations).
    """
    if z.numel() > 2 * _MIX_CHUNK and z.is_contiguous():
        for part in z.view(-1).split(_MIX_CHUNK):
            _mix_chunk_(part)
        return z
    return _mix_chunk_(z)


def _mix_chunk_(z: torch.Tensor) -> torch.Tensor:
    """``_mix_`` on one piece, in place."""
    t = torch.empty_like(z)
    for shift, mult in ((30, _M1), (27, _M2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=t)
        z.bitwise_xor_(t.bitwise_and_((1 << (64 - shift)) - 1))
        if mult is not None:
            z.mul_(_signed(mult))
    return z


def mix64_torch(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors, bit-exact with ``mix64`` on uint64."""
    return _mix_(x.to(torch.int64) + _signed(_GOLDEN))


def hash64(ids: torch.Tensor, seed: int) -> torch.Tensor:
    """Seeded 64-bit hash of int64 ids (an int64 tensor holding the uint64 bits)."""
    return mix64_torch(ids.to(torch.int64) ^ _signed(seed_key(seed)))


def signed_key(seed: int) -> int:
    """``seed_key(seed)`` as the int64 value with its bits: what the id is xored with in torch.

    Example:
        >>> -(1 << 63) <= signed_key(3) < 1 << 63
        True
    """
    return _signed(seed_key(seed))


def hash64_keyed(ids: torch.Tensor, keys: torch.Tensor | int) -> torch.Tensor:
    """``hash64`` with the seeds' keys given (``signed_key``): a tensor broadcast against ``ids``
    (a key per id, e.g. each id's feature salt gathered by segment) or one int.

    One call hashes a whole batch of several features, each with its own seed: bit for bit
    ``hash64(ids_f, seed_f)`` on each feature's ids.

    Example:
        >>> ids = torch.tensor([5, 5])
        >>> keys = torch.tensor([signed_key(1), signed_key(2)])
        >>> hash64_keyed(ids, keys).tolist() == [hash64(ids[:1], 1).item(), hash64(ids[:1], 2).item()]
        True
    """
    return mix64_keyed(ids.to(torch.int64) ^ keys)  # a new tensor: the caller's ids are never mixed in place


def mix64_keyed(z: torch.Tensor) -> torch.Tensor:
    """``hash64_keyed`` after its xor: ``z`` (int64, ids already xored with their keys, consumed in
    place) finished into the 64-bit hashes. For callers that build the xor themselves, e.g. by
    broadcasting one id against several keys, so the copies and the xor are one pass."""
    return _mix_(z.add_(_signed(_GOLDEN)))


def buckets_of(hashed: torch.Tensor, buckets: torch.Tensor | int) -> torch.Tensor:
    """The bucket of each 64-bit hash (``hash64_keyed``'s output, consumed in place): its top 63 bits
    mod ``buckets`` (an int or a tensor broadcast against it, e.g. rows per feature gathered by segment)."""
    return hashed.bitwise_right_shift_(1).bitwise_and_((1 << 63) - 1).remainder_(buckets)


def hash_ids(ids: torch.Tensor, seed: int, buckets: int) -> torch.Tensor:
    """Ids hashed into ``[0, buckets)`` (int64): the top 63 bits of ``hash64`` mod ``buckets``.

    The modulo of a 63-bit value leaves a bias of at most ``buckets / 2**63``.
    """
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    return buckets_of(hash64(ids, seed), buckets)


def hash_keys(seeds: list[int | None], hash_name: str = "splitmix64") -> torch.Tensor:
    """Per-segment constants of ``hash_name`` for seeds (None: a segment copied through unhashed):
    ``[segments]`` xor keys for ``splitmix64`` (``signed_key``), ``[segments, 2]`` multipliers and
    addends for ``mulshift`` (``mulshift_key``, as int64 bits). What ``hash_segments`` and
    ``bucket_ids`` take as ``keys``.

    Example:
        >>> hash_keys([1, None]).shape, hash_keys([1, None], "mulshift").shape
        (torch.Size([2]), torch.Size([2, 2]))
    """
    if hash_name == "splitmix64":
        return torch.tensor([0 if s is None else signed_key(s) for s in seeds], dtype=torch.int64)
    if hash_name == "mulshift":
        pairs = [(1, 0) if s is None else tuple(_signed(v) for v in mulshift_key(s)) for s in seeds]
        return torch.tensor(pairs, dtype=torch.int64).view(len(seeds), 2)
    raise ValueError(f"unknown id hash '{hash_name}' (known: {', '.join(HASHES)})")


def mulshift_buckets_(z: torch.Tensor, buckets: torch.Tensor | int) -> torch.Tensor:
    """Buckets from ``z = a * id + b`` (int64 bits, consumed in place): the top 32 bits times
    ``buckets`` (an int or a tensor broadcast against ``z``), shifted down by 32."""
    return z.bitwise_right_shift_(32).bitwise_and_(0xFFFFFFFF).mul_(buckets).bitwise_right_shift_(32)


def bucket_ids(ids: torch.Tensor, keys: torch.Tensor, buckets: torch.Tensor | int,
               hash_name: str = "splitmix64") -> torch.Tensor:
    """Ids hashed into ``buckets`` rows with one key per id (``hash_keys``' rows gathered per id,
    e.g. by feature or table) and ``buckets`` an int or one count per id: bit for bit
    ``bucket_ids_np`` of each id with its seed.

    Example:
        >>> ids = torch.tensor([5, 6])
        >>> keys = hash_keys([1, 2], "mulshift")
        >>> bucket_ids(ids, keys, 10, "mulshift").tolist() == [*bucket_ids_np(ids[:1].numpy(), 1, 10, "mulshift"),
        ...                                                     *bucket_ids_np(ids[1:].numpy(), 2, 10, "mulshift")]
        True
    """
    if hash_name == "mulshift":
        z = ids.to(torch.int64) * keys[:, 0]
        return mulshift_buckets_(z.add_(keys[:, 1]), buckets)
    return buckets_of(hash64_keyed(ids, keys), buckets)


def _equal_segments(length_per_key: list[int]) -> int | None:
    """The one segment length when every key has as many ids (single-hot batches), else None."""
    width = length_per_key[0] if length_per_key else 0
    return width if all(n == width for n in length_per_key) else None


def hash64_segments(values: torch.Tensor, keys: torch.Tensor, length_per_key: list[int]) -> torch.Tensor:
    """``hash64`` of consecutive segments of ids (``length_per_key[k]`` each, a KJT's keys) in one
    pass, segment ``k`` with key ``keys[k]`` (``signed_key`` of its seed).

    The keys are broadcast over the ids viewed ``[keys, ids]`` when every key has as many ids
    (single-hot batches), else gathered by segment (``by_key``): a dozen passes over all ids
    instead of a dozen small ops per key.

    Example:
        >>> ids = torch.tensor([1, 2, 3])
        >>> out = hash64_segments(ids, torch.tensor([signed_key(5), signed_key(6)]), [2, 1])
        >>> out.tolist() == [*hash64(ids[:2], 5).tolist(), *hash64(ids[2:], 6).tolist()]
        True
    """
    device = values.device
    width = _equal_segments(length_per_key)
    if width is not None:
        z = values.to(torch.int64).view(len(length_per_key), width) ^ keys.to(device).view(-1, 1)
    else:
        z = values.to(torch.int64) ^ by_key(keys, length_per_key, device)
    return _mix_(z.add_(_signed(_GOLDEN))).view(-1)


def hash_segments(values: torch.Tensor, keys: torch.Tensor, buckets: torch.Tensor | int, length_per_key: list[int],
                  keep: list[int] | None = None, hash_name: str = "splitmix64") -> torch.Tensor:
    """Consecutive segments of ids (``length_per_key[k]`` each) hashed into ``buckets`` rows (an int,
    or a tensor with one count per segment), segment ``k`` with ``keys[k]`` (``hash_keys`` of the
    seeds, for ``hash_name``); segments listed in ``keep`` are copied through unhashed.

    Bit for bit ``bucket_ids_np(ids_k, seed_k, rows_k, hash_name)`` on each segment.

    Example:
        >>> ids = torch.tensor([1, 2, 3])
        >>> out = hash_segments(ids, torch.tensor([signed_key(5), 0]), torch.tensor([10, 1]), [2, 1], keep=[1])
        >>> out.tolist() == [*hash_ids(ids[:2], 5, 10).tolist(), 3]
        True
    """
    width = _equal_segments(length_per_key)
    if hash_name == "mulshift":
        out = _mulshift_segments(values, keys, buckets, length_per_key, width)
    elif hash_name == "splitmix64":
        out = _splitmix_segments(values, keys, buckets, length_per_key, width)
    else:
        raise ValueError(f"unknown id hash '{hash_name}' (known: {', '.join(HASHES)})")
    if keep:
        starts = [0, *itertools.accumulate(length_per_key)]
        for k in keep:
            out[starts[k]:starts[k + 1]] = values[starts[k]:starts[k + 1]]
    return out


def _mulshift_segments(values: torch.Tensor, keys: torch.Tensor, buckets: torch.Tensor | int,
                       length_per_key: list[int], width: int | None) -> torch.Tensor:
    """``hash_segments`` with ``mulshift``: each segment's multiplier, addend and row count broadcast
    along its row of the ``[keys, ids]`` view (equal segments) or gathered by segment."""
    device = values.device
    if width is not None:
        n = len(length_per_key)
        z = values.to(torch.int64).view(n, width) * keys[:, 0].to(device).view(-1, 1)
        z.add_(keys[:, 1].to(device).view(-1, 1))
        rows = buckets if isinstance(buckets, int) else buckets.to(device).view(-1, 1)
        return mulshift_buckets_(z, rows).view(-1)
    z = values.to(torch.int64) * by_key(keys[:, 0], length_per_key, device)
    z.add_(by_key(keys[:, 1], length_per_key, device))
    rows = buckets if isinstance(buckets, int) else by_key(buckets, length_per_key, device)
    return mulshift_buckets_(z, rows)


def _splitmix_segments(values: torch.Tensor, keys: torch.Tensor, buckets: torch.Tensor | int,
                       length_per_key: list[int], width: int | None) -> torch.Tensor:
    """``hash_segments`` with ``splitmix64`` (``hash64_segments``, then the buckets)."""
    hashed = hash64_segments(values, keys, length_per_key)
    if isinstance(buckets, int):
        out = buckets_of(hashed, buckets)
    elif width is not None:
        out = buckets_of(hashed.view(len(length_per_key), width), buckets.to(values.device).view(-1, 1)).view(-1)
    else:
        out = buckets_of(hashed, by_key(buckets, length_per_key, values.device))
    return out


def hash_unit(ids: torch.Tensor, seed: int) -> torch.Tensor:
    """A float32 in ``[0, 1)`` per id from its hash (the top 24 bits; DHE's input)."""
    return _shr(hash64(ids, seed), 40).to(torch.float32) * (1.0 / (1 << 24))


__all__ = ["HASHES", "MULSHIFT_MAX_BUCKETS", "bucket_ids", "bucket_ids_np", "buckets_of", "hash64", "hash64_keyed",
           "hash64_np", "hash64_segments", "hash_ids", "hash_ids_np", "hash_keys", "hash_segments", "hash_unit",
           "hash_unit_np", "mix64_keyed", "mix64_torch", "mulshift_buckets_", "mulshift_ids_np", "mulshift_key",
           "salted_seed", "seed_key", "signed_key"]
