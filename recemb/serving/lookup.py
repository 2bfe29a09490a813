"""Embedding lookups from a plan and its weights with numpy only: the serving runtime's core.

A table variant's lookup is its transform's numpy twin (``recemb.serving.transforms``),
then a gather and a sum per row (weighted where the transform emits weights) from each
physical table, then the combiner's numpy twin. A module variant (TT, DHE, lowprec)
registers one function that computes the feature's pooled vectors from its weights.
Tests compare every variant against its torch layer.

Weights are plain arrays by name: ``tables`` (physical table name -> ``[rows, dim]``) and
``dense`` (the layer's other tensors by their ``state_dict`` key under the layer, e.g.
``combiner.proj.C1.weight``).

Example:
    >>> plan = VariantPlan(kind="full", features=["a"], dims={"a": 2}, full_rows={"a": 3},
    ...                    tables=[TablePlan(name="t_a", rows=3, dim=2, keys=["a"])])
    >>> lookup(plan, {"t_a": np.eye(3, 2, dtype=np.float32)}, {}, "a", np.array([1, 0, 1]), np.array([1, 2]))
    array([[0., 1.],
           [1., 1.]], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from recemb.embeddings.plan import TablePlan, VariantPlan
from recemb.serving.transforms import PhysicalIds, apply_transform, load_twins

Arrays = dict[str, np.ndarray]
NpCombiner = Callable[[VariantPlan, str, Arrays, Arrays], np.ndarray]
NpModule = Callable[[VariantPlan, Arrays, str, np.ndarray, np.ndarray], np.ndarray]
NpStored = Callable[[VariantPlan, Arrays], Arrays]
_NP_COMBINERS: dict[str, NpCombiner] = {}
_NP_MODULES: dict[str, NpModule] = {}
_NP_STORED: dict[str, NpStored] = {}


def register_np_combiner(kind: str) -> Callable[[NpCombiner], NpCombiner]:
    """Decorator: the numpy twin of combiner ``kind``: ``fn(plan, feature, pooled, dense) -> [B, dims[f]]``
    where ``pooled`` maps each physical key of the feature to its pooled ``[B, d]`` lookups."""

    def wrap(fn: NpCombiner) -> NpCombiner:
        _NP_COMBINERS[kind] = fn
        return fn

    return wrap


def register_np_module(kind: str) -> Callable[[NpModule], NpModule]:
    """Decorator: the numpy lookup of module variant ``kind``:
    ``fn(plan, weights, feature, values, lengths) -> [B, dims[f]]``."""

    def wrap(fn: NpModule) -> NpModule:
        _NP_MODULES[kind] = fn
        return fn

    return wrap


def register_np_stored(kind: str) -> Callable[[NpStored], NpStored]:
    """Decorator: how module variant ``kind``'s trained tensors are stored in a bundle,
    ``fn(plan, tensors) -> arrays`` (e.g. DPQ keeps codes and codebooks, not its query table;
    DeepLight keeps CSR rows); ``kind``'s numpy lookup reads those arrays."""

    def wrap(fn: NpStored) -> NpStored:
        _NP_STORED[kind] = fn
        return fn

    return wrap


def stored_arrays(plan: VariantPlan, tensors: Arrays) -> Arrays:
    """What a bundle keeps of a module variant's tensors (keys relative to its layer): its registered
    stored form, or the tensors as they are (every other variant)."""
    load_twins()
    fn = _NP_STORED.get(plan.kind) if plan.capabilities.storage == "module" else None
    return tensors if fn is None else fn(plan, tensors)


@register_np_combiner("identity")
def identity_np(plan: VariantPlan, feature: str, pooled: Arrays, dense: Arrays) -> np.ndarray:
    """The feature's one physical key is its vector."""
    return pooled[feature]


def segment_sum(rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sum of ``rows`` (``[N, d]``) in consecutive segments of ``lengths`` (``[B]``): ``[B, d]``.

    Empty segments give zero rows (as torchrec's sum pooling of an empty bag). One
    ``np.add.reduceat`` over the non-empty segments (``np.add.at`` was 40x slower).
    """
    out = np.zeros((len(lengths), rows.shape[1]), dtype=np.float32)
    filled = lengths > 0
    if rows.shape[0] and filled.any():
        starts = (np.cumsum(lengths) - lengths)[filled]
        out[filled] = np.add.reduceat(rows, starts, axis=0)
    return out


def pooled_lookup(table: np.ndarray, ids: PhysicalIds) -> np.ndarray:
    """``[B, dim]``: per row, the (weighted) sum of ``table``'s rows at ``ids``.

    ``table`` is an array or anything indexable like one (``shape``, ``table[ids]``). Negative
    ids (pruned rows) read zeros and ids are checked against the table's rows. One id per row
    (the common case) is a plain gather, no pooling.
    """
    values = ids.values
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if high >= table.shape[0]:
        raise IndexError(f"key {ids.key}: id {high} outside a table of {table.shape[0]} rows")
    # Integer indexing, not np.take: ``table`` may be a bundle's StoredTable (dequantises as it gathers).
    if low >= 0:
        rows = np.asarray(table[values], dtype=np.float32)
    else:
        negative = values < 0
        rows = np.asarray(table[np.where(negative, 0, values)], dtype=np.float32)
        rows[negative] = 0.0
    if ids.weights is not None:
        rows = rows * ids.weights.astype(np.float32)[:, None]
    if len(ids.lengths) == values.size and bool((ids.lengths == 1).all()):
        return rows
    return segment_sum(rows, ids.lengths)


def table_of_keys(plan: VariantPlan) -> dict[str, TablePlan]:
    """Physical key -> the table that serves it."""
    return {k: t for t in plan.tables for k in t.keys}


def lookup(plan: VariantPlan, tables: Arrays, dense: Arrays, feature: str, values: np.ndarray,
           lengths: np.ndarray) -> np.ndarray:
    """``[B, dims[feature]]`` pooled embeddings of ``feature``'s ids (jagged by ``lengths``)."""
    load_twins()
    values = np.asarray(values, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if plan.capabilities.storage == "module":
        fn = _NP_MODULES.get(plan.kind)
        if fn is None:
            raise KeyError(f"no numpy lookup for module variant '{plan.kind}'")
        return fn(plan, {**tables, **dense}, feature, values, lengths)
    by_key = table_of_keys(plan)
    pooled = {p.key: pooled_lookup(tables[by_key[p.key].name], p)
              for p in apply_transform(plan, feature, values, lengths)}
    combine = _NP_COMBINERS.get(plan.combiner.kind)
    if combine is None:
        raise KeyError(f"no numpy combiner for kind '{plan.combiner.kind}' (variant {plan.kind})")
    return combine(plan, feature, pooled, dense).astype(np.float32, copy=False)
