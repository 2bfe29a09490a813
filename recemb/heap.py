"""glibc heap settings under which large, short-lived tensors cost no page faults.

A training step or a lookup allocates and frees the same large tensors every call (pooled
outputs, KJT buffers, gradients). glibc's malloc adapts its mmap threshold to the blocks a
process frees, but still trims the heap top back to the kernel past its trim threshold, and
serves a block above the mmap threshold with a fresh mapping: either way the next call's
tensor lands on pages the kernel must fault in and zero again. Fixing both thresholds keeps
freed memory in the heap for the next call. Measured on the 2-core machine (4,096 x 26
single-hot ids, 1 thread, ``full`` 16 MB table): a ``full`` lookup took 236 page faults and
2.77 ms per call by default, 0.3 faults and 0.95 ms with both set. Setting only one of the two
turns glibc's adaptation off and is far worse (3,700 faults and 8.4 ms per call), so this
module sets both or neither. A user's own ``MALLOC_*`` variables, or ``RECEMB_MALLOC=default``,
leave glibc as it is. ``malloc_trim`` (``recemb prepare`` calls it to keep its memory flat)
still gives free memory back.

Example:
    >>> keep_freed_heap()   # first thing in a process that trains or looks up; False off glibc  # doctest: +SKIP
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

# glibc's largest mmap threshold on 64-bit (blocks above it are still mapped, and unmapped on free).
MMAP_THRESHOLD = 32 << 20
# Free memory kept at the heap top before glibc trims it on its own: mallopt takes a C int.
TRIM_THRESHOLD = (1 << 31) - 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")
_applied = False


def _libc_function(name: str, argtypes: list[type], restype: type) -> Any | None:
    """glibc's function ``name`` with its C signature, or None where there is none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        function = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, restype
    return function


_MALLOC_TRIM = _libc_function("malloc_trim", [ctypes.c_size_t], ctypes.c_int)


def trim_heap() -> None:
    """Give the heap's free memory back to the kernel now (glibc's ``malloc_trim(0)``; a no-op
    elsewhere). ``recemb prepare`` calls it when its RSS has grown, to keep its memory flat."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _chosen_elsewhere() -> bool:
    """Whether the user set glibc's variables or asked for glibc's defaults."""
    return os.environ.get("RECEMB_MALLOC", "") == "default" or any(v in os.environ for v in _USER_VARIABLES)


def keep_freed_heap() -> bool:
    """Fix glibc's mmap and trim thresholds in this process (``mallopt``); True when they are set.

    Idempotent. Nothing changes off glibc (musl, macOS), or when ``_chosen_elsewhere``.
    """
    global _applied
    if _applied:
        return True
    if _chosen_elsewhere():
        return False
    mallopt = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
    if mallopt is None:
        return False
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied


def heap_env() -> dict[str, str]:
    """The same settings as environment variables, for child processes (Ray workers), which glibc
    reads when the process starts; empty when ``_chosen_elsewhere`` (the user's own pass through).

    Example:
        >>> sorted(heap_env()) in ([], ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"])
        True
    """
    if _chosen_elsewhere():
        return {}
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "heap_env", "keep_freed_heap", "trim_heap"]
