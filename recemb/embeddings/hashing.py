"""Seeded hashing of integer ids inside the model (torch), bit-exact with numpy.

Hashed variants (``hashed``, ``unified``, ``robe``, ``dhe``, ``hybrid``) map a
logical id to physical rows with these functions. The hash is splitmix64's
finaliser of ``id ^ key(seed)``, computed in wrapping int64 arithmetic with
logical shifts emulated by masks, so the torch result on CPU or CUDA equals
``recemb.data.hashing.mix64`` on uint64 bit for bit: a serving process (numpy
only) reproduces every physical row (``hash_ids_np``).

Python's ``hash`` is never used (it is salted per process for strings).

Example:
    >>> ids = torch.tensor([0, 1, 2, 3])
    >>> hash_ids(ids, seed=7, buckets=10).tolist() == hash_ids_np(ids.numpy(), 7, 10).tolist()
    True
"""

from __future__ import annotations

import torch

from recemb.embeddings.idhash import hash64_np, hash_ids_np, hash_unit_np, salted_seed, seed_key

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
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64_torch(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors, bit-exact with ``mix64`` on uint64."""
    z = x.to(torch.int64) + _signed(_GOLDEN)
    z = z ^ _shr(z, 30)
    z = z * _signed(_M1)
    z = z ^ _shr(z, 27)
    z = z * _signed(_M2)
    return z ^ _shr(z, 31)


def hash64(ids: torch.Tensor, seed: int) -> torch.Tensor:
    """Seeded 64-bit hash of int64 ids (an int64 tensor holding the uint64 bits)."""
    return mix64_torch(ids.to(torch.int64) ^ _signed(seed_key(seed)))


def hash_ids(ids: torch.Tensor, seed: int, buckets: int) -> torch.Tensor:
    """Ids hashed into ``[0, buckets)`` (int64): the top 63 bits of ``hash64`` mod ``buckets``.

    The modulo of a 63-bit value leaves a bias of at most ``buckets / 2**63``.
    """
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    return _shr(hash64(ids, seed), 1) % buckets


def hash_unit(ids: torch.Tensor, seed: int) -> torch.Tensor:
    """A float32 in ``[0, 1)`` per id from its hash (the top 24 bits; DHE's input)."""
    return _shr(hash64(ids, seed), 40).to(torch.float32) * (1.0 / (1 << 24))


__all__ = ["hash64", "hash64_np", "hash_ids", "hash_ids_np", "hash_unit", "hash_unit_np", "mix64_torch",
           "salted_seed", "seed_key"]
