"""Raw blocks -> prepared Parquet shards, ``feature_map.json``, vocabularies and ``stats.json``.

Preparation is fit-then-transform. ``fit_file`` turns one raw file into a mergeable
``PartialStats`` (train-split counts, moments, quantile sketches; rejects quarantined)
and spills the parsed rows, vocabulary values as their ids in a ``ValueTables`` with one
group per feature (its values beside the spill), while a reader thread parses the next block; ``merge_stats``
folds partials in file order; ``finalize_features`` fixes vocabularies and transforms;
``transform_file`` maps ids (one lookup per distinct value of the file) and writes shards.
``prepare_dataset`` runs the four locally; ``prepare_with_runner`` takes the per-file stages
from a ``FileRunner`` (``fit_into``/``transform_into`` are the self-contained per-file units a
fan-out calls), so ``pipelines/prepare.py`` runs them as a Ray map/reduce with the same commit.

Nothing is silently wrong: a row with an unusable value (unparseable, non-finite, a count
that is not a positive whole number) is a reject with its line and reason; a prepare that
leaves no training row, an output folder that holds an input, and statistics that are not
finite are errors; names that become paths stay inside their folder; temporaries of a
killed prepare are removed by the next one.

Example:
    >>> from recemb.data.schema import load_dataset_config
    >>> report = prepare_dataset(load_dataset_config("configs/datasets/criteo.yaml"))  # doctest: +SKIP
    >>> report.rows_out["train"]                                                       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import queue
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import yaml

from recemb.config.loader import to_dict
from recemb.data.hashing import hash_buckets, hash_strings_multi, row_uniform
from recemb.data.schema import (
    SPLIT_NAMES,
    SPLIT_VALUES,
    DatasetConfig,
    FeatureInfo,
    FeatureMap,
    FeatureSpec,
    name_problem,
    path_under,
)
from recemb.data.sources import (
    RawBlock,
    SourceFile,
    check_columns,
    iter_blocks,
    resolve_paths,
)
from recemb.data.value_table import ValueTable, ValueTables
from recemb.errors import ConfigError, DataError, OutputExistsError
from recemb.heap import trim_heap
from recemb.io import replace_folder, write_text_atomic

log = logging.getLogger("recemb.data")
T = TypeVar("T")

SPLITS = ("train", "valid", "test")
LABEL_COLUMN = "label"
_SKETCH_GAMMA = 1.01  # relative accuracy ~0.5% of the bucket boundaries
_COMPACT_MIN = 1 << 18
_ROW_GROUP_ROWS = 65_536
_REJECT_EXAMPLES = 5
_F32_MAX = float(np.finfo(np.float32).max)  # label, count and dense columns are written as float32


# The freed block-sized temporaries (numpy arrays, the reader's chunks, made on several
# threads) otherwise stay in glibc's arenas, and RSS would creep with the input instead of
# staying at the live working set: ``_HeapTrimmer`` gives them back (``recemb.heap.trim_heap``).
_TRIM_SLACK = 48 << 20


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _HeapTrimmer:
    """``malloc_trim`` after a block, but only once RSS has grown ``_TRIM_SLACK`` past where the
    last trim left it: trimming after every block cost ~15% of a prepare's CPU (the trim walks
    the arenas, and the next block faults the returned pages in again), for little memory."""

    def __init__(self) -> None:
        self._after: int | None = None
        self._lock = threading.Lock()

    def __call__(self, force: bool = False) -> None:
        rss = _rss_bytes()
        with self._lock:
            if not force and rss is not None and self._after is not None and rss < self._after + _TRIM_SLACK:
                return
            trim_heap()
            self._after = _rss_bytes()


_trim_heap = _HeapTrimmer()


# ----------------------------------------------------------------------------- split plan


@dataclass
class SplitPlan:
    """How rows are assigned to train/valid/test: seeded per-row uniform, time cut points,
    a split column, or the file's given split.

    By ratio, a row's uniform is ``row_uniform(file_index, line, seed)``. By time, rows
    with time ``< cut_train`` are train, ``< cut_valid`` valid, the rest test. By column,
    the row's value names its split. A given split file (``SourceFile.split``) puts all its
    rows there, except a ``holdout`` share of train files' rows (by the row's uniform) in valid.
    """

    train: float
    valid: float
    seed: int
    time_column: str | None = None
    numeric: bool = True
    cut_train: float | str | None = None
    cut_valid: float | str | None = None
    split_column: str | None = None
    split_values: dict[str, list[str | int]] | None = None
    holdout: float = 0.0  # share of given train files' rows held out as valid (split.files without valid)


def plan_split(cfg: DatasetConfig, sources: Sequence[SourceFile]) -> SplitPlan:
    """Fix the split rule; a time split reads the time column once for its quantiles.

    Example:
        >>> plan = plan_split(cfg, resolve_paths(cfg))  # doctest: +SKIP
    """
    sp = cfg.split
    plan = SplitPlan(train=sp.train, valid=sp.valid, seed=sp.seed, time_column=sp.time_column,
                     split_column=sp.column, split_values=sp.values)
    if sp.files is not None and not sp.files.get("valid"):
        plan.holdout = sp.valid
    if not sp.time_column:
        return plan
    acc = _CountAcc()
    for src in sources:
        for block in iter_blocks(cfg, src, columns=[sp.time_column]):
            col = as_string(block.table.column(sp.time_column).combine_chunks())
            vc = pc.value_counts(col.drop_null())
            acc.add(vc.field("values"), vc.field("counts").cast(pa.int64()))
    table = acc.result()
    values = table.column("value").combine_chunks()
    counts = table.column("count").to_numpy()
    try:
        keys: np.ndarray = values.cast(pa.float64()).to_numpy(zero_copy_only=False)
        plan.numeric = True
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        keys = np.asarray(values.to_pylist(), dtype=object)
        plan.numeric = False
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    before = np.concatenate([[0], np.cumsum(counts)[:-1]]) / max(1, counts.sum())

    def cut(q: float) -> float | str | None:
        idx = np.flatnonzero(before >= q - 1e-12)
        if not len(idx) or q >= 1.0:
            return None
        k = keys[idx[0]]
        return float(k) if plan.numeric else str(k)

    plan.cut_train = cut(sp.train)
    plan.cut_valid = cut(sp.train + sp.valid)
    return plan


# ----------------------------------------------------------------------------- partial stats


class _CountAcc:
    """Mergeable value -> count table; partial tables are re-aggregated when they pile up.

    Only ``plan_split`` counts time values with it (its cut points depend on the order of
    equal float keys, which this keeps); vocabularies are counted in ``ValueTables``.
    """

    def __init__(self) -> None:
        self._parts: list[pa.Table] = []
        self._pending = 0
        self._compact = 0

    def add(self, values: pa.Array, counts: pa.Array) -> None:
        if not len(values):
            return
        self._parts.append(pa.table({"value": as_string(values), "count": counts}))
        self._pending += len(values)
        if self._pending > max(_COMPACT_MIN, self._compact):
            self._squash()

    def add_table(self, table: pa.Table) -> None:
        self.add(table.column("value").combine_chunks(), table.column("count").combine_chunks())

    def _squash(self) -> None:
        table = pa.concat_tables(self._parts)
        if len(self._parts) > 1:
            table = table.group_by("value").aggregate([("count", "sum")]).rename_columns(["value", "count"])
        self._parts = [table]
        self._compact = self._pending = table.num_rows

    def result(self) -> pa.Table:
        if not self._parts:
            return pa.table({"value": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
        self._squash()
        return self._parts[0].combine_chunks()


@dataclass
class Moments:
    """Count, mean and sum of squared deviations; merged with Chan's formula (in file order)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: np.ndarray) -> None:
        if len(x):
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported by _dense_moments
                mean = float(x.mean())
                self.merge(Moments(len(x), mean, float(((x - mean) ** 2).sum())))

    def merge(self, other: Moments) -> None:
        if not other.n:
            return
        n = self.n + other.n
        delta = other.mean - self.mean
        self.mean += delta * other.n / n
        self.m2 += other.m2 + delta * delta * self.n * other.n / n
        self.n = n

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else 0.0


@dataclass
class Extremes:
    """Finite min/max of a dense feature's training values and how many were -inf/+inf.

    Kept for ``nonfinite: clip`` features: the infinities become these bounds, and the
    statistics count them there (``_dense_moments``, ``_dense_sketch``).
    """

    low: float = math.inf
    high: float = -math.inf
    n_low: int = 0
    n_high: int = 0

    def add(self, x: np.ndarray) -> None:
        finite = x[np.isfinite(x)]
        if len(finite):
            self.low, self.high = min(self.low, float(finite.min())), max(self.high, float(finite.max()))
        self.n_low += int(np.isneginf(x).sum())
        self.n_high += int(np.isposinf(x).sum())

    def merge(self, other: Extremes) -> None:
        self.low, self.high = min(self.low, other.low), max(self.high, other.high)
        self.n_low += other.n_low
        self.n_high += other.n_high


def _sketch_keys(x: np.ndarray) -> np.ndarray:
    """Log-bucket keys (DDSketch-like) of finite values: 0 for zero, sign * (1 + bucket)."""
    x = x[np.isfinite(x)]
    mag = np.abs(x)
    keys = np.zeros(len(x), dtype=np.int64)
    nz = mag > 0
    b = np.ceil(np.log(mag[nz]) / math.log(_SKETCH_GAMMA)).astype(np.int64)
    keys[nz] = np.sign(x[nz]).astype(np.int64) * (b + (1 << 20))
    return keys


def _sketch_value(key: int) -> float:
    if key == 0:
        return 0.0
    b = abs(key) - (1 << 20)
    v = 2.0 * _SKETCH_GAMMA**b / (_SKETCH_GAMMA + 1.0)
    return math.copysign(v, key)


@dataclass
class PartialStats:
    """What ``fit_file`` learns from one file; ``merge_stats`` folds these in file order.

    ``counts`` hold train-split value counts per vocabulary feature; ``moments`` the
    train-split moments of each dense feature after fill/log; ``sketches`` log-bucket
    counts for bucketised features; ``rejected`` counts rejected rows per reason;
    ``extremes`` the finite range and infinities of ``nonfinite: clip`` features.
    """

    rows_in: int = 0
    rows_ok: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    rejected: dict[str, int] = field(default_factory=dict)
    reject_examples: list[str] = field(default_factory=list)
    counts: dict[str, pa.Table] = field(default_factory=dict)
    moments: dict[str, Moments] = field(default_factory=dict)
    sketches: dict[str, dict[int, int]] = field(default_factory=dict)
    extremes: dict[str, Extremes] = field(default_factory=dict)

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())


def merge_stats(parts: Sequence[PartialStats]) -> PartialStats:
    """Fold partial statistics in the given (file) order; exact for counts and sketches.

    Example:
        >>> merged = merge_stats([fit_file(cfg, plan, s) for s in resolve_paths(cfg)])  # doctest: +SKIP
    """
    out = PartialStats()
    tables: dict[str, list[pa.Table]] = {}
    for part in parts:
        out.rows_in += part.rows_in
        for k, v in part.rows_ok.items():
            out.rows_ok[k] = out.rows_ok.get(k, 0) + v
        for k, v in part.rejected.items():
            out.rejected[k] = out.rejected.get(k, 0) + v
        out.reject_examples.extend(part.reject_examples[: max(0, _REJECT_EXAMPLES - len(out.reject_examples))])
        for name, table in part.counts.items():
            tables.setdefault(name, []).append(table)
        for name, m in part.moments.items():
            out.moments.setdefault(name, Moments()).merge(m)
        for name, sk in part.sketches.items():
            dst = out.sketches.setdefault(name, {})
            for key, c in sk.items():
                dst[key] = dst.get(key, 0) + c
        for name, ext in part.extremes.items():
            out.extremes.setdefault(name, Extremes()).merge(ext)
    out.counts = {name: _merge_counts(ts) for name, ts in tables.items()}
    return out


def _merge_counts(tables: Sequence[pa.Table]) -> pa.Table:
    """One (value, count) table from per-file ones (each with distinct values): counts summed."""
    if len(tables) == 1:
        return tables[0]
    acc = ValueTable()
    for table in tables:
        acc.add_counts(acc.ids(table.column("value")), table.column("count").to_numpy())
    return acc.count_table()


# ----------------------------------------------------------------------------- parsing blocks


def as_string(arr: pa.Array) -> pa.Array:
    """``arr`` as one (non-chunked) string array, as preparation (and serving) read raw values."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_string(arr.type):
        return arr
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    return arr if pa.types.is_string(arr.type) else arr.cast(pa.string())


def _failing_rows(arr: pa.Array, op: Callable[[pa.Array], Any]) -> np.ndarray:
    """Indices where ``op`` fails on a one-row slice, found by bisection (rare path)."""
    try:
        op(arr)
        return np.zeros(0, np.int64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        if len(arr) == 1:
            return np.zeros(1, np.int64)
    half = len(arr) // 2
    left = _failing_rows(arr.slice(0, half), op)
    right = _failing_rows(arr.slice(half), op) + half
    return np.concatenate([left, right])


def parse_float(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Values as float64 (null -> NaN) and the indices of unparseable entries."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    bad = np.zeros(0, np.int64)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        try:
            out = pc.cast(arr, pa.float64())
        except pa.ArrowInvalid:
            bad = _failing_rows(arr, lambda a: pc.cast(a, pa.float64()))
            mask = np.zeros(len(arr), bool)
            mask[bad] = True
            out = pc.cast(pc.if_else(pa.array(mask), pa.scalar(None, arr.type), arr), pa.float64())
    else:
        try:
            out = pc.cast(arr, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return np.full(len(arr), np.nan), np.arange(len(arr), dtype=np.int64)
    return out.to_numpy(zero_copy_only=False).astype(np.float64, copy=False), bad


@dataclass
class CleanBlock:
    """Accepted rows of one raw block, parsed: split codes, label/count, dense values, raw ids."""

    n: int
    split: np.ndarray
    label: np.ndarray | None
    count: np.ndarray | None
    dense: dict[str, np.ndarray]
    cats: dict[str, pa.Array]


def multi_tokens(col: pa.Array, spec: FeatureSpec | FeatureInfo) -> tuple[pa.Array, np.ndarray]:
    """Flat non-empty tokens of a multi-hot column (truncated to max_len) and list offsets."""
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        lists = col
    else:
        lists = pc.split_pattern(as_string(col), spec.separator)
    n = len(lists)
    flat = as_string(pc.list_flatten(lists))
    parents = np.asarray(pc.list_parent_indices(lists)).astype(np.int64)
    keep = np.asarray(pc.fill_null(pc.greater(pc.utf8_length(flat), 0), False))
    if not keep.all():
        flat, parents = flat.filter(pa.array(keep)), parents[keep]
    if spec.max_len and len(parents):
        per_row = np.bincount(parents, minlength=n)
        pos = np.arange(len(parents)) - (np.cumsum(per_row) - per_row)[parents]
        keep = pos < spec.max_len
        if not keep.all():
            flat, parents = flat.filter(pa.array(keep)), parents[keep]
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(parents, minlength=n), out=offsets[1:])
    return flat, offsets


def _check_config(cfg: DatasetConfig) -> None:
    # Names become paths: checked again here for configs built or changed in code.
    for what, name in [("dataset_id", cfg.dataset_id)] + [("feature name", s.name) for s in cfg.features]:
        problem = name_problem(name)
        if problem:
            raise ConfigError(f"dataset '{cfg.dataset_id}': {what} {problem}")
    for spec in cfg.features:
        if spec.hash_buckets == 1:
            raise ConfigError(f"dataset '{cfg.dataset_id}': feature '{spec.name}': hash_buckets must be >= 2")
        if spec.kind != "dense" and spec.bucketize:
            raise ConfigError(f"dataset '{cfg.dataset_id}': feature '{spec.name}': bucketize is for dense features")
    reserved = {LABEL_COLUMN, cfg.count_column}
    for spec in cfg.features:
        if spec.name in reserved:
            raise ConfigError(
                f"dataset '{cfg.dataset_id}': feature name '{spec.name}' clashes with an output column"
            )


def _absent(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """True where the field is missing (null), as opposed to present but not a usable value."""
    return np.asarray(pc.is_null(col).to_numpy(zero_copy_only=False), bool)


def _finite32(x: np.ndarray) -> np.ndarray:
    """True where ``x`` is finite and still finite as the float32 the output columns hold."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(x) & (np.abs(x) <= _F32_MAX)


def _clean(cfg: DatasetConfig, plan: SplitPlan, src: SourceFile, block: RawBlock,
           rejects: list[tuple[int, str]]) -> CleanBlock:
    """Validate one raw block, append its rejects as (line, reason), parse the accepted rows."""
    table = block.table
    n = table.num_rows
    reasons: dict[int, str] = {}
    for r, why in zip(block.bad_rows.tolist(), block.bad_reasons, strict=True):
        reasons.setdefault(r, why)

    def flag(rows: np.ndarray, why: str) -> None:
        for r in rows.tolist():
            reasons.setdefault(r, why)

    if n and cfg.format != "parquet" and table.num_columns:
        empty = np.asarray(table.column(0).is_null())
        if empty.any():
            for name in table.column_names[1:]:
                empty &= np.asarray(table.column(name).is_null())
            flag(np.flatnonzero(empty), "empty row (all fields missing)")
    label = count = None
    if cfg.label and cfg.label not in table.column_names:  # an events file without labels: unlabelled rows
        label = np.zeros(n)
    elif cfg.label:
        col = table.column(cfg.label)
        label, bad = parse_float(col)
        flag(bad, f"unparseable label '{cfg.label}'")
        flag(np.flatnonzero(_absent(col)), f"missing label '{cfg.label}'")
        flag(np.flatnonzero(~_finite32(label)), f"non-finite label '{cfg.label}'")
        if cfg.format != "events":
            flag(np.flatnonzero((label != 0) & (label != 1)), f"label '{cfg.label}' not 0 or 1")
    dense_raw: dict[str, np.ndarray] = {}
    for spec in cfg.features:
        if spec.kind == "dense":
            col = table.column(spec.source)
            values, bad = parse_float(col)
            flag(bad, f"unparseable number in '{spec.source}'")
            present = ~_absent(col)
            if spec.nonfinite == "clip":  # +-inf become the training range in the transform; nan cannot
                flag(np.flatnonzero(present & np.isnan(values)), f"nan in '{spec.source}' (cannot be clipped)")
            else:
                flag(np.flatnonzero(present & ~np.isfinite(values)), f"non-finite number in '{spec.source}'")
            dense_raw[spec.name] = values
    if cfg.count_column and cfg.count_column not in table.column_names:  # an events file without counts
        count = np.ones(n)
    elif cfg.count_column:
        col = table.column(cfg.count_column)
        count, bad = parse_float(col)
        flag(bad, f"unparseable number in '{cfg.count_column}'")
        flag(np.flatnonzero(_absent(col)), f"missing count '{cfg.count_column}'")
        with np.errstate(invalid="ignore"):
            whole = np.isfinite(count) & (count >= 1) & (np.floor(count) == count)
        flag(np.flatnonzero(~whole), f"count '{cfg.count_column}' not a positive whole number")
        flag(np.flatnonzero(~_finite32(count)), f"count '{cfg.count_column}' too large for float32")
    tvals: Any = None
    if plan.split_column:
        tcol = as_string(table.column(plan.split_column).combine_chunks())
        codes = _split_codes(tcol, plan.split_values)
        expected = "train, valid or test" if plan.split_values is None else \
            "one of split.values (" + ", ".join(str(v) for vs in plan.split_values.values() for v in vs) + ")"
        for r in np.flatnonzero(codes < 0).tolist():
            value = tcol[r].as_py()
            reasons.setdefault(r, f"split column '{plan.split_column}' holds {value!r}, not {expected}"
                               if value is not None else f"missing split '{plan.split_column}'")
        tvals = codes
    elif plan.time_column:
        tcol = table.column(plan.time_column).combine_chunks()
        flag(np.flatnonzero(np.asarray(tcol.is_null())), f"missing time '{plan.time_column}'")
        if plan.numeric:
            tvals, bad = parse_float(tcol)
            flag(bad, f"unparseable time in '{plan.time_column}'")
            flag(np.flatnonzero(~np.isfinite(tvals)), f"non-finite time in '{plan.time_column}'")
        else:
            tvals = as_string(tcol)
    keep: np.ndarray | None = None
    lines = block.lines
    if reasons:
        bad_idx = np.fromiter(sorted(reasons), np.int64)
        for r in bad_idx.tolist():
            rejects.append((int(lines[r]), reasons[r]))
        keep = np.ones(n, bool)
        keep[bad_idx] = False
        table = table.filter(pa.array(keep))
        lines = lines[keep]
        label = label[keep] if label is not None else None
        count = count[keep] if count is not None else None
        dense_raw = {k: v[keep] for k, v in dense_raw.items()}
        if tvals is not None:
            tvals = tvals[keep] if plan.numeric or plan.split_column else tvals.filter(pa.array(keep))
    m = table.num_rows
    split = _assign_split(plan, src, lines, tvals)
    dense: dict[str, np.ndarray] = {}
    cats: dict[str, pa.Array] = {}
    for spec in cfg.features:
        if spec.kind == "dense":
            x = dense_raw[spec.name]
            x = np.where(np.isnan(x), spec.fill, x)
            if spec.log:
                x = np.log1p(np.maximum(x, 0.0))
            dense[spec.name] = x
        elif spec.kind == "sparse":
            col = as_string(table.column(spec.source).combine_chunks())
            cats[spec.name] = col.dictionary_encode(null_encoding="encode")
        else:
            col = table.column(spec.source).combine_chunks()
            if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
                col = pc.split_pattern(as_string(col), spec.separator)
            cats[spec.name] = col
    return CleanBlock(m, split, label, count, dense, cats)


def _split_codes(values: pa.Array, mapping: dict[str, list[str | int]] | None = None) -> np.ndarray:
    """A split column's values as codes 0/1/2; -1 otherwise. By ``mapping`` (split -> values,
    matched exactly after trimming) when given, else ``SPLIT_VALUES`` (any case)."""
    keys = pc.utf8_trim_whitespace(values)
    if mapping is None:
        keys = pc.utf8_lower(keys)
        table = dict(SPLIT_VALUES)
    else:
        table = {str(v).strip(): SPLIT_NAMES.index(split) for split, vs in mapping.items() for v in vs}
    names = list(table)
    index = pc.index_in(keys, value_set=pa.array(names, pa.string())).to_numpy(zero_copy_only=False)
    codes = np.array([table[k] for k in names] + [-1], np.int8)
    return codes[np.where(np.isnan(index.astype(np.float64)), len(names), index).astype(np.int64)]


def _assign_split(plan: SplitPlan, src: SourceFile, lines: np.ndarray, tvals: Any) -> np.ndarray:
    if plan.split_column is not None:
        return np.asarray(tvals, np.int8)
    if src.split is not None:  # a given split file; train files may hold out a valid share
        if src.split != 0 or not plan.holdout:
            return np.full(len(lines), src.split, np.int8)
        return np.where(row_uniform(src.index, lines, plan.seed) < plan.holdout, 1, 0).astype(np.int8)
    if plan.time_column is None:
        u = row_uniform(src.index, lines, plan.seed)
        return np.where(u < plan.train, 0, np.where(u < plan.train + plan.valid, 1, 2)).astype(np.int8)
    split = np.full(len(lines), 2, np.int8)
    for code, cutv in ((1, plan.cut_valid), (0, plan.cut_train)):
        if cutv is None:
            below = np.ones(len(lines), bool)
        elif plan.numeric:
            below = tvals < cutv
        else:
            below = np.asarray(pc.fill_null(pc.less(tvals, pa.scalar(cutv)), False))
        split[below] = code
    return split


# ----------------------------------------------------------------------------- fit


class RejectWriter:
    """Appends rejected rows to ``rejects.csv`` (file, line, reason); counts per reason."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = open(path, "w", newline="", encoding="utf-8")
        self._w = csv.writer(self._f)
        self._w.writerow(["file", "line", "reason"])

    def write(self, file: str, rows: Sequence[tuple[int, str]]) -> None:
        self._w.writerows((file, line, why) for line, why in rows)

    def close(self) -> None:
        self._f.close()


def _spill_schema(cfg: DatasetConfig) -> pa.Schema:
    fields = [pa.field("__split", pa.int8())]
    if cfg.label:
        fields.append(pa.field("__label", pa.float64()))
    if cfg.count_column:
        fields.append(pa.field("__count", pa.float64()))
    for spec in cfg.features:
        if spec.kind == "dense":
            fields.append(pa.field(spec.name, pa.float64()))
        elif spec.kind == "sparse":
            # A vocabulary feature spills its ValueTables ids (-1 = missing); a hashed one its strings.
            fields.append(pa.field(spec.name, pa.dictionary(pa.int32(), pa.string()) if spec.hash_buckets
                                   else pa.int32()))
        else:
            fields.append(pa.field(spec.name, pa.list_(pa.string() if spec.hash_buckets else pa.int32())))
    return pa.schema(fields)


def _values_path(spill: Path) -> Path:
    """Beside a spill: the values of each vocabulary feature's ValueTables group, in id order."""
    return spill.with_name(spill.name.removesuffix(".arrows") + ".values.arrows")


def _write_values(cfg: DatasetConfig, path: Path, accs: _Vocabs) -> None:
    """One record batch per vocabulary feature (in feature order) holding its values by id."""
    schema = pa.schema([pa.field("value", pa.string())])
    with ipc.new_stream(str(path), schema) as writer:
        for spec in cfg.features:
            if spec.name in accs.group:
                writer.write_batch(pa.record_batch([accs.table.values(accs.group[spec.name])], schema=schema))


def _read_values(cfg: DatasetConfig, path: Path) -> dict[str, pa.Array]:
    names = [s.name for s in cfg.features if s.kind != "dense" and not s.hash_buckets]
    with pa.OSFile(str(path)) as f:
        batches = list(ipc.open_stream(f))
    return {name: b.column(0) for name, b in zip(names, batches, strict=True)}


def _to_spill(cfg: DatasetConfig, schema: pa.Schema, c: CleanBlock) -> pa.RecordBatch:
    cols: list[Any] = [pa.array(c.split)]
    if cfg.label:
        cols.append(pa.array(c.label))
    if cfg.count_column:
        cols.append(pa.array(c.count))
    for spec in cfg.features:
        if spec.kind == "dense":
            cols.append(pa.array(c.dense[spec.name]))
        else:
            arr = c.cats[spec.name]
            cols.append(arr.cast(schema.field(spec.name).type) if arr.type != schema.field(spec.name).type else arr)
    return pa.record_batch(cols, schema=schema)


def _from_spill(cfg: DatasetConfig, batch: pa.RecordBatch) -> CleanBlock:
    names = batch.schema.names
    col = batch.column
    label = col(names.index("__label")).to_numpy() if cfg.label else None
    count = col(names.index("__count")).to_numpy() if cfg.count_column else None
    dense = {s.name: col(names.index(s.name)).to_numpy() for s in cfg.features if s.kind == "dense"}
    cats = {s.name: col(names.index(s.name)) for s in cfg.features if s.kind != "dense"}
    return CleanBlock(batch.num_rows, col(0).to_numpy(), label, count, dense, cats)


def iter_clean(cfg: DatasetConfig, plan: SplitPlan, src: SourceFile,
               on_rejects: Callable[[str, list[tuple[int, str]], int], None] | None = None) -> Iterator[CleanBlock]:
    """Parsed accepted rows of ``src``, block by block; rejects go to ``on_rejects(file, rows, rows_in)``."""
    seen = 0
    for block in iter_blocks(cfg, src):
        rejects: list[tuple[int, str]] = [(line, why) for line, why in block.invalid]
        rows_in = block.table.num_rows + len(block.invalid)
        seen += rows_in
        clean = _clean(cfg, plan, src, block, rejects) if block.table.num_rows else None
        rejects.sort(key=lambda r: r[0])  # in line order within the block (stable for equal lines)
        if on_rejects is not None:
            on_rejects(str(src.path), rejects, rows_in)
        if clean is not None:
            yield clean
    if seen == 0:
        raise DataError(f"{src.path}: no data rows (dataset '{cfg.dataset_id}')")


def prefetched(items: Iterator[T], depth: int = 1) -> Iterator[T]:
    """``items`` produced on a thread of their own, at most ``depth`` ahead of the consumer.

    Reading and checking the next block (pyarrow's parser, numpy: both release the GIL)
    then overlaps fitting and spilling this one, so a prepare uses two cores. Order,
    values and exceptions are those of ``items``; a consumer that stops early stops the
    producer, which closes ``items`` on its own thread.
    """
    box: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        box.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            box.put(("end", None))
        except BaseException as exc:  # handed to the consumer, which raises it
            box.put(("error", exc))
        finally:
            if stop.is_set() and hasattr(items, "close"):
                items.close()

    thread = threading.Thread(target=produce, name="recemb-read", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = box.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
            del value
    finally:
        stop.set()
        while thread.is_alive():
            try:
                box.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


def fit_file(cfg: DatasetConfig, plan: SplitPlan, src: SourceFile, spill: Path | None = None,
             rejects: RejectWriter | None = None) -> PartialStats:
    """Fit statistics on one file's training rows; optionally spill parsed rows and write rejects.

    Example:
        >>> part = fit_file(cfg, plan_split(cfg, srcs), srcs[0])  # doctest: +SKIP
        >>> part.rows_in                                          # doctest: +SKIP
    """
    check_columns(cfg, src)
    stats = PartialStats()
    accs = _Vocabs(cfg)

    def on_rejects(file: str, rows: list[tuple[int, str]], rows_in: int) -> None:
        stats.rows_in += rows_in
        for line, why in rows:
            stats.rejected[why] = stats.rejected.get(why, 0) + 1
            if len(stats.reject_examples) < _REJECT_EXAMPLES:
                stats.reject_examples.append(f"{file}:{line}: {why}")
        if rejects is not None and rows:
            rejects.write(file, rows)

    schema = _spill_schema(cfg)
    writer = ipc.new_stream(str(spill), schema) if spill is not None else None
    try:
        for c in prefetched(iter_clean(cfg, plan, src, on_rejects)):
            _fit_block(cfg, c, stats, accs)
            if writer is not None and c.n:
                writer.write_batch(_to_spill(cfg, schema, c))
            del c
            _trim_heap()
    finally:
        if writer is not None:
            writer.close()
    if spill is not None:
        _write_values(cfg, _values_path(spill), accs)
    stats.counts = {name: accs.table.count_table(g) for name, g in accs.group.items()}
    return stats


class _Vocabs:
    """The vocabulary features of a fit: one ``ValueTables`` group each, in feature order."""

    def __init__(self, cfg: DatasetConfig) -> None:
        names = [s.name for s in cfg.features if s.kind != "dense" and not s.hash_buckets]
        self.group = {name: k for k, name in enumerate(names)}
        self.table = ValueTables(max(1, len(names)))
        self.sparse = [s for s in cfg.features if s.kind == "sparse" and s.name in self.group]


def _fit_sparse(c: CleanBlock, train: np.ndarray, weights: np.ndarray | None, accs: _Vocabs) -> None:
    """Count and map the vocabulary sparse features of a block together: their block
    dictionaries go through the table in one call, their train counts are one ``bincount``
    and their table ids one gather over a (features x rows) matrix of dictionary positions."""
    specs = accs.sparse
    arrs = [c.cats[s.name] for s in specs]
    sizes = np.array([len(a.dictionary) for a in arrs], np.int64)
    starts = np.cumsum(sizes) - sizes
    total = int(sizes.sum())
    pos = np.empty((len(arrs), c.n), np.int64)  # position in the concatenated dictionaries; total = missing
    for j, arr in enumerate(arrs):
        ind = arr.indices
        if ind.null_count:
            np.add(np.asarray(pc.fill_null(ind, total - int(starts[j]))), starts[j], out=pos[j])
        else:
            np.add(np.asarray(ind), starts[j], out=pos[j])
    entries = accs.table.entries([a.dictionary for a in arrs], [accs.group[s.name] for s in specs])
    sel = np.compress(train, pos, axis=1).ravel()  # (a boolean index on axis 1 is ~3x slower)
    if weights is not None:
        w = np.tile(weights, len(arrs))
        counts = np.rint(np.bincount(sel, weights=w, minlength=total + 1)).astype(np.int64)
    else:
        counts = np.bincount(sel, minlength=total + 1)
    accs.table.add_entry_counts(entries, counts[:total])  # a null entry (-1) gets no count
    lut = np.append(accs.table.local_ids(entries), -1).astype(np.int32)
    row_ids = lut[pos]
    for j, spec in enumerate(specs):
        c.cats[spec.name] = pa.array(row_ids[j])


def _fit_block(cfg: DatasetConfig, c: CleanBlock, stats: PartialStats, accs: _Vocabs) -> None:
    """Add one block to the statistics; vocabulary features' values in ``c.cats`` become table ids."""
    train = c.split == 0
    for code, name in enumerate(SPLITS):
        stats.rows_ok[name] += int((c.split == code).sum())
    weights = c.count[train] if c.count is not None else None
    for spec in cfg.features:
        if spec.kind == "dense":
            x = c.dense[spec.name][train]
            if spec.nonfinite == "clip":
                stats.extremes.setdefault(spec.name, Extremes()).add(x)
                x = x[np.isfinite(x)]
            stats.moments.setdefault(spec.name, Moments()).add(x)
            if spec.bucketize:
                keys, cnt = np.unique(_sketch_keys(x), return_counts=True)
                sk = stats.sketches.setdefault(spec.name, {})
                for key, k in zip(keys.tolist(), cnt.tolist(), strict=True):
                    sk[key] = sk.get(key, 0) + k
        elif spec.kind == "multihot" and spec.name in accs.group:
            flat, offsets = multi_tokens(c.cats[spec.name], spec)
            rows = np.repeat(np.arange(c.n), np.diff(offsets))
            sel = train[rows]
            enc = flat.dictionary_encode()
            every = np.asarray(enc.indices)
            idx = every[sel]
            w = c.count[rows[sel]] if c.count is not None else None
            dictionary = enc.dictionary
            if w is not None:
                counts = np.rint(np.bincount(idx, weights=w, minlength=len(dictionary))).astype(np.int64)
            else:
                counts = np.bincount(idx, minlength=len(dictionary)).astype(np.int64)
            entries = accs.table.entries([dictionary], [accs.group[spec.name]])
            accs.table.add_entry_counts(entries, counts)
            row_ids = accs.table.local_ids(entries).astype(np.int32)[every]
            c.cats[spec.name] = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(row_ids))
    if accs.sparse and c.n:
        _fit_sparse(c, train, weights, accs)


# ----------------------------------------------------------------------------- finalize


class VocabIndex:
    """Maps strings to vocabulary ids (1..V; 0 = unknown) with a numpy open-addressing table.

    Keys are matched on two independent hashes (64 + 32 bits), so a false match needs a
    96-bit collision; lookups are a few vectorised gathers, with no per-value Python.

    Example:
        >>> import pyarrow as pa
        >>> VocabIndex(pa.array(["a", "b"])).lookup(pa.array(["b", "z", None])).tolist()
        [2, 0, 0]
    """

    _SEEDS = (0x5EED, 0xC0FFEE)

    def __init__(self, values: pa.Array) -> None:
        self.values = as_string(values)
        n = len(self.values)
        bits = max(3, int(np.ceil(np.log2(max(1, 2 * n)))))
        self._mask = (1 << bits) - 1
        self._shift = np.uint64(64 - bits)
        self._h1 = np.zeros(1 << bits, np.uint64)
        self._h2 = np.zeros(1 << bits, np.uint32)
        self._id = np.zeros(1 << bits, np.int32)
        h1, h2 = hash_strings_multi(self.values, self._SEEDS)
        h2 = (h2 >> np.uint64(32)).astype(np.uint32)
        pending = np.arange(n, dtype=np.int64)
        slot = (h1 >> self._shift).astype(np.int64)
        while len(pending):
            cand = slot[pending]
            free = self._id[cand] == 0
            _, first = np.unique(cand[free], return_index=True)
            won = pending[free][first]
            self._h1[slot[won]], self._h2[slot[won]], self._id[slot[won]] = h1[won], h2[won], won + 1
            lost = np.ones(len(pending), bool)
            lost[np.flatnonzero(free)[first]] = False
            pending = pending[lost]
            slot[pending] = (slot[pending] + 1) & self._mask

    def __len__(self) -> int:
        return len(self.values)

    def lookup(self, keys: pa.Array) -> np.ndarray:
        keys = as_string(keys)
        out = np.zeros(len(keys), np.int64)
        if not len(self.values) or not len(keys):
            return out
        h1, h2 = hash_strings_multi(keys, self._SEEDS)
        h2 = (h2 >> np.uint64(32)).astype(np.uint32)
        pending = np.arange(len(keys), dtype=np.int64)
        slot = (h1 >> self._shift).astype(np.int64)
        while len(pending):
            s = slot[pending]
            ids = self._id[s]
            found = (ids != 0) & (self._h1[s] == h1[pending]) & (self._h2[s] == h2[pending])
            out[pending[found]] = ids[found]
            pending = pending[~found & (ids != 0)]
            slot[pending] = (slot[pending] + 1) & self._mask
        if keys.null_count:
            out[np.asarray(keys.is_null())] = 0
        return out


@dataclass
class FittedFeatures:
    """Fitted transforms: the feature-map entries plus the vocabularies (value, count, id order)."""

    infos: list[FeatureInfo]
    vocabs: dict[str, pa.Table]
    indexes: dict[str, VocabIndex] = field(default_factory=dict)

    def index(self, name: str) -> VocabIndex:
        if name not in self.indexes:
            self.indexes[name] = VocabIndex(self.vocabs[name].column("value").combine_chunks())
        return self.indexes[name]


def finalize_features(cfg: DatasetConfig, stats: PartialStats) -> FittedFeatures:
    """Turn merged statistics into ``FeatureInfo``s and vocabularies (ids by count desc, value).

    Example:
        >>> fitted = finalize_features(cfg, merge_stats(parts))  # doctest: +SKIP
        >>> fitted.infos[0].num_embeddings                       # doctest: +SKIP
    """
    infos: list[FeatureInfo] = []
    vocabs: dict[str, pa.Table] = {}
    for spec in cfg.features:
        info = FeatureInfo(name=spec.name, kind=spec.kind, source=spec.source, min_count=spec.min_count,
                           max_len=spec.max_len, separator=spec.separator, group=spec.group)
        if spec.kind == "dense":
            m = _dense_moments(cfg, spec, stats)
            info.fill, info.log = spec.fill, spec.log
            if spec.nonfinite == "clip":
                ext = stats.extremes.get(spec.name, Extremes())
                info.clip = [ext.low, ext.high] if ext.low <= ext.high else None
            if spec.standardize:
                info.mean, info.std = m.mean, (m.std if m.std > 0 else 1.0)
            if spec.bucketize:
                info.boundaries = _boundaries(_dense_sketch(spec, stats), spec.bucketize)
                info.num_embeddings = len(info.boundaries) + 2
        elif spec.hash_buckets:
            info.hash_buckets, info.hash_seed = spec.hash_buckets, cfg.split.seed
            info.num_embeddings = spec.hash_buckets
        else:
            table = stats.counts.get(spec.name)
            if table is None:
                table = _CountAcc().result()
            info.cardinality = table.num_rows
            kept = table.filter(pc.greater_equal(table.column("count"), spec.min_count))
            kept = kept.sort_by([("count", "descending"), ("value", "ascending")])
            ids = pa.array(np.arange(1, kept.num_rows + 1, dtype=np.int64))
            vocabs[spec.name] = pa.table({"value": kept.column("value").cast(pa.string()), "id": ids,
                                          "count": kept.column("count").cast(pa.int64())})
            info.num_embeddings = kept.num_rows + 1
            info.vocab_file = f"vocab/{spec.name}.parquet"
        infos.append(info)
    return FittedFeatures(infos, vocabs)


def _dense_moments(cfg: DatasetConfig, spec: FeatureSpec, stats: PartialStats) -> Moments:
    """Training moments of a dense feature, with clipped infinities counted at the clip bounds.

    Raises a ``DataError`` naming the feature when they are not finite (values near the
    float64 limit) or when there is no finite value to clip infinities to.
    """
    m = stats.moments.get(spec.name, Moments())
    ext = stats.extremes.get(spec.name)
    if spec.nonfinite == "clip" and ext is not None and (ext.n_low or ext.n_high):
        if ext.low > ext.high:
            raise DataError(f"dataset '{cfg.dataset_id}': feature '{spec.name}': the training split has no "
                            "finite value to clip -inf/+inf to; fix the input or set nonfinite: reject")
        m = Moments(m.n, m.mean, m.m2)
        m.merge(Moments(ext.n_low, ext.low, 0.0))
        m.merge(Moments(ext.n_high, ext.high, 0.0))
    if not (math.isfinite(m.mean) and math.isfinite(m.std)):
        raise DataError(f"dataset '{cfg.dataset_id}': feature '{spec.name}': the training mean/std of "
                        f"'{spec.source}' overflow float64 (values near 1e308); set log: true or bucketize")
    return m


def _dense_sketch(spec: FeatureSpec, stats: PartialStats) -> dict[int, int]:
    """The quantile sketch of a dense feature, with clipped infinities counted at the clip bounds."""
    sketch = dict(stats.sketches.get(spec.name, {}))
    ext = stats.extremes.get(spec.name)
    if ext is not None and ext.low <= ext.high:
        for value, n in ((ext.low, ext.n_low), (ext.high, ext.n_high)):
            if n:
                key = int(_sketch_keys(np.array([value]))[0])
                sketch[key] = sketch.get(key, 0) + n
    return sketch


def _boundaries(sketch: dict[int, int], bins: int) -> list[float]:
    if not sketch:
        return []
    keys = sorted(sketch, key=_sketch_value)
    counts = np.array([sketch[k] for k in keys], dtype=np.float64)
    cum = np.cumsum(counts) / counts.sum()
    out: list[float] = []
    for q in (i / bins for i in range(1, bins)):
        v = _sketch_value(keys[int(np.searchsorted(cum, q - 1e-12))])
        if not out or v > out[-1]:
            out.append(v)
    return out


# ----------------------------------------------------------------------------- transform


def output_schema(cfg: DatasetConfig, fitted: FittedFeatures) -> pa.Schema:
    """The fixed schema of every prepared shard."""
    fields = []
    if cfg.label:
        fields.append(pa.field(LABEL_COLUMN, pa.float32()))
    if cfg.count_column:
        fields.append(pa.field(cfg.count_column, pa.float32()))
    for info in fitted.infos:
        if info.kind == "multihot":
            fields.append(pa.field(info.name, pa.list_(pa.int64())))
        elif info.is_categorical:
            fields.append(pa.field(info.name, pa.int64()))
        else:
            fields.append(pa.field(info.name, pa.float32()))
    return pa.schema(fields)


class ShardWriter:
    """Writes one split as Parquet shards of exactly ``shard_rows`` rows (the last may be short).

    Encoding and compression run on ``executor`` (a one-thread pool, of this writer or
    shared by the split writers, keeps writes ordered) while the caller maps the next
    block; at most a few row groups wait in the queue, so memory stays bounded.
    """

    def __init__(self, folder: Path, schema: pa.Schema, shard_rows: int, prefix: str = "part-",
                 executor: ThreadPoolExecutor | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.schema, self.shard_rows, self.prefix = folder, schema, shard_rows, prefix
        self.files: list[str] = []
        self.rows = 0
        self._buf: list[pa.Table] = []
        self._buffered = 0
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0
        self._executor = executor
        self._queue: list[Future[None]] = []

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self._buf.append(table)
        self._buffered += table.num_rows
        while self._buffered >= min(_ROW_GROUP_ROWS, self.shard_rows - self._in_shard):
            self._flush(min(_ROW_GROUP_ROWS, self.shard_rows - self._in_shard))

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self._buf)
        head, rest = table.slice(0, rows), table.slice(rows)
        self._buf = [rest] if rest.num_rows else []
        self._buffered = rest.num_rows
        name = None
        if self._in_shard == 0:
            name = f"{self.prefix}{len(self.files):05d}.parquet"
            self.files.append(name)
        self._in_shard += head.num_rows
        self.rows += head.num_rows
        last = self._in_shard >= self.shard_rows
        if last:
            self._in_shard = 0
        if self._executor is None:
            self._write(head, name, last)
            return
        self._queue.append(self._executor.submit(self._write, head, name, last))
        while len(self._queue) > 2:
            self._queue.pop(0).result()

    def _write(self, head: pa.Table, name: str | None, last: bool) -> None:
        if name is not None:
            self._writer = pq.ParquetWriter(str(self.folder / name), self.schema)
        assert self._writer is not None
        self._writer.write_table(head)
        if last:
            self._writer.close()
            self._writer = None

    def close(self) -> list[str]:
        if self._buffered:
            self._flush(self._buffered)
        for fut in self._queue:
            fut.result()
        self._queue = []
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if not self.files:
            name = f"{self.prefix}00000.parquet"
            pq.write_table(self.schema.empty_table(), str(self.folder / name))
            self.files.append(name)
        return self.files


@dataclass
class TransformStats:
    """Per-split rows written, label sums and id-0 (OOV/missing) counts per feature."""

    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    label_sum: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0.0))
    oov: dict[str, dict[str, int]] = field(default_factory=dict)
    values: dict[str, dict[str, int]] = field(default_factory=dict)

    def merge(self, other: TransformStats) -> None:
        for s in SPLITS:
            self.rows[s] += other.rows[s]
            self.label_sum[s] += other.label_sum[s]
        for src, dst in ((other.oov, self.oov), (other.values, self.values)):
            for name, per in src.items():
                d = dst.setdefault(name, dict.fromkeys(SPLITS, 0))
                for s in SPLITS:
                    d[s] += per[s]


def _lut_ids(fitted: FittedFeatures, info: FeatureInfo, dictionary: pa.Array) -> np.ndarray:
    if info.hash_buckets:
        return hash_buckets(as_string(dictionary), info.hash_seed, info.hash_buckets)
    return fitted.index(info.name).lookup(dictionary)


def _file_vocab_ids(fitted: FittedFeatures, info: FeatureInfo, values: pa.Array) -> np.ndarray:
    """Vocabulary ids (0 = not in it) of a file's distinct values: one ``pc.index_in`` (a hash
    table of the vocabulary in C++, ~3x faster than building a ``VocabIndex`` for one lookup)."""
    vocab = fitted.vocabs[info.name].column("value").combine_chunks()
    values = as_string(values)
    if not len(vocab) or not len(values):
        return np.zeros(len(values), np.int64)
    pos = pc.index_in(values, value_set=vocab)
    return np.asarray(pc.fill_null(pos, -1)).astype(np.int64) + 1


def _transform_block(cfg: DatasetConfig, fitted: FittedFeatures, schema: pa.Schema, c: CleanBlock,
                     tstats: TransformStats, luts: dict[str, np.ndarray] | None = None) -> dict[str, pa.Table]:
    """Map one parsed block to output columns; returns its rows grouped per split.

    A feature in ``luts`` holds ValueTables ids (a spill): its vocabulary ids are ``lut[id]``
    (the last entry, 0, for -1 = missing); other features hold strings, looked up per block.
    """
    luts = luts or {}
    split = c.split
    perm = np.argsort(split, kind="stable")
    bounds = np.searchsorted(split[perm], np.arange(len(SPLITS) + 1))
    per_split = np.diff(bounds)
    # One gather per split, so each split's columns own their memory: a zero-copy slice
    # would keep the whole block alive in the writer buffer of a small split.
    parts = [perm[bounds[k]:bounds[k + 1]] for k in range(len(SPLITS))]
    whole = next((k for k in range(len(SPLITS)) if per_split[k] == c.n), None)
    cols: list[list[pa.Array]] = [[] for _ in SPLITS]

    def add(values: np.ndarray, dtype: Any) -> None:
        values = values.astype(dtype, copy=False)
        for k in range(len(SPLITS)):
            cols[k].append(pa.array(values if k == whole else values[parts[k]]))

    def oov(name: str, zero: np.ndarray, where: np.ndarray = split, totals: np.ndarray = per_split) -> None:
        z = np.bincount(where[zero], minlength=len(SPLITS))
        o = tstats.oov.setdefault(name, dict.fromkeys(SPLITS, 0))
        t = tstats.values.setdefault(name, dict.fromkeys(SPLITS, 0))
        for code, s in enumerate(SPLITS):
            o[s] += int(z[code])
            t[s] += int(totals[code])

    if cfg.label:
        add(c.label, np.float32)
    if cfg.count_column:
        add(c.count, np.float32)
    for info in fitted.infos:
        if info.kind == "dense":
            x = c.dense[info.name]
            if info.clip is not None:
                x = np.where(np.isposinf(x), info.clip[1], np.where(np.isneginf(x), info.clip[0], x))
            if info.boundaries is not None:
                ids = np.searchsorted(np.asarray(info.boundaries, np.float64), x, side="right") + 1
                ids[np.isnan(x)] = 0
                add(ids, np.int64)
                oov(info.name, ids == 0)
            else:
                with np.errstate(over="ignore", invalid="ignore"):
                    y = ((x - info.mean) / info.std).astype(np.float32)
                if not np.isfinite(y).all():
                    raise DataError(
                        f"dataset '{cfg.dataset_id}': feature '{info.name}': a value of '{info.source}' is beyond "
                        "the float32 range of the prepared column; set log: true, standardize: true or bucketize"
                    )
                add(y, np.float32)
        elif info.kind == "sparse":
            arr = c.cats[info.name]
            if info.name in luts:
                ids = luts[info.name][np.asarray(arr)]
            else:
                lut = np.append(_lut_ids(fitted, info, arr.dictionary), 0)
                idx = np.asarray(pc.fill_null(arr.indices, len(lut) - 1) if arr.indices.null_count else arr.indices)
                ids = lut[idx]
            add(ids, np.int64)
            oov(info.name, ids == 0)
        else:
            if info.name in luts:  # tokens already split, filtered and truncated by the fit
                held = c.cats[info.name]
                offsets = np.asarray(held.offsets).astype(np.int64)
                ids = luts[info.name][np.asarray(held.values)[offsets[0]:offsets[-1]]]
                offsets -= offsets[0]
            else:
                flat, offsets = multi_tokens(c.cats[info.name], info)
                enc = flat.dictionary_encode()
                ids = _lut_ids(fitted, info, enc.dictionary)[np.asarray(enc.indices)] if len(flat) \
                    else np.zeros(0, np.int64)
            lists = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids, pa.int64()))
            for k in range(len(SPLITS)):
                cols[k].append(lists if k == whole else lists.take(pa.array(parts[k])))
            rows = np.repeat(np.arange(c.n), np.diff(offsets))
            oov(info.name, ids == 0, split[rows], np.bincount(split[rows], minlength=len(SPLITS)))
    for code, name in enumerate(SPLITS):
        tstats.rows[name] += int(per_split[code])
        if c.label is not None:
            tstats.label_sum[name] += float(c.label[split == code].sum())
    return {name: pa.Table.from_arrays(cols[k], schema=schema) for k, name in enumerate(SPLITS)}


def transform_file(cfg: DatasetConfig, fitted: FittedFeatures, plan: SplitPlan, src: SourceFile,
                   writers: dict[str, ShardWriter], spill: Path | None = None) -> TransformStats:
    """Map one file's rows to ids and write them to the split writers (from its spill if given).

    Example:
        >>> ts = transform_file(cfg, fitted, plan, src, writers)  # doctest: +SKIP
    """
    schema = output_schema(cfg, fitted)
    tstats = TransformStats()
    if spill is not None:
        luts = {}
        infos = {info.name: info for info in fitted.infos}
        for name, values in _read_values(cfg, _values_path(spill)).items():
            luts[name] = np.append(_file_vocab_ids(fitted, infos[name], values), 0)
        with pa.OSFile(str(spill)) as f:
            blocks: Iterator[CleanBlock] = (_from_spill(cfg, b) for b in ipc.open_stream(f))
            _transform_all(cfg, fitted, schema, blocks, writers, tstats, luts)
    else:
        _transform_all(cfg, fitted, schema, iter_clean(cfg, plan, src), writers, tstats)
    return tstats


def _transform_all(cfg: DatasetConfig, fitted: FittedFeatures, schema: pa.Schema, blocks: Iterator[CleanBlock],
                   writers: dict[str, ShardWriter], tstats: TransformStats,
                   luts: dict[str, np.ndarray] | None = None) -> None:
    for c in blocks:
        for name, part in _transform_block(cfg, fitted, schema, c, tstats, luts).items():
            writers[name].write(part)
        del c, part
        _trim_heap()


def save_vocabs(fitted: FittedFeatures, folder: Path) -> None:
    """Write one ``<name>.parquet`` (value, id, count) per vocabulary feature, never outside ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, table in fitted.vocabs.items():
        problem = name_problem(name)
        if problem:
            raise ConfigError(f"feature name {problem}")
        pq.write_table(table, str(path_under(folder, f"{name}.parquet")))


def load_vocab(path: str | Path) -> pa.Table:
    """Read a saved vocabulary (value, id, count) for serving-time id mapping."""
    return pq.read_table(str(path))


# ----------------------------------------------------------------------------- per-file stages

_SPILL_DIR = "_spill"
_REJECTS_CSV = "rejects.csv"


def spill_path(tmp: Path, src: SourceFile) -> Path:
    """Where the fit of ``src`` spills its parsed rows inside the temp output ``tmp``."""
    return tmp / _SPILL_DIR / f"{src.index:05d}.arrows"


class FileRunner(Protocol):
    """Runs the per-file stages of a prepare into the temp output ``tmp``.

    ``fit`` returns one ``PartialStats`` per source in file order, leaves each file's
    spill at ``spill_path`` and ``rejects/rejects.csv`` in file order; ``transform`` writes
    the shards of every file under ``tmp/<split>/`` and returns them per split (paths
    relative to ``tmp``, in a deterministic order) with the merged ``TransformStats``.
    """

    def fit(self, cfg: DatasetConfig, plan: SplitPlan, sources: Sequence[SourceFile],
            tmp: Path) -> list[PartialStats]: ...

    def transform(self, cfg: DatasetConfig, fitted: FittedFeatures, plan: SplitPlan,
                  sources: Sequence[SourceFile], tmp: Path) -> tuple[dict[str, list[str]], TransformStats]: ...


class LocalRunner:
    """Files one after another in this process; one sequence of full shards per split.

    Example:
        >>> prepare_with_runner(cfg, LocalRunner())  # doctest: +SKIP
    """

    def fit(self, cfg: DatasetConfig, plan: SplitPlan, sources: Sequence[SourceFile],
            tmp: Path) -> list[PartialStats]:
        rejects = RejectWriter(tmp / "rejects" / _REJECTS_CSV)
        try:
            return [fit_file(cfg, plan, s, spill_path(tmp, s), rejects) for s in sources]
        finally:
            rejects.close()

    def transform(self, cfg: DatasetConfig, fitted: FittedFeatures, plan: SplitPlan,
                  sources: Sequence[SourceFile], tmp: Path) -> tuple[dict[str, list[str]], TransformStats]:
        schema = output_schema(cfg, fitted)
        tstats = TransformStats()
        with contextlib.ExitStack() as stack:
            # A writer thread per split (each split's writes stay ordered), so the train split's
            # encoding, the longest serial piece of the transform, never waits behind the small
            # splits' (a fan-out task, ``transform_into``, keeps one writer thread).
            pools = {s: stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"recemb-parquet-{s}"))
                     for s in SPLITS}
            writers = {s: ShardWriter(tmp / s, schema, cfg.shard_rows, executor=pools[s]) for s in SPLITS}
            for src in sources:
                spill = spill_path(tmp, src)
                tstats.merge(transform_file(cfg, fitted, plan, src, writers, spill))
                spill.unlink()
                _values_path(spill).unlink()
            shards = {s: [f"{s}/{f}" for f in w.close()] for s, w in writers.items()}
        return shards, tstats


def _file_rejects(tmp: Path, src: SourceFile) -> Path:
    return tmp / "rejects" / f"part-{src.index:05d}.csv"


def fit_into(cfg: DatasetConfig, plan: SplitPlan, src: SourceFile, tmp: Path) -> PartialStats:
    """Fit one file on its own (a fan-out task): spill to ``spill_path``, rejects to a per-file csv.

    ``join_rejects`` later concatenates the per-file rejects in file order.

    Example:
        >>> parts = [fit_into(cfg, plan, s, tmp) for s in sources]  # doctest: +SKIP
        >>> join_rejects(tmp, sources)                               # doctest: +SKIP
    """
    with _system_memory_pool():
        rejects = RejectWriter(_file_rejects(tmp, src))
        try:
            return fit_file(cfg, plan, src, spill_path(tmp, src), rejects)
        finally:
            rejects.close()


def join_rejects(tmp: Path, sources: Sequence[SourceFile]) -> None:
    """Concatenate the per-file rejects of ``fit_into`` into ``rejects/rejects.csv``, in file order."""
    with open(tmp / "rejects" / _REJECTS_CSV, "wb") as out:
        for k, src in enumerate(sources):
            part = _file_rejects(tmp, src)
            with open(part, "rb") as f:
                header = f.readline()
                if k == 0:
                    out.write(header)
                shutil.copyfileobj(f, out)
            part.unlink()


def transform_into(cfg: DatasetConfig, fitted: FittedFeatures, plan: SplitPlan, src: SourceFile,
                   tmp: Path) -> tuple[dict[str, list[str]], TransformStats]:
    """Transform one file from its spill into ``tmp/<split>/part-<file>-<n>.parquet`` (a fan-out task).

    Returns its shards per split (relative to ``tmp``; a split without rows here has none)
    and its ``TransformStats``; ``join_shards`` lists the shards of all files.

    Example:
        >>> shards, ts = transform_into(cfg, fitted, plan, sources[0], tmp)  # doctest: +SKIP
    """
    spill = spill_path(tmp, src)
    schema = output_schema(cfg, fitted)
    prefix = f"part-{src.index:05d}-"
    with _system_memory_pool(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="recemb-parquet") as pool:
        writers = {s: ShardWriter(tmp / s, schema, cfg.shard_rows, prefix=prefix, executor=pool) for s in SPLITS}
        tstats = transform_file(cfg, fitted, plan, src, writers, spill)
        shards: dict[str, list[str]] = {}
        for s, w in writers.items():
            files = w.close()
            if not w.rows:  # close() wrote one empty shard: ``join_shards`` adds one only if all are empty
                (tmp / s / files[0]).unlink()
                files = []
            shards[s] = [f"{s}/{f}" for f in files]
    spill.unlink()
    _values_path(spill).unlink()
    return shards, tstats


def join_shards(cfg: DatasetConfig, fitted: FittedFeatures, tmp: Path,
                per_file: Sequence[dict[str, list[str]]]) -> dict[str, list[str]]:
    """The shards of ``transform_into`` per split in file order; an empty split gets one empty shard.

    Example:
        >>> join_shards(cfg, fitted, tmp, [{"train": ["train/part-00000-00000.parquet"]}])["train"]  # doctest: +SKIP
        ['train/part-00000-00000.parquet']
    """
    shards: dict[str, list[str]] = {s: [f for part in per_file for f in part.get(s, [])] for s in SPLITS}
    for s, files in shards.items():
        if not files:
            (tmp / s).mkdir(parents=True, exist_ok=True)
            pq.write_table(output_schema(cfg, fitted).empty_table(), str(tmp / s / "part-00000.parquet"))
            files.append(f"{s}/part-00000.parquet")
    return shards


# ----------------------------------------------------------------------------- driver


@dataclass
class PrepareReport:
    """What ``prepare_dataset`` did: rows in, rows out per split, rejects per reason, time."""

    dataset_id: str
    output: str
    rows_in: int
    rows_out: dict[str, int]
    rejected: dict[str, int]
    seconds: float

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())

    def to_dict(self) -> dict[str, Any]:
        return {"dataset_id": self.dataset_id, "output": self.output, "rows_in": self.rows_in,
                "rows_out": dict(self.rows_out), "rows_rejected": self.rows_rejected,
                "rejected": dict(self.rejected), "seconds": self.seconds}


def check_rows_left(cfg: DatasetConfig, stats: PartialStats, sources: Sequence[SourceFile]) -> None:
    """Raise ``DataError`` when no row is left for the training split, saying what was read and rejected."""
    if stats.rows_ok["train"]:
        return
    inputs = ", ".join(str(s.path) for s in sources[:3]) + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")
    if stats.rejected:
        top = sorted(stats.rejected.items(), key=lambda kv: -kv[1])[:3]
        rejected = f"{stats.rows_rejected} rejected ({'; '.join(f'{why}: {n}' for why, n in top)}"
        rejected += f"; e.g. {stats.reject_examples[0]})" if stats.reject_examples else ")"
    else:
        rejected = "none rejected"
    raise DataError(
        f"dataset '{cfg.dataset_id}': no rows for the train split: {stats.rows_in} rows read from {inputs}, "
        f"{rejected}, {stats.rows_ok['valid']} valid and {stats.rows_ok['test']} test. "
        "Fix the input, or the split (split.train, split.time_column, split.column, split.files)"
    )


def check_reject_fraction(stats: PartialStats, max_fraction: float) -> None:
    """Raise ``DataError`` when more than ``max_fraction`` of the input rows were rejected."""
    if not stats.rows_in:
        return
    frac = stats.rows_rejected / stats.rows_in
    if frac > max_fraction:
        top = max(stats.rejected.items(), key=lambda kv: kv[1])
        example = stats.reject_examples[0] if stats.reject_examples else ""
        raise DataError(
            f"{stats.rows_rejected} of {stats.rows_in} rows rejected ({frac:.2%}), more than "
            f"max_reject_fraction {max_fraction:g}; most common: {top[0]} ({top[1]} rows), e.g. {example}. "
            "Fix the input or raise --max-reject-fraction"
        )


@contextlib.contextmanager
def _system_memory_pool() -> Iterator[None]:
    """Use the system allocator for Arrow while preparing (restored afterwards).

    mimalloc keeps freed block-sized buffers of the reader threads for reuse, which
    measured ~30% above glibc malloc + ``malloc_trim`` in peak RSS on a streaming prepare.
    """
    old = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(old)


def prepare_dataset(cfg: DatasetConfig, output: str | Path | None = None, overwrite: bool = False,
                    max_reject_fraction: float | None = None) -> PrepareReport:
    """Prepare ``cfg``'s raw files into ``output`` (default ``cfg.output``), atomically.

    Writes ``{train,valid,test}/part-*.parquet``, ``feature_map.json``, ``vocab/*.parquet``,
    ``stats.json``, ``dataset_config.yaml`` (the resolved config) and ``rejects/rejects.csv``. Refuses an existing output unless ``overwrite``.

    Example:
        >>> cfg = load_dataset_config("configs/datasets/criteo.yaml")  # doctest: +SKIP
        >>> prepare_dataset(cfg, "data/criteo", overwrite=True).rows_in  # doctest: +SKIP
        10000
    """
    return prepare_with_runner(cfg, LocalRunner(), output, overwrite, max_reject_fraction)


def prepare_with_runner(cfg: DatasetConfig, runner: FileRunner, output: str | Path | None = None,
                        overwrite: bool = False, max_reject_fraction: float | None = None) -> PrepareReport:
    """``prepare_dataset`` with the per-file fit and transform stages run by ``runner``.

    Planning, the merge (in file order), finalizing, ``stats.json``/``feature_map.json`` and
    the atomic commit are the same whichever runner; so are the results, up to shard names.

    Example:
        >>> prepare_with_runner(cfg, LocalRunner(), "data/criteo", overwrite=True)  # doctest: +SKIP
    """
    start = time.perf_counter()
    out = Path(output or cfg.output)
    frac = cfg.max_reject_fraction if max_reject_fraction is None else max_reject_fraction
    if not 0.0 <= frac <= 1.0:
        raise ConfigError(f"max_reject_fraction must be in [0, 1], got {frac}")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: output exists; pass overwrite=True (--overwrite) to replace it")
    _check_config(cfg)
    sources = resolve_paths(cfg)
    check_output_apart(out, sources)
    for src in sources:
        check_columns(cfg, src)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with _system_memory_pool():
            report = _prepare_into(cfg, sources, tmp, out, frac, start, runner)
        _commit(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.seconds = time.perf_counter() - start
    return report


def check_output_apart(out: Path, sources: Sequence[SourceFile]) -> None:
    """Raise ``ConfigError`` when the output folder is an input file or holds one.

    ``--overwrite`` replaces the whole output folder, so either would delete raw input.
    Paths are compared both as given (absolute) and with links resolved.
    """
    outs = {Path(os.path.abspath(out)), out.resolve()}
    for src in sources:
        for path in {Path(os.path.abspath(src.path)), src.path.resolve()}:
            for o in outs:
                if path == o or o in path.parents:
                    how = "is" if path == o else "contains"
                    raise ConfigError(f"output {out} {how} the input file {src.path}; preparing there would "
                                      "delete it: choose an output folder outside the inputs")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove ``.<out>.tmp-<pid>-*`` / ``.<out>.old-<pid>-*`` left beside ``out`` by a killed prepare.

    Only names of exactly that pattern whose process is gone on this machine are removed
    (a prepare on another machine sharing the folder is not seen, so do not run two at once
    into the same output). Each removal is logged as a warning; returns the removed paths.
    """
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)-[0-9a-f]{{8}}")
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for path in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        log.warning("removed stale temporary %s from a prepare that was killed", path)
        removed.append(path)
    return removed


def _write_json(path: Path, data: Any) -> None:
    """Indented, key-sorted JSON written atomically; a non-finite number is a bug (``ValueError``)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def _prepare_into(cfg: DatasetConfig, sources: list[SourceFile], tmp: Path, out: Path, frac: float,
                  start: float, runner: FileRunner) -> PrepareReport:
    """Fit, check rejects, finalize and transform into the temp folder ``tmp`` (renamed later)."""
    plan = plan_split(cfg, sources)
    spills = tmp / _SPILL_DIR
    spills.mkdir()
    parts = runner.fit(cfg, plan, sources, tmp)
    stats = merge_stats(parts)
    del parts
    check_reject_fraction(stats, frac)
    check_rows_left(cfg, stats, sources)
    fitted = finalize_features(cfg, stats)
    stats.counts = {}  # all distinct values: no longer needed once the vocabularies are fixed
    _trim_heap(force=True)
    save_vocabs(fitted, tmp / "vocab")
    shards, tstats = runner.transform(cfg, fitted, plan, sources, tmp)
    shutil.rmtree(spills)
    fmap = FeatureMap(dataset_id=cfg.dataset_id, label=LABEL_COLUMN if cfg.label else None,
                      features=fitted.infos, shards=shards, rows=dict(tstats.rows),
                      count_column=cfg.count_column)
    fmap.save(tmp / "feature_map.json")
    write_text_atomic(tmp / "dataset_config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    seconds = time.perf_counter() - start
    report = PrepareReport(cfg.dataset_id, str(out), stats.rows_in, dict(tstats.rows),
                           dict(sorted(stats.rejected.items())), seconds)
    if stats.rows_in != sum(tstats.rows.values()) + stats.rows_rejected:
        raise RuntimeError(f"row accounting broken: {report.to_dict()}")  # a bug in recemb
    _write_json(tmp / "stats.json", _stats_json(cfg, report, stats, fitted, tstats))
    return report


def _stats_json(cfg: DatasetConfig, report: PrepareReport, stats: PartialStats, fitted: FittedFeatures,
                tstats: TransformStats) -> dict[str, Any]:
    feats: dict[str, Any] = {}
    for info in fitted.infos:
        entry: dict[str, Any] = {"kind": info.kind, "num_embeddings": info.num_embeddings}
        if info.vocab_file:
            entry["cardinality"] = info.cardinality
            entry["vocab_size"] = info.num_embeddings - 1
        if info.kind == "dense":
            m = _dense_moments(cfg, next(s for s in cfg.features if s.name == info.name), stats)
            entry["train_mean"], entry["train_std"] = m.mean, m.std
        if info.name in tstats.oov:
            entry["oov_rate"] = {s: tstats.oov[info.name][s] / max(1, tstats.values[info.name][s]) for s in SPLITS}
        feats[info.name] = entry
    label_rate = None
    if cfg.label:
        label_rate = {s: tstats.label_sum[s] / tstats.rows[s] if tstats.rows[s] else None for s in SPLITS}
    return {**report.to_dict(), "label_rate": label_rate, "features": feats}


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    replace_folder(tmp, out, overwrite, f"{out}: output exists; pass overwrite=True (--overwrite) to replace it")
