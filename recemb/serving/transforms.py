"""numpy twins of the variants' id transforms: one function per ``TransformPlan.kind``.

This module holds the registry and the identity; each variant's twins (transform, and
combiner or module lookup in ``recemb.serving.lookup``'s registries) live in
``recemb/serving/variants/<kind>.py``, one file per variant, loaded on first use.

The torch transforms (``recemb.embeddings.*``) run inside the model on a whole KJT; these
apply the same plan to one feature's ids at a time, with numpy only, for the serving
runtime. Tests run both on the same ids, variant by variant, and compare id for id.

Input: one logical feature's ``values`` (int64 ids) and ``lengths`` (ids per row). Output:
one ``PhysicalIds`` per physical key the feature reads, in the torch transform's key order.

Example:
    >>> plan = VariantPlan(kind="full", features=["a"], dims={"a": 4}, full_rows={"a": 10})
    >>> [p.key for p in apply_transform(plan, "a", np.array([3, 4]), np.array([1, 1]))]
    ['a']
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from recemb.embeddings.plan import VariantPlan


@dataclass
class PhysicalIds:
    """Ids of one physical key for a batch: ``values`` (int64), ``lengths`` per row, and a
    weight per id when the transform is weighted (ROBE's signs)."""

    key: str
    values: np.ndarray
    lengths: np.ndarray
    weights: np.ndarray | None = None


NpTransform = Callable[[VariantPlan, str, np.ndarray, np.ndarray], list[PhysicalIds]]
_NP_TRANSFORMS: dict[str, NpTransform] = {}


def register_np_transform(kind: str) -> Callable[[NpTransform], NpTransform]:
    """Decorator: the numpy twin of the torch transform of ``kind``."""

    def wrap(fn: NpTransform) -> NpTransform:
        _NP_TRANSFORMS[kind] = fn
        return fn

    return wrap


@functools.cache
def load_twins() -> None:
    """Import every module of ``recemb.serving.variants`` (each registers its twins)."""
    import recemb.serving.variants as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"recemb.serving.variants.{info.name}")


def apply_transform(plan: VariantPlan, feature: str, values: np.ndarray, lengths: np.ndarray) -> list[PhysicalIds]:
    """The physical ids that ``plan``'s transform gives ``feature``'s ``values`` (jagged by ``lengths``)."""
    load_twins()
    fn = _NP_TRANSFORMS.get(plan.transform.kind)
    if fn is None:
        raise KeyError(f"no numpy transform for kind '{plan.transform.kind}' (variant {plan.kind})")
    return fn(plan, feature, np.asarray(values, dtype=np.int64), np.asarray(lengths, dtype=np.int64))


@register_np_transform("identity")
def identity_np(plan: VariantPlan, feature: str, values: np.ndarray, lengths: np.ndarray) -> list[PhysicalIds]:
    """Logical ids are physical ids (``full``)."""
    return [PhysicalIds(feature, values, lengths)]
