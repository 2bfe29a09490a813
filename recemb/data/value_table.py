"""``ValueTable``: the distinct values of one column with a dense id each and a count per id.

Preparation's fit runs every block's distinct values (an Arrow dictionary) through one
table per vocabulary feature: a value gets the next id the first time it is seen, and the
block's training counts are added at those ids. The spill then holds int32 ids instead of
strings, and the transform maps ids to vocabulary ids with one gather. A numpy open-addressing
table keyed by ``hashing.string_keys`` keeps memory at a few tens of bytes per distinct
value, with no re-grouping of partial tables as the input grows. Written by hand because no
dependency offers a growable value -> id map across blocks: pyarrow's dictionary encoding and
``value_counts`` work per array (merging them is the re-grouping this replaces), and pandas'
hash tables are not a runtime dependency.

Example:
    >>> import pyarrow as pa
    >>> t = ValueTable()
    >>> t.ids(pa.array(["a", "b", None])).tolist(), t.ids(pa.array(["b", "c"])).tolist()
    ([0, 1, -1], [1, 2])
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from recemb.data.hashing import string_keys

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_K2_MIX = np.uint64(0xBF58476D1CE4E5B9)


class ValueTable:
    """Distinct strings -> ids 0, 1, ... in first-seen order, with an int64 count per id.

    ``ids`` looks values up and adds the unseen ones; ``add_counts`` adds counts at ids;
    ``values`` lists the values in id order; ``count_table`` gives (value, count) for the
    ids whose count is not zero.
    """

    def __init__(self) -> None:
        self._n = 0
        self._k1 = np.zeros(1024, np.uint64)
        self._k2 = np.zeros(1024, np.uint32)
        self.counts = np.zeros(1024, np.int64)
        self._chunks: list[pa.Array] = []
        self._bits = 11
        self._slots = np.zeros(1 << self._bits, np.int32)  # id + 1; 0 = empty

    def __len__(self) -> int:
        return self._n

    def _slot(self, k1: np.ndarray, k2: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            x = k1 ^ (k2.astype(np.uint64) * _K2_MIX)
            x ^= x >> np.uint64(29)
            x *= _GOLDEN
        return (x >> np.uint64(64 - self._bits)).astype(np.int64)

    def _find(self, k1: np.ndarray, k2: np.ndarray) -> np.ndarray:
        """Ids of the keys, -1 where absent."""
        out = np.full(len(k1), -1, np.int64)
        mask = (1 << self._bits) - 1
        slot = self._slot(k1, k2)
        pending = np.arange(len(k1), dtype=np.int64)
        while len(pending):
            s = slot[pending]
            sid = self._slots[s].astype(np.int64) - 1
            used = sid >= 0
            hit = used & (self._k1[sid] == k1[pending]) & (self._k2[sid] == k2[pending])
            out[pending[hit]] = sid[hit]
            pending = pending[used & ~hit]
            slot[pending] = (slot[pending] + 1) & mask
        return out

    def _place(self, ids: np.ndarray) -> None:
        """Put ids (whose keys are stored) into free slots, linear probing."""
        mask = (1 << self._bits) - 1
        slot = self._slot(self._k1[ids], self._k2[ids])
        pending = np.arange(len(ids), dtype=np.int64)
        while len(pending):
            cand = slot[pending]
            free = np.flatnonzero(self._slots[cand] == 0)
            _, first = np.unique(cand[free], return_index=True)
            won = free[first]
            self._slots[cand[won]] = ids[pending[won]] + 1
            lost = np.ones(len(pending), bool)
            lost[won] = False
            pending = pending[lost]
            slot[pending] = (slot[pending] + 1) & mask

    def _grow(self, n: int) -> None:
        if n > len(self._k1):
            cap = max(n, 2 * len(self._k1))
            for name in ("_k1", "_k2", "counts"):
                old = getattr(self, name)
                new = np.zeros(cap, old.dtype)
                new[: self._n] = old[: self._n]
                setattr(self, name, new)
        if 2 * n > (1 << self._bits):
            while 2 * n > (1 << self._bits):
                self._bits += 1
            self._slots = np.zeros(1 << self._bits, np.int32)
            self._place(np.arange(self._n, dtype=np.int64))

    def ids(self, values: pa.Array) -> np.ndarray:
        """The id of each of ``values`` (distinct, e.g. a block's dictionary), adding unseen ones.

        New values get the next ids in their order in ``values``; a null gets -1.
        """
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        if not pa.types.is_string(values.type):
            values = values.cast(pa.string())
        k1, k2 = string_keys(values)
        out = self._find(k1, k2) if self._n else np.full(len(values), -1, np.int64)
        valid = np.asarray(values.is_valid()) if values.null_count else None
        new = np.flatnonzero(out < 0) if valid is None else np.flatnonzero((out < 0) & valid)
        if len(new):
            start = self._n
            self._grow(start + len(new))
            ids = np.arange(start, start + len(new), dtype=np.int64)
            self._k1[ids], self._k2[ids] = k1[new], k2[new]
            self._n += len(new)
            self._place(ids)
            out[new] = ids
            self._chunks.append(values.take(pa.array(new)))
        return out

    def add_counts(self, ids: np.ndarray, counts: np.ndarray) -> None:
        """Add ``counts`` at ``ids`` (distinct; negative ids are skipped)."""
        ok = ids >= 0
        self.counts[ids[ok]] += counts[ok]

    def values(self) -> pa.Array:
        """All values seen, in id order."""
        if not self._chunks:
            return pa.array([], pa.string())
        return pa.concat_arrays(self._chunks)

    def count_table(self) -> pa.Table:
        """(value, count) of the ids with a non-zero count, in id order."""
        nz = np.flatnonzero(self.counts[: self._n])
        return pa.table({"value": self.values().take(pa.array(nz)), "count": pa.array(self.counts[nz])})
