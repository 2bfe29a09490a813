"""Plans and numpy twins of ``qr``, ``unified``, ``optembed`` and ``pruned`` against their torch layers.

Each variant goes through ``twin_utils.check_twins`` (plan JSON round trip and reassembly, numpy
transform == torch transform id for id, numpy lookup == torch layer), single-hot and multi-hot
where the variant takes bags, at a budget and without where it takes one; plus what is special
to each: QR's hash-then-split layout, unified's exempt tables, OptEmbed's learned row mask (and
OOV vector) in eval mode, and the pruned remap's dropped ids and OOV fill.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from twin_utils import as_kjt, check_twins, feature_map, random_ids

from recemb.config.experiment import EmbeddingConfig
from recemb.embeddings.registry import build_embedding_layer
from recemb.serving.transforms import apply_transform

# ----------------------------------------------------------------------------- qr


@pytest.mark.parametrize("multihot", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("op", ["mult", "add", "concat"])
@pytest.mark.parametrize("budget", [None, 0.05, 0.002], ids=["nobudget", "budget", "tight"])
def test_qr_twins(op: str, budget: float | None, multihot: bool) -> None:
    if multihot and op == "mult":
        pytest.skip("qr op=mult refuses multi-hot features")
    layer = check_twins("qr", multihot, dim=8, budget=budget, params={"op": op})
    features = layer.plan.transform.params["features"]
    assert layer.plan.capabilities.multihot == (op != "mult")
    if budget == 0.002:  # below QR's minimum for 'big': hashed first, then split
        assert features["big"]["buckets"] > 0 and features["big"]["modulus"] > 0
    if budget == 0.05:
        assert features["small"]["modulus"] == 0  # fits its share: keeps a full table


def test_qr_mult_remainder_tables_start_near_one() -> None:
    layer = build_embedding_layer(feature_map(False), EmbeddingConfig(kind="qr", dim=8, params={"op": "mult"}))
    rest = {t.name: t for t in layer.plan.tables if t.name.startswith("r_")}
    assert rest and all(t.init_mean == 1.0 and t.init_std == 1e-3 for t in rest.values())
    for name in rest:
        w = layer.ebc.embedding_bags[name].weight.detach()
        assert abs(float(w.mean()) - 1.0) < 0.01


# ----------------------------------------------------------------------------- unified


@pytest.mark.parametrize("multihot", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize(("budget", "params"), [
    (None, {"tables": 2, "chunk": 4, "rows": 97, "exempt": ["small"], "chunks": {"big": 3}}),
    (0.05, {"tables": 3}),
    (0.05, {"tables": 2, "exempt_share": 0.0}),
], ids=["nobudget", "budget", "noexempt"])
def test_unified_twins(budget: float | None, params: dict[str, Any], multihot: bool) -> None:
    layer = check_twins("unified", multihot, dim=8, budget=budget, params=params)
    plan = layer.plan
    assert plan.dims == layer.dims
    shared = [t for t in plan.tables if t.name.startswith("u")]
    assert {t.rows for t in shared} == {plan.transform.params["rows"]}


def test_unified_transform_twin_keys_follow_the_plan() -> None:
    fm = feature_map(False)
    cfg = EmbeddingConfig(kind="unified", dim=8, params={"tables": 2, "chunk": 4, "rows": 64, "chunks": {"big": 3}})
    layer = build_embedding_layer(fm, cfg)
    ids = random_ids(fm, 16, seed=5)
    keys = [p.key for f in fm.sparse_features for p in apply_transform(layer.plan, f, *ids[f])]
    assert keys == layer.transform(as_kjt(ids)).keys()
    assert keys.count("big__c2") == 1 and all(np.max(p.values) < 64 for f in fm.sparse_features
                                              for p in apply_transform(layer.plan, f, *ids[f]))
