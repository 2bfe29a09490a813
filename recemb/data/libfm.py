"""libFM and libFFM lines as named columns: the classic sparse formats of the CTR literature.

``libfm``: ``label idx:val idx:val ...``; the ``k``-th token is field ``k`` (CTR sets in this
format, such as Frappe or MovieLens in BARS, list one token per field in a fixed order), or,
with ``index_fields: {name: [first, last], ...}``, the field whose index range holds ``idx``.
``libffm``: ``label field:idx:val ...``; the token names its field. Each field becomes a
column holding the token's ``idx`` (a categorical value, as a string) and a column
``<name>_value`` holding its ``val``; a field that occurs more than once in a row (a
multi-valued field in libFFM) holds its indices joined by ``|``, which a ``multihot``
feature splits. Field names are ``column_names[1:]`` when the config gives them (the
first name is the label's), else ``f0``, ``f1``, ...; the number of fields is then the
largest seen in the file's first 4 MiB.

A line whose tokens do not parse (wrong number of ``:`` parts, a field index that is not a
whole number, more fields than named) is a bad row with its reason, not an error: it goes
to the rejects like any bad CSV row. Parsing is vectorised with pyarrow compute (split,
flatten, one scatter per field); only rows with a repeated field take a Python path.

Example:
    >>> t, bad, why = parse_lines(pa.array(["1 0:3:1 1:7:1", "0 1:2:1"]), "libffm", ["label", "a", "b"])
    >>> t.column("a").to_pylist(), t.column("b").to_pylist(), bad.tolist()
    (['3', None], ['7', '2'], [])
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

LINE_COLUMN = "__line"
_SNIFF_BYTES = 4 << 20


def parts_per_token(fmt: str) -> int:
    """``idx:val`` (libfm) or ``field:idx:val`` (libffm)."""
    return 2 if fmt == "libfm" else 3


def default_names(fields: int, label: str = "label") -> list[str]:
    """``[label, f0, f1, ...]`` for ``fields`` fields."""
    return [label] + [f"f{k}" for k in range(fields)]


def sniff_fields(path: Path, fmt: str, opener: object) -> int:
    """The number of fields in ``path``'s first 4 MiB (max tokens per line, or max field + 1)."""
    with opener(path) as f:  # type: ignore[operator]
        text = f.read(_SNIFF_BYTES).decode("utf-8", errors="replace")
    lines = text.split("\n")
    if len(text) >= _SNIFF_BYTES:
        lines = lines[:-1]  # the last line may be cut
    fields = 0
    for line in lines:
        tokens = line.split()
        if len(tokens) < 2:
            continue
        if fmt == "libfm":
            fields = max(fields, len(tokens) - 1)
        else:
            for tok in tokens[1:]:
                head = tok.split(":", 1)[0]
                if head.isdigit():
                    fields = max(fields, int(head) + 1)
    return fields


def columns_of(names: list[str]) -> list[str]:
    """The columns a file of these names has: label, each field, each field's ``_value``."""
    return [names[0]] + [c for n in names[1:] for c in (n, f"{n}_value")]


def parse_lines(lines: pa.Array | pa.ChunkedArray, fmt: str, names: list[str],
                ranges: list[tuple[int, int]] | None = None) -> tuple[pa.Table, np.ndarray, list[str]]:
    """Parse libFM/libFFM ``lines`` into ``columns_of(names)``; bad rows and their reasons.

    ``ranges`` (libFM only): field ``k`` holds the global indices ``ranges[k][0]..ranges[k][1]``,
    instead of the token's position. Bad rows keep their place (all null) so row positions
    still match the lines.
    """
    if isinstance(lines, pa.ChunkedArray):
        lines = lines.combine_chunks()
    n = len(lines)
    fields = len(names) - 1
    want = parts_per_token(fmt)
    text = pc.fill_null(pc.utf8_trim_whitespace(lines), "")
    tokens = pc.split_pattern_regex(text, r"\s+")
    counts = pc.list_value_length(tokens).to_numpy(zero_copy_only=False)
    label = pc.list_element(pc.list_slice(tokens, 0, 1), 0) if n else pa.array([], pa.string())
    rest = pc.list_slice(tokens, 1)
    flat = pc.list_flatten(rest)
    parent = pc.list_parent_indices(rest).to_numpy(zero_copy_only=False).astype(np.int64)
    parts = pc.split_pattern(flat, ":")
    nparts = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    bad = np.zeros(n, bool)
    reasons: dict[int, str] = {}

    def flag(rows: np.ndarray, why: str) -> None:
        for r in np.unique(rows).tolist():
            if not bad[r]:
                bad[r] = True
                reasons[r] = why

    flag(np.flatnonzero(counts == 1), "no tokens after the label")
    shape = "field:idx:val" if fmt == "libffm" else "idx:val"
    flag(parent[nparts != want], f"token not {shape}")
    shaped = nparts == want
    ok = shaped.copy()
    good = pc.filter(parts, pa.array(shaped))

    def element(i: int) -> np.ndarray:
        out = np.full(len(nparts), None, object)
        if shaped.any():
            out[shaped] = pc.list_element(good, i).to_numpy(zero_copy_only=False)
        return out

    if fmt == "libffm":
        head = element(0)
        is_num = np.array([h is not None and h.isdigit() for h in head.tolist()], bool)
        flag(parent[ok & ~is_num], "field index not a whole number")
        ok &= is_num
        field = np.full(len(nparts), -1, np.int64)
        field[ok] = head[ok].astype(np.int64)
        idx_np, val_np = element(1), element(2)
    else:
        idx_np, val_np = element(0), element(1)
        if ranges is None:
            offsets = rest.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
            field = np.arange(len(nparts), dtype=np.int64) - (offsets[parent] - offsets[0])
        else:
            is_num = np.array([h is not None and h.isdigit() for h in idx_np.tolist()], bool)
            flag(parent[ok & ~is_num], "index not a whole number")
            ok &= is_num
            index = np.full(len(nparts), -1, np.int64)
            index[ok] = idx_np[ok].astype(np.int64)
            starts = np.array([a for a, _ in ranges], np.int64)
            ends = np.array([b for _, b in ranges], np.int64)
            order = np.argsort(starts)
            pos = np.searchsorted(starts[order], index, side="right") - 1
            field = np.where(pos >= 0, order[np.maximum(pos, 0)], -1)
            inside = (pos >= 0) & (index <= ends[np.maximum(field, 0)])
            flag(parent[ok & ~inside], "index in no field's range (index_fields)")
            ok &= inside
    over = ok & (field >= fields)
    flag(parent[over], f"more fields than the {fields} named (column_names)")
    ok &= ~over
    ok &= ~bad[parent]
    columns: dict[str, pa.Array] = {names[0]: pa.array(np.where(bad, None, label.to_numpy(zero_copy_only=False)),
                                                       pa.string())} if n else {names[0]: pa.array([], pa.string())}
    keep = np.flatnonzero(ok)
    rows, cols = parent[keep], field[keep]
    key = rows * max(fields, 1) + cols
    order = np.argsort(key, kind="stable")
    repeated = np.zeros(len(key), bool)
    if len(key):
        sk = key[order]
        dup = np.flatnonzero(sk[1:] == sk[:-1])
        repeated[order[dup]] = True
        repeated[order[dup + 1]] = True
    for k, name in enumerate(names[1:]):
        sel = keep[(cols == k) & ~repeated]
        at = np.full(n, -1, np.int64)
        at[parent[sel]] = sel
        present = at >= 0
        ids = np.full(n, None, object)
        vals = np.full(n, None, object)
        ids[present] = idx_np[at[present]]
        vals[present] = val_np[at[present]]
        joined: dict[int, list[str]] = {}
        for t in keep[(cols == k) & repeated].tolist():  # a multi-valued field: its indices joined
            joined.setdefault(int(parent[t]), []).append(str(idx_np[t]))
        for r, values in joined.items():
            ids[r] = "|".join(values)
        columns[name] = pa.array(ids, pa.string())
        columns[f"{name}_value"] = pa.array(vals, pa.string())
    bad_rows = np.flatnonzero(bad)
    return pa.table(columns), bad_rows, [reasons[r] for r in bad_rows.tolist()]


__all__ = ["LINE_COLUMN", "columns_of", "default_names", "parse_lines", "parts_per_token", "sniff_fields"]
