"""Plans and numpy twins of ``qr``, ``unified``, ``optembed`` and ``pruned`` against their torch layers.

Each variant goes through ``twin_utils.check_twins`` (plan JSON round trip and reassembly, numpy
transform == torch transform id for id, numpy lookup == torch layer), single-hot and multi-hot
where the variant takes bags, at a budget and without where it takes one; plus what is special
to each: QR's hash-then-split layout, unified's exempt tables, OptEmbed's learned row mask (and
OOV vector) in eval mode, and the pruned remap's dropped ids and OOV fill.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from twin_utils import as_kjt, check_lookup_without_torch, check_twins, feature_map, random_ids

from recemb.config.experiment import EmbeddingConfig
from recemb.embeddings.base import reset_buffers
from recemb.embeddings.pruned import FeaturePruning, PrunedLayer, PruningPlan, remap_from_mask, save_pruning
from recemb.embeddings.registry import assemble, build_embedding_layer
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


# ----------------------------------------------------------------------------- optembed


@pytest.mark.parametrize("scope", ["field", "global"])
@pytest.mark.parametrize("pruned_vector", ["zero", "oov"])
def test_optembed_twins_apply_the_learned_mask(pruned_vector: str, scope: str) -> None:
    torch.manual_seed(0)
    fm = feature_map(False)
    cfg = EmbeddingConfig(kind="optembed", dim=8, init_std=0.05, seed=3,
                          params={"pruned_vector": pruned_vector, "threshold_scope": scope})
    layer = build_embedding_layer(fm, cfg)
    mask = layer.combiner
    with torch.no_grad():  # inside the norms' range (L1 of 8 N(0, 0.05) values ~ 0.32): some rows pruned
        mask.thresholds.copy_(torch.linspace(0.28, 0.34, mask.thresholds.numel()))
    check_twins("optembed", False, layer=layer)
    assert layer.plan.combiner.dense == (["thresholds", "oov"] if pruned_vector == "oov" else ["thresholds"])
    assert not layer.plan.capabilities.multihot
    out = layer(as_kjt(random_ids(fm, 256, seed=2))).values().view(256, -1, 8)
    pruned = (out.abs().sum(-1) == 0) if pruned_vector == "zero" else (out == mask.oov.detach()).all(-1)
    assert 0 < int(pruned.sum()) < pruned.numel()  # the twin was checked on a mix of kept and pruned rows


# ----------------------------------------------------------------------------- pruned


def _pruning_folder(root: Path, multihot: bool) -> Path:
    """A pruning folder for the twin feature map: random kept rows, 'small' pruned whole, mixed dims."""
    rng = np.random.default_rng(0)
    fm = feature_map(multihot)
    features = {}
    for i, f in enumerate(fm.sparse_features):
        n = fm.feature(f).num_embeddings
        keep = np.zeros(n, dtype=bool) if f == "small" else rng.random(n) < 0.6
        features[f] = FeaturePruning(remap_from_mask(keep), dim=4 if i % 2 else 8)
    return save_pruning(root / ("pruned_multi" if multihot else "pruned"), PruningPlan(full_dim=8, features=features))


@pytest.mark.parametrize("multihot", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("pruned_vector", ["zero", "oov"])
def test_pruned_twins(tmp_path: Path, pruned_vector: str, multihot: bool) -> None:
    path = _pruning_folder(tmp_path, multihot)
    layer = check_twins("pruned", multihot, dim=8, params={"path": str(path), "pruned_vector": pruned_vector})
    assert isinstance(layer, PrunedLayer)
    plan = layer.plan
    assert plan.capabilities.storage == "module" and "p_small" not in {t.name for t in plan.tables}
    assert plan.capabilities.full_bytes == layer.full_bytes()
    assert plan.capabilities.achieved_bytes == layer.parameter_bytes()
    # The remap is made from the plan and is not part of the weights (no persistent copy).
    assert "transform.remap" not in layer.state_dict()
    # Transform twin id for id (check_twins compares lookups; a module variant's transform is checked here).
    fm = feature_map(multihot)
    ids = random_ids(fm, 64, seed=4)
    physical = layer.transform(as_kjt(ids)).to_dict()
    for f in fm.sparse_features:
        (p,) = apply_transform(plan, f, *ids[f])
        assert np.array_equal(physical[f].values().numpy(), p.values), f
        assert np.array_equal(physical[f].lengths().numpy(), p.lengths), f
    assert (physical["small"].lengths() == 0).all()


def test_pruned_meta_build_refills_the_remap_from_the_plan(tmp_path: Path) -> None:
    path = _pruning_folder(tmp_path, False)
    fm = feature_map(False)
    layer = build_embedding_layer(fm, EmbeddingConfig(kind="pruned", dim=8, params={"path": str(path)}))
    meta = assemble(layer.plan, torch.device("meta"))
    meta.to_empty(device=torch.device("cpu"))
    meta.transform.remap.zero_()  # what a meta-device build materialises
    reset_buffers(meta)
    assert torch.equal(meta.transform.remap, layer.transform.remap)
    assert int((layer.transform.remap < 0).sum()) > fm.feature("small").num_embeddings - 1


# ----------------------------------------------------------------------------- without torch


@pytest.mark.parametrize("kind", ["qr", "unified", "optembed", "pruned"])
def test_lookup_runs_where_torch_cannot_be_imported(tmp_path: Path, kind: str) -> None:
    """The plan as JSON and arrays, looked up in a process where ``import torch`` fails."""
    multihot = kind != "optembed"
    params: dict[str, Any] = {"qr": {"op": "add"}, "unified": {"tables": 2}, "optembed": {"pruned_vector": "oov"},
                              "pruned": {"path": "", "pruned_vector": "oov"}}[kind]
    if kind == "pruned":
        params["path"] = str(_pruning_folder(tmp_path, multihot))
    budget = 0.05 if kind in ("qr", "unified") else None
    torch.manual_seed(0)
    fm = feature_map(multihot)
    layer = build_embedding_layer(fm, EmbeddingConfig(kind=kind, dim=8, seed=3, budget=budget, init_std=0.05,
                                                      params=params))
    if kind == "optembed":
        with torch.no_grad():
            layer.combiner.thresholds.fill_(0.3)
    check_lookup_without_torch(layer, fm, tmp_path, kind)
