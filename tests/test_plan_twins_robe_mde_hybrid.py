"""Plans and numpy twins of ``robe``, ``mde`` and ``hybrid`` against their torch layers.

``twin_utils.check_twins`` runs each variant single- and multi-hot, with and without a
budget; count-aware layouts (MDE frequency blocks, hybrid's global count threshold) are
built from a feature map with planted counts. The buffers made from the plans are checked
to come back after a meta-device build, to stay out of checkpoints, and to count in the
achieved bytes (which stay within the budget).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from twin_utils import as_kjt, check_lookup_without_torch, check_twins, feature_map, random_ids, weights

from recemb.config.experiment import EmbeddingConfig
from recemb.data.schema import FeatureMap
from recemb.embeddings.base import TableEmbeddingLayer, reset_buffers
from recemb.embeddings.hybrid import HybridParams
from recemb.embeddings.mde import MdeParams
from recemb.embeddings.registry import VariantSpec, assemble, build_embedding_layer, build_variant
from recemb.embeddings.robe import RobeParams
from recemb.serving.lookup import lookup
from recemb.serving.transforms import apply_transform

CASES: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "robe": [("rows", {"params": {"rows": 97}}), ("budget", {"budget": 0.05}),
             ("unsigned", {"budget": 0.05, "params": {"signed": False, "block": 4}})],
    # 0.3: power-law widths with projections; 0.05: all-4 widths overflow, so tables are capped (hashed).
    "mde": [("d0", {}), ("widths", {"budget": 0.3}), ("capped", {"budget": 0.05})],
    "hybrid": [("hot", {"params": {"hot": 0.2, "rows": 31}}), ("budget", {"budget": 0.05})],
}
PARAMS = {"robe": RobeParams, "mde": MdeParams, "hybrid": HybridParams}


@pytest.mark.parametrize("multihot", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize(("kind", "kwargs"), [(k, kw) for k, cases in CASES.items() for _, kw in cases],
                         ids=[f"{k}-{name}" for k, cases in CASES.items() for name, _ in cases])
def test_numpy_twins_equal_the_torch_layer(kind: str, kwargs: dict[str, Any], multihot: bool) -> None:
    layer = check_twins(kind, multihot, **kwargs)
    assert layer.plan is not None and layer.plan.capabilities.multihot


class CountedMap(FeatureMap):
    """The twin feature map with planted training counts (id 1 the most frequent, id 0 OOV)."""

    def id_counts(self, name: str) -> np.ndarray | None:
        n = self.feature(name).num_embeddings
        counts = (10_000 // np.arange(1, n + 1)).astype(np.int64)
        counts[0] = 0
        return counts


def counted(multihot: bool) -> CountedMap:
    fm = feature_map(multihot)
    return CountedMap(dataset_id=fm.dataset_id, label=fm.label, features=fm.features)


def counted_layer(kind: str, multihot: bool, budget: float | None, device: torch.device | None = None,
                  **params: Any) -> TableEmbeddingLayer:
    fm = counted(multihot)
    spec = VariantSpec(features=[fm.feature(f) for f in fm.sparse_features], dim=8, budget=budget,
                       params=PARAMS[kind](**params), init_std=0.1, feature_map=fm, seed=3, device=device)
    torch.manual_seed(0)
    layer = build_variant(kind, spec)
    assert isinstance(layer, TableEmbeddingLayer)
    return layer


@pytest.mark.parametrize("multihot", [False, True], ids=["single", "multi"])
def test_mde_frequency_blocks_twin(multihot: bool) -> None:
    layer = counted_layer("mde", multihot, budget=0.3, blocks=3)
    tables = layer.plan.transform.params["tables"]
    assert max(t["block"] for t in tables) == 2, "no feature was split into frequency blocks"
    assert layer.plan.capabilities.budget["blocks_used"] == 3
    check_twins("mde", multihot, layer=layer)


@pytest.mark.parametrize("multihot", [False, True], ids=["single", "multi"])
def test_hybrid_count_threshold_twin(multihot: bool) -> None:
    layer = counted_layer("hybrid", multihot, budget=0.05)
    assert layer.plan.capabilities.budget["by_counts"]
    hot = dict(zip(layer.plan.features, layer.plan.arrays["hot_ids"].tolist(), strict=True))
    assert 0 < hot["big"] < 4999, hot
    check_twins("hybrid", multihot, layer=layer)


def test_robe_lookup_is_signed_rows_of_the_shared_table() -> None:
    """Hand-computed: the vector of one id is its blocks' rows times their signs, side by side."""
    layer = check_twins("robe", False, budget=0.05)
    plan = layer.plan
    tables, dense = weights(layer)
    shared = tables["robe"]
    ids = np.array([4321, 0, 17])
    got = lookup(plan, tables, dense, "big", ids, np.ones(3, dtype=np.int64))
    parts = apply_transform(plan, "big", ids, np.ones(3, dtype=np.int64))
    assert [p.key for p in parts] == ["big__b0"] and plan.transform.weighted
    want = shared[parts[0].values] * parts[0].weights[:, None]
    assert np.array_equal(got, want)
    assert set(parts[0].weights.tolist()) <= {1.0, -1.0}
    unsigned = check_twins("robe", False, budget=0.05, params={"signed": False})
    assert not unsigned.plan.transform.weighted
    assert all(p.weights is None for p in apply_transform(unsigned.plan, "big", ids, np.ones(3, dtype=np.int64)))


@pytest.mark.parametrize(("kind", "params"), [("mde", {"blocks": 3}), ("hybrid", {})])
def test_buffers_come_back_after_a_meta_build(kind: str, params: dict[str, Any]) -> None:
    """Built on meta, materialised as zeros (as DMP does), refilled by ``reset_buffers``: the
    transform equals the CPU build's, and no buffer is in the state dict."""
    reference = counted_layer(kind, True, budget=0.05, **params)
    names = {n for n, _ in reference.transform.named_buffers()}
    assert names, f"{kind}: expected the transform to hold buffers at this budget"
    assert not names & set(reference.state_dict()), "plan constants must not be persisted"
    meta = assemble(reference.plan, torch.device("meta"))
    meta.to_empty(device=torch.device("cpu"))
    for _, buffer in meta.transform.named_buffers():
        buffer.zero_()
    reset_buffers(meta)
    kjt = as_kjt(random_ids(feature_map(True), batch=32, seed=5))
    got, want = meta.transform(kjt), reference.transform(kjt)
    assert got.keys() == want.keys()
    assert torch.equal(got.values(), want.values()) and torch.equal(got.lengths(), want.lengths())


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("budget", [0.05, 0.01])
def test_achieved_bytes_count_buffers_and_meet_the_budget(kind: str, budget: float) -> None:
    fm = feature_map(True)
    layer = build_embedding_layer(fm, EmbeddingConfig(kind=kind, dim=8, budget=budget), device=torch.device("meta"))
    plan = layer.plan
    buffers = sum(b.numel() * b.element_size() for b in layer.transform.buffers())
    assert plan.capabilities.achieved_bytes == layer.parameter_bytes() >= plan.table_bytes() + buffers
    assert plan.capabilities.budget.get("buffer_bytes", 0) == buffers
    assert plan.capabilities.full_bytes == layer.full_bytes()
    assert 0.9 * budget * plan.capabilities.full_bytes <= plan.capabilities.achieved_bytes
    assert plan.capabilities.achieved_bytes <= budget * plan.capabilities.full_bytes


@pytest.mark.parametrize(("kind", "kwargs"), [("robe", {"budget": 0.05}), ("mde", {"budget": 0.05}),
                                              ("hybrid", {"budget": 0.05})])
def test_lookup_runs_where_torch_cannot_be_imported(tmp_path: Path, kind: str, kwargs: dict[str, Any]) -> None:
    """The plan as JSON and arrays, looked up in a process where ``import torch`` fails."""
    layer = build_embedding_layer(feature_map(True), EmbeddingConfig(kind=kind, dim=8, seed=3, **kwargs))
    check_lookup_without_torch(layer, feature_map(True), tmp_path, kind)
