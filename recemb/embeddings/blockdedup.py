"""Block deduplication of a table in numpy: the one implementation the ``dedup`` layer and its serving twin share.

Torch-free, so the serving runtime imports it without torch. ``dedup_table``: the stacked
table's rows are cut into blocks of ``block`` values; each block is hashed by a seeded L2 LSH
(a random rotation, then a grid of cell width ``w`` with random offsets: blocks closer than
``w`` collide, far ones do not); the blocks of a cell merge into their mean. ``w`` is the
smallest (by bisection) that leaves at most ``unique`` cells, never below ``threshold`` times
the blocks' root-mean-square norm, so the budget sets it. ``group_blocks`` numbers a
deduplicated table's bit-equal blocks (the stored form's index and unique blocks).

Example:
    >>> table = np.array([[1, 2, 1, 2], [0, 0, 1, 2]], np.float32)
    >>> index, unique = group_blocks(table, 2)
    >>> index.tolist(), unique.tolist()
    ([[0, 0], [1, 0]], [[1.0, 2.0], [0.0, 0.0]])
    >>> snapped, found = dedup_table(np.array([[1.0, 0], [1.001, 0], [-1, 0]], np.float32), 2, 2, 0.0, seed=0)
    >>> found.unique, snapped[0].tolist() == snapped[1].tolist()
    (2, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_RANGE = 2.0**-24  # the narrowest cell width tried, relative to one that holds every block
_BISECTIONS = 18  # halvings of log2(w) over that range: the width to ~1e-4 relative


@dataclass(frozen=True)
class DedupResult:
    """One deduplication: ``blocks`` in the table, ``unique`` left after merging, the cell ``width`` used."""

    blocks: int
    unique: int
    width: float

    @property
    def merged(self) -> int:
        """Blocks that now point at another block's copy."""
        return self.blocks - self.unique


def lsh_basis(block: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The hash's random rotation (``[block, block]``, orthonormal) and grid offsets (in ``[0.05, 0.95)``), from ``seed``."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((block, block)))
    return q * np.sign(np.diag(r)), rng.uniform(0.05, 0.95, block)


def _cells(projected: np.ndarray, offset: np.ndarray, width: float, scratch: np.ndarray) -> tuple[np.ndarray, int]:
    """Each block's cell as one 64-bit key (the cell's coordinates mixed by odd multipliers), and the cell count."""
    np.multiply(projected, 1.0 / width, out=scratch)
    scratch += offset
    np.floor(scratch, out=scratch)
    mix = (np.arange(scratch.shape[1], dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
    keys = scratch.astype(np.int64).view(np.uint64) @ mix  # wraps modulo 2**64
    ordered = np.sort(keys)
    return keys, 1 + int(np.count_nonzero(ordered[1:] != ordered[:-1])) if keys.size else 0


def dedup_table(weight: np.ndarray, block: int, unique: int, threshold: float, seed: int
                ) -> tuple[np.ndarray, DedupResult]:
    """``weight [rows, dim]`` with every block replaced by its cell's mean, at most ``unique`` cells (module docstring).

    Blocks equal to each other always share a cell; with ``unique`` at least the blocks and no
    ``threshold`` the table comes back as it is.
    """
    rows, dim = weight.shape
    blocks = np.ascontiguousarray(weight, dtype=np.float32).reshape(-1, block).astype(np.float64)
    n = blocks.shape[0]
    floor = threshold * float(np.sqrt((blocks * blocks).sum(axis=1).mean())) if n else 0.0
    if n == 0 or (unique >= n and floor <= 0):
        return weight.astype(np.float32, copy=True), DedupResult(n, n, 0.0)
    rotation, offset = lsh_basis(block, seed)
    projected = blocks @ rotation
    scratch = np.empty_like(projected)
    top = float(np.abs(projected).max())
    # At this width every |x / w| is under the smallest offset margin: one cell holds every block.
    high = max(2.0 * top / float(np.minimum(offset, 1 - offset).min()), floor, np.finfo(np.float64).tiny)
    width = high
    if floor < high:
        low = max(floor, high * _RANGE)
        if _cells(projected, offset, low, scratch)[1] <= unique:
            width = low
        else:
            for _ in range(_BISECTIONS):  # invariant: ``high`` fits, ``low`` does not
                mid = float(np.sqrt(low * high))
                if _cells(projected, offset, mid, scratch)[1] <= unique:
                    high = mid
                else:
                    low = mid
            width = high
    keys, _ = _cells(projected, offset, width, scratch)
    _, cell = np.unique(keys, return_inverse=True)
    cell = cell.reshape(-1)
    count = np.bincount(cell)
    means = np.stack([np.bincount(cell, weights=blocks[:, j], minlength=count.size) for j in range(block)], axis=1)
    means = (means / count[:, None]).astype(np.float32)
    return means[cell].reshape(rows, dim), DedupResult(n, int(count.size), width)


def group_blocks(table: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``(index [rows, dim / block] int64, unique [U, block] float32)``: the table's bit-equal blocks, in order of first use."""
    rows, dim = table.shape
    blocks = np.ascontiguousarray(table, dtype=np.float32).reshape(-1, block)
    raw = blocks.view(np.dtype((np.void, block * 4))).reshape(-1)
    _, first, inverse = np.unique(raw, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    renumber = np.empty(order.size, np.int64)
    renumber[order] = np.arange(order.size)
    return renumber[inverse.reshape(-1)].reshape(rows, dim // block), blocks[first[order]].copy()
