"""The fit's streaming pieces: ``ValueTable`` ids and counts against a dict, exact short-string
keys, and ``prefetched`` (order, errors and early stops of the reader thread)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pytest

from recemb.data.hashing import string_keys
from recemb.data.preprocess import prefetched
from recemb.data.value_table import ValueTable


def test_value_table_matches_a_dict_across_growth() -> None:
    rng = np.random.default_rng(3)
    table, ref, counts = ValueTable(), {}, {}
    for _ in range(40):
        raw = [("v" * int(rng.integers(0, 12))) + str(int(z)) for z in rng.zipf(1.2, 2000)]
        block = list(dict.fromkeys(raw))  # a block's dictionary: distinct, first seen first
        ids = table.ids(pa.array(block + [None]))
        assert ids[-1] == -1
        seen = Counter(raw)
        c = np.array([seen[v] for v in block], np.int64)
        table.add_counts(ids[:-1], c)
        for v, i, n in zip(block, ids[:-1].tolist(), c.tolist(), strict=True):
            ref.setdefault(v, len(ref))
            counts[v] = counts.get(v, 0) + n
            assert i == ref[v]
    assert len(table) == len(ref) > 4096  # grew (and re-placed) several times
    assert table.values().to_pylist() == list(ref)
    got = table.count_table()
    assert dict(zip(got.column("value").to_pylist(), got.column("count").to_pylist(), strict=True)) == counts


def test_short_string_keys_are_exact() -> None:
    values = pa.array(["", "a", "a\x00", "\x00", "abcdefgh", "abcdefgi", "abcdefghi", "abcdefghj"])
    k1, k2 = string_keys(values)
    keys = set(zip(k1.tolist(), k2.tolist(), strict=True))
    assert len(keys) == len(values)
    assert (k2[:6] == [0, 1, 2, 1, 8, 8]).all() and (k2[6:] >> 31 == 1).all()
    t = ValueTable()
    assert t.ids(values).tolist() == list(range(8))
    assert t.ids(values.slice(2, 3)).tolist() == [2, 3, 4]


def _numbers(n: int, fail_at: int | None = None, closed: list[bool] | None = None) -> Iterator[int]:
    try:
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"bad {i}")
            yield i
    finally:
        if closed is not None:
            closed.append(True)


def test_prefetched_keeps_order_and_raises_the_producers_error() -> None:
    assert list(prefetched(_numbers(100), depth=2)) == list(range(100))
    seen = []
    with pytest.raises(ValueError, match="bad 7"):
        for x in prefetched(_numbers(100, fail_at=7)):
            seen.append(x)
    assert seen == list(range(7))


def test_prefetched_early_stop_closes_the_producer() -> None:
    closed: list[bool] = []
    before = threading.active_count()
    gen = prefetched(_numbers(10_000, closed=closed))
    assert next(gen) == 0
    gen.close()
    assert closed == [True] and threading.active_count() == before
