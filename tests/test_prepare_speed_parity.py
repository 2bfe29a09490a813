"""The speed-ups of preparation keep its results: ``ValueTables`` (several features in one
hash table) against a dict per feature."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from recemb.data.value_table import ValueTables


def test_value_tables_groups_match_a_dict_each() -> None:
    rng = np.random.default_rng(1)
    groups = 5
    table = ValueTables(groups)
    ref: list[dict[str, int]] = [{} for _ in range(groups)]
    counts: list[dict[str, int]] = [{} for _ in range(groups)]
    for _ in range(40):
        gs = [int(g) for g in rng.permutation(groups)[: rng.integers(1, groups + 1)]]
        arrays = []
        for _g in gs:
            # the same values in every group; long (hashed) and short (exact) keys; some nulls
            raw = [("x" * int(rng.integers(0, 12))) + str(int(z)) for z in rng.zipf(1.2, 800)]
            block = list(dict.fromkeys(raw)) + ([None] if rng.random() < 0.5 else [])
            arrays.append(pa.array(block, pa.string()))
        entries = table.entries(arrays, gs)
        ids = table.local_ids(entries)
        add = rng.integers(0, 5, len(entries))
        table.add_entry_counts(entries, add)
        pos = 0
        for g, arr in zip(gs, arrays, strict=True):
            for v in arr.to_pylist():
                if v is None:
                    assert ids[pos] == -1 and entries[pos] == -1
                else:
                    assert ids[pos] == ref[g].setdefault(v, len(ref[g]))
                    counts[g][v] = counts[g].get(v, 0) + int(add[pos])
                pos += 1
    for g in range(groups):
        assert table.size(g) == len(ref[g]) > 1000
        assert table.values(g).to_pylist() == list(ref[g])
        got = table.count_table(g)
        assert dict(zip(got.column("value").to_pylist(), got.column("count").to_pylist(), strict=True)) == \
            {v: n for v, n in counts[g].items() if n}
        assert table.ids([pa.array(list(ref[g])[:3])], [g])[0].tolist() == [0, 1, 2]


def test_value_tables_null_is_not_the_empty_string() -> None:
    """A null keys like "" in the hash table; it still gets -1 when "" is a value."""
    table = ValueTables(2)
    first = table.ids([pa.array(["", "a"]), pa.array([None, ""])])
    second = table.ids([pa.array([None, "a", ""]), pa.array(["", None])])
    assert [x.tolist() for x in first] == [[0, 1], [-1, 0]]
    assert [x.tolist() for x in second] == [[-1, 1, 0], [0, -1]]
