"""``ValueTables``: the distinct values of several columns with a dense id each and a count per id.

Preparation's fit runs every block's distinct values (one Arrow dictionary per vocabulary
feature) through one ``ValueTables`` with a group per feature: a value gets its group's
next id the first time it is seen there, and the block's training counts are added at
those ids. The spill then holds int32 ids instead of strings, and the transform maps ids
to vocabulary ids with one gather. All groups share one numpy open-addressing table keyed
by ``hashing.string_keys`` tagged with the group, so a block's features are looked up
together in a few vectorised passes (not a few dozen small ones per feature), memory stays
at a few tens of bytes per distinct value, and nothing is re-grouped as the input grows.
``ValueTable`` is the one-group form. Written by hand because no dependency offers a
growable value -> id map across blocks: pyarrow's dictionary encoding and ``value_counts``
work per array (merging them is the re-grouping this replaces), and pandas' hash tables
are not a runtime dependency.

Example:
    >>> import pyarrow as pa
    >>> t = ValueTable()
    >>> t.ids(pa.array(["a", "b", None])).tolist(), t.ids(pa.array(["b", "c"])).tolist()
    ([0, 1, -1], [1, 2])
    >>> g = ValueTables(2)
    >>> [x.tolist() for x in g.ids([pa.array(["a", "b"]), pa.array(["b"])])]
    [[0, 1], [0]]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from recemb.data.hashing import string_keys

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_K2_MIX = np.uint64(0xBF58476D1CE4E5B9)
_LONG = np.uint32(1 << 31)  # string_keys sets this bit of k2 for strings longer than 8 bytes
_GROUP_MIX = 0x9E3779B1  # odd: group -> group * _GROUP_MIX mod 2**31 is one-to-one


def _strings(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    if not pa.types.is_string(values.type):
        values = values.cast(pa.string())
    return values


class ValueTables:
    """Distinct strings of ``groups`` columns -> ids 0, 1, ... per group in first-seen order,
    with an int64 count per id.

    ``ids`` looks up one array of distinct values per group and adds the unseen ones;
    ``add_counts`` adds counts at a group's ids; ``values`` lists a group's values in id
    order; ``count_table`` gives a group's (value, count) for the ids whose count is not zero.
    Keys are ``string_keys`` with the group folded into ``k2`` one-to-one (the length of
    a short string keeps its low 4 bits, a long string's hash its top bit), so values of
    different groups never share a key and short strings stay exact.
    """

    def __init__(self, groups: int) -> None:
        if not 1 <= groups <= 1 << 16:
            raise ValueError(f"groups must be in [1, 2**16], got {groups}")
        self.groups = groups
        self._n = 0  # entries over all groups
        self._k1 = np.zeros(1024, np.uint64)
        self._k2 = np.zeros(1024, np.uint32)
        self._local = np.zeros(1024, np.int32)  # entry -> id in its group
        self._group = np.zeros(1024, np.uint16)  # entry -> group
        self._counts = np.zeros(1024, np.int64)  # by entry
        self._sizes = np.zeros(groups, np.int64)  # ids per group
        self._chunks: list[list[pa.Array]] = [[] for _ in range(groups)]
        self._bits = 11
        self._slots = np.zeros(1 << self._bits, np.int32)  # entry + 1; 0 = empty

    def size(self, group: int) -> int:
        return int(self._sizes[group])

    def _slot(self, k1: np.ndarray, k2: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            x = k1 ^ (k2.astype(np.uint64) * _K2_MIX)
            x ^= x >> np.uint64(29)
            x *= _GOLDEN
        return (x >> np.uint64(64 - self._bits)).astype(np.int64)

    def _find(self, k1: np.ndarray, k2: np.ndarray) -> np.ndarray:
        """Entries of the keys, -1 where absent (linear probing)."""
        mask = (1 << self._bits) - 1
        slot = self._slot(k1, k2)
        sid = self._slots[slot].astype(np.int64) - 1
        used = sid >= 0
        hit = used & (self._k1[sid] == k1) & (self._k2[sid] == k2)
        out = np.where(hit, sid, -1)
        pending = np.flatnonzero(used & ~hit)
        while len(pending):
            s = (slot[pending] + 1) & mask
            slot[pending] = s
            sid = self._slots[s] - 1
            used = sid >= 0
            kp = pending
            hit = used & (self._k1[sid] == k1[kp]) & (self._k2[sid] == k2[kp])
            out[kp[hit]] = sid[hit]
            pending = kp[used & ~hit]
        return out

    def _place(self, entries: np.ndarray) -> None:
        """Put ``entries`` (whose keys are stored) into free slots, linear probing."""
        mask = (1 << self._bits) - 1
        slot = self._slot(self._k1[entries], self._k2[entries])
        pending = entries
        while len(pending):
            free = self._slots[slot] == 0
            cand, cs = pending[free], slot[free]
            self._slots[cs] = cand + 1  # of entries aiming at one slot, one is left there
            won = np.zeros(len(pending), bool)
            won[np.flatnonzero(free)[self._slots[cs] == cand + 1]] = True
            pending, slot = pending[~won], (slot[~won] + 1) & mask

    def _grow(self, n: int) -> None:
        if n > len(self._k1):
            cap = max(n, 2 * len(self._k1))
            for name in ("_k1", "_k2", "_local", "_group", "_counts"):
                old = getattr(self, name)
                new = np.zeros(cap, old.dtype)
                new[: self._n] = old[: self._n]
                setattr(self, name, new)
        if 2 * n > (1 << self._bits):
            while 2 * n > (1 << self._bits):
                self._bits += 1
            self._slots = np.zeros(1 << self._bits, np.int32)
            self._place(np.arange(self._n, dtype=np.int32))

    def _keys(self, values: pa.Array, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k1, k2 = string_keys(values)
        if self.groups > 1:
            g = group.astype(np.uint32)
            long = (k2 & _LONG) != 0
            with np.errstate(over="ignore"):
                tag = np.where(long, (g * np.uint32(_GROUP_MIX)) & np.uint32(0x7FFFFFFF), g << np.uint32(4))
            k2 = k2 ^ tag
        return k1, k2

    def entries(self, values: Sequence[pa.Array], groups: Sequence[int] | None = None) -> np.ndarray:
        """The entries (indices over all groups) of ``values[j]`` in group ``groups[j]``, adding
        unseen values, concatenated over ``j``; a null gets -1.

        Each ``values[j]`` must be distinct (e.g. a block's dictionary) and each group named at
        most once; new values get their group's next ids in their order there. ``groups``
        defaults to ``0, 1, ...``.
        """
        groups = list(range(len(values))) if groups is None else list(groups)
        arrays = [_strings(v) for v in values]
        lengths = np.array([len(a) for a in arrays], np.int64)
        if not lengths.sum():
            return np.zeros(0, np.int64)
        flat = arrays[0] if len(arrays) == 1 else pa.concat_arrays(arrays)
        group = np.repeat(np.asarray(groups, np.int64), lengths)
        k1, k2 = self._keys(flat, group)
        out = self._find(k1, k2) if self._n else np.full(len(flat), -1, np.int64)
        miss = out < 0
        if flat.null_count:  # a null keys like "" (which may be a value): it is -1, never an entry
            valid = np.asarray(flat.is_valid())
            out[~valid] = -1
            miss &= valid
        new = np.flatnonzero(miss)
        if len(new):
            start = self._n
            self._grow(start + len(new))
            if start + len(new) >= 1 << 31:
                raise ValueError("more than 2**31 - 1 distinct values")
            ent = np.arange(start, start + len(new), dtype=np.int32)
            self._k1[ent], self._k2[ent] = k1[new], k2[new]
            gnew = group[new]
            # Rank of each new value among its group's new values (new is in input order, so
            # each group's new values are contiguous when each group appears once).
            per = np.bincount(gnew, minlength=self.groups)
            first = np.cumsum(per) - per
            order = np.argsort(gnew, kind="stable")
            rank = np.empty(len(new), np.int64)
            rank[order] = np.arange(len(new)) - first[gnew[order]]
            self._local[ent] = self._sizes[gnew] + rank
            self._group[ent] = gnew
            self._sizes += per
            self._n += len(new)
            self._place(ent)
            out[new] = ent
            taken = flat.take(pa.array(new[order]))
            for g in np.flatnonzero(per).tolist():
                self._chunks[g].append(taken.slice(int(first[g]), int(per[g])))
        return out

    def local_ids(self, entries: np.ndarray) -> np.ndarray:
        """Each entry's id in its group (-1 stays -1)."""
        return np.where(entries >= 0, self._local[np.maximum(entries, 0)], -1)

    def ids(self, values: Sequence[pa.Array], groups: Sequence[int] | None = None) -> list[np.ndarray]:
        """``entries`` as ids within each group, one array per ``values[j]``."""
        local = self.local_ids(self.entries(values, groups))
        bounds = np.cumsum([0] + [len(v) for v in values])
        return [local[bounds[j]:bounds[j + 1]] for j in range(len(values))]

    def add_entry_counts(self, entries: np.ndarray, counts: np.ndarray) -> None:
        """Add ``counts`` at ``entries`` (distinct; negative entries are skipped)."""
        ok = entries >= 0
        self._counts[entries[ok]] += counts[ok]

    def _group_entries(self, group: int) -> np.ndarray:
        """A group's entries in id order (entries are added in id order)."""
        if self.groups == 1:
            return np.arange(self._n)
        return np.flatnonzero(self._group[: self._n] == group)

    def add_counts(self, group: int, ids: np.ndarray, counts: np.ndarray) -> None:
        """Add ``counts`` at a group's ``ids`` (distinct; negative ids are skipped)."""
        ok = ids >= 0
        self._counts[self._group_entries(group)[ids[ok]]] += counts[ok]

    def counts(self, group: int) -> np.ndarray:
        """A group's counts by id."""
        return self._counts[self._group_entries(group)]

    def values(self, group: int) -> pa.Array:
        """All values seen in ``group``, in id order."""
        chunks = self._chunks[group]
        if not chunks:
            return pa.array([], pa.string())
        if len(chunks) > 1:
            self._chunks[group] = chunks = [pa.concat_arrays(chunks)]
        return chunks[0]

    def count_table(self, group: int) -> pa.Table:
        """(value, count) of a group's ids with a non-zero count, in id order."""
        counts = self.counts(group)
        nz = np.flatnonzero(counts)
        return pa.table({"value": self.values(group).take(pa.array(nz)), "count": pa.array(counts[nz])})


class ValueTable:
    """Distinct strings -> ids 0, 1, ... in first-seen order, with an int64 count per id
    (``ValueTables`` with one group).

    ``ids`` looks values up and adds the unseen ones; ``add_counts`` adds counts at ids;
    ``values`` lists the values in id order; ``count_table`` gives (value, count) for the
    ids whose count is not zero.
    """

    def __init__(self) -> None:
        self._t = ValueTables(1)

    def __len__(self) -> int:
        return self._t.size(0)

    @property
    def counts(self) -> np.ndarray:
        return self._t.counts(0)

    def ids(self, values: pa.Array) -> np.ndarray:
        """The id of each of ``values`` (distinct, e.g. a block's dictionary), adding unseen ones.

        New values get the next ids in their order in ``values``; a null gets -1.
        """
        return self._t.ids([values])[0].astype(np.int64, copy=False)

    def add_counts(self, ids: np.ndarray, counts: np.ndarray) -> None:
        """Add ``counts`` at ``ids`` (distinct; negative ids are skipped)."""
        self._t.add_counts(0, ids, counts)

    def values(self) -> pa.Array:
        """All values seen, in id order."""
        return self._t.values(0)

    def count_table(self) -> pa.Table:
        """(value, count) of the ids with a non-zero count, in id order."""
        return self._t.count_table(0)
