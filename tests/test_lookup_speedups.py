"""The fast paths of the compressed variants' transforms and combiners against their numpy twins.

The transforms take shortcuts when every key has as many ids (broadcasting over a
``[features, ids]`` grid) or when every bag holds exactly one id. A batch with as many bags as
ids that is not one id per bag (lengths ``[2, 0, 1, 1]`` for every key) has equal per-key counts
without being single-hot: it must take the general path's bags, id for id as the twins give.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from test_plan_twins_robe_mde_hybrid import counted_layer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from twin_utils import feature_map, weights

from recemb.config.experiment import EmbeddingConfig
from recemb.embeddings.base import TableEmbeddingLayer, in_order
from recemb.embeddings.registry import build_embedding_layer
from recemb.serving.lookup import lookup
from recemb.serving.transforms import apply_transform

PATTERN = np.array([2, 0, 1, 1], dtype=np.int64)  # as many bags as ids, not one id per bag


def layer_of(kind: str, settings: dict[str, Any]) -> TableEmbeddingLayer:
    if kind == "mde-blocks":
        return counted_layer("mde", True, budget=0.05, blocks=3)
    torch.manual_seed(0)
    layer = build_embedding_layer(feature_map(True), EmbeddingConfig(kind=kind, dim=8, seed=3, **settings))
    assert isinstance(layer, TableEmbeddingLayer)
    return layer


CASES: list[tuple[str, dict[str, Any]]] = [
    ("mde-blocks", {}),
    ("mde", {"budget": 0.05}),
    ("robe", {"budget": 0.05}),
    ("hybrid", {"budget": 0.05}),
    ("unified", {"budget": 0.05, "params": {"tables": 2, "chunk": 4}}),
    ("hashed", {"budget": 0.2}),
    ("qr", {"budget": 0.2, "params": {"op": "add"}}),
]


@pytest.mark.parametrize(("kind", "settings"), CASES, ids=[k for k, _ in CASES])
@pytest.mark.parametrize("grad", [False, True], ids=["eval", "train"])
def test_equal_counts_that_are_not_single_hot(kind: str, settings: dict[str, Any], grad: bool) -> None:
    layer = layer_of(kind, settings).eval()
    plan = layer.plan
    assert plan is not None
    rng = np.random.default_rng(5)
    lengths = np.tile(PATTERN, 4)
    ids = {f: (rng.integers(0, layer.full_rows[f], int(lengths.sum())).astype(np.int64), lengths)
           for f in plan.features}
    kjt = KeyedJaggedTensor(keys=list(ids), values=torch.from_numpy(np.concatenate([v for v, _ in ids.values()])),
                            lengths=torch.from_numpy(np.concatenate([n for _, n in ids.values()])))
    physical = layer.transform(kjt).to_dict()
    for f in plan.features:
        for p in apply_transform(plan, f, *ids[f]):
            got = physical[p.key]
            assert np.array_equal(got.lengths().numpy(), p.lengths), (kind, p.key)
            assert np.array_equal(got.values().numpy(), p.values), (kind, p.key)
            if p.weights is not None:
                assert np.allclose(got.weights().numpy(), p.weights), (kind, p.key)
    with torch.set_grad_enabled(grad):
        out = layer(kjt)
        want = in_order(layer.combiner(layer.ebc(layer.transform(kjt))), layer.features)
    assert torch.equal(out.values(), want.values()), kind
    tables, dense = weights(layer)
    parts = out.to_dict()
    for f in plan.features:
        np.testing.assert_allclose(lookup(plan, tables, dense, f, *ids[f]), parts[f].detach().numpy(),
                                   rtol=1e-5, atol=1e-6, err_msg=f"{kind} {f}")


def test_mde_combine_keeps_gradients() -> None:
    """The combiner's gradients equal those of the plain form: a matmul per projected block, summed."""
    layer = counted_layer("mde", False, budget=0.3, blocks=3)
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.integers(0, layer.full_rows[f], 16) for f in layer.features])
    kjt = KeyedJaggedTensor(keys=layer.features, values=torch.from_numpy(values),
                            lengths=torch.ones(16 * len(layer.features), dtype=torch.int64))
    params = dict(layer.named_parameters())
    assert any(k.startswith("combiner.proj.") for k in params), "expected projections at this budget"

    def grads(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        layer.zero_grad()
        loss.backward()
        return {k: torch.zeros_like(p) if p.grad is None else p.grad.clone() for k, p in params.items()}

    got = grads(layer(kjt).values().square().sum())
    pooled = layer.ebc(layer.transform(kjt)).to_dict()
    sums: dict[str, torch.Tensor] = {}
    for key, owner, proj in layer.combiner.parts:
        vec = pooled[key] if proj is None else torch.nn.functional.linear(pooled[key], layer.combiner.proj[proj].weight)
        f = layer.features[owner]
        sums[f] = vec if f not in sums else sums[f] + vec
    want = grads(sum(v.square().sum() for v in sums.values()))
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=k)


def single_hot(layer: TableEmbeddingLayer, batch: int, seed: int) -> tuple[KeyedJaggedTensor, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    ids = {f: rng.integers(0, layer.full_rows[f], batch).astype(np.int64) for f in layer.features}
    kjt = KeyedJaggedTensor(keys=list(ids), values=torch.from_numpy(np.concatenate(list(ids.values()))),
                            lengths=torch.ones(batch * len(ids), dtype=torch.int64))
    return kjt, ids


def check_direct(layer: TableEmbeddingLayer, kjt: KeyedJaggedTensor, ids: dict[str, np.ndarray], exact: bool,
                 twin: bool = True) -> None:
    """The layer's single-hot eval path (``lookup_logical``) is taken, leaves the ids alone, equals the
    transform -> collection -> combiner path (``exact``: bit for bit, else to the last bit of a
    product) and the numpy twin; a multi-hot batch, or autograd, is left to the transform's path."""
    with torch.no_grad():
        direct = layer.combiner.lookup_logical(layer.transform, layer.ebc, kjt)
        assert direct is not None, "the single-hot path was not taken"
        assert torch.equal(kjt.values(), torch.from_numpy(np.concatenate(list(ids.values())))), "ids changed"
        out = layer(kjt)
        want = in_order(layer.combiner(layer.ebc(layer.transform(kjt))), layer.features)
    if exact:
        assert torch.equal(out.values(), want.values())
    else:
        torch.testing.assert_close(out.values(), want.values(), rtol=1e-6, atol=1e-8)
    if twin:
        tables, dense = weights(layer)
        parts = out.to_dict()
        for f in layer.features:
            got = lookup(layer.plan, tables, dense, f, ids[f], np.ones(len(ids[f]), dtype=np.int64))
            np.testing.assert_allclose(got, parts[f].numpy(), rtol=1e-5, atol=1e-6, err_msg=f)
    multi = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values()[:-1],
                              lengths=torch.cat([kjt.lengths()[:-2], torch.tensor([2, 0])]))
    with torch.no_grad():
        assert layer.combiner.lookup_logical(layer.transform, layer.ebc, multi) is None
    with torch.enable_grad():  # training: the transform's path, whose gradients the tables need
        assert layer.combiner.lookup_logical(layer.transform, layer.ebc, kjt) is None


MDE_CASES: dict[str, dict[str, Any]] = {
    "blocks-capped": {"budget": 0.05, "blocks": 3},
    "blocks": {"budget": None, "blocks": 3},
    "capped": {"budget": 0.05},
    "plain": {"budget": None},
    "blocks-capped-splitmix64": {"budget": 0.05, "blocks": 3, "hash_name": "splitmix64"},
}


@pytest.mark.parametrize("batch", [37, 2000], ids=["sorted", "stacked"])
@pytest.mark.parametrize("case", list(MDE_CASES))
def test_mde_direct_lookup_is_the_pooled_path(case: str, batch: int) -> None:
    """Single-hot eval batches skip the physical KJT (``ProjectSum.lookup_logical``): its output equals
    the transform -> collection -> combiner path (to MKL's last bit: a product over fewer rows may
    take another kernel) and the numpy twin, and it is taken. A small batch gathers and projects
    its ids' rows (more table rows than ids), a large one projects the tables whole."""
    settings = dict(MDE_CASES[case])
    hash_name = settings.pop("hash_name", "mulshift")
    fm_layer = counted_layer("mde", False, **settings)
    if hash_name != "mulshift":  # the same layout under the older hash (plans written before mulshift)
        params = fm_layer.plan.transform.params
        fm_layer.transform = type(fm_layer.transform)(fm_layer.plan.features, params["tables"], hash_name="splitmix64")
    layer = fm_layer.eval()
    blocks = max(t["block"] for t in layer.plan.transform.params["tables"]) + 1
    hashed = any(t["hashed"] for t in layer.plan.transform.params["tables"])
    assert (blocks > 1) == ("blocks" in case) and hashed == ("capped" in case), (blocks, hashed)
    stacked = sum(t.rows for t in layer.plan.tables) <= batch * len(layer.features)
    assert stacked == (batch == 2000), "the batch sizes no longer pick the two ways"
    kjt, ids = single_hot(layer, batch=batch, seed=1)
    check_direct(layer, kjt, ids, exact=False, twin=hash_name == "mulshift")


@pytest.mark.parametrize("batch", [20, 300], ids=["per-feature", "stacked"])
@pytest.mark.parametrize("hash_name", ["mulshift", "splitmix64"])
@pytest.mark.parametrize("budget", [0.05, 0.3])
def test_hybrid_direct_lookup_is_the_pooled_path_bit_for_bit(budget: float, hash_name: str, batch: int) -> None:
    """Single-hot eval batches skip the physical KJT (``HotPlusCold.lookup_logical``): hot rows plus the
    shared row where the id is cold equals the transform -> collection -> combiner path exactly and
    the numpy twin closely; a multi-hot batch takes the transform's path."""
    layer = counted_layer("hybrid", False, budget=budget).eval()
    if hash_name != "mulshift":  # the same layout under the older hash (plans written before mulshift)
        plan = layer.plan
        layer.transform = type(layer.transform)(plan.transform.params["features"], plan.arrays["hot_ids"],
                                                plan.transform.params["rows"], hash_name="splitmix64")
    hot_rows = sum(t.rows for t in layer.plan.tables if t.name != layer.plan.tables[-1].name)
    assert (hot_rows <= batch * len(layer.features)) == (batch == 300), "the batches no longer pick the two ways"
    kjt, ids = single_hot(layer, batch=batch, seed=2)
    cold = [int((ids[f] > k).sum()) for f, k in zip(layer.features, layer.plan.arrays["hot_ids"].tolist(), strict=True)]
    assert 0 < sum(cold) < batch * len(cold), "the batch should mix hot and cold ids"
    check_direct(layer, kjt, ids, exact=True, twin=hash_name == "mulshift")


QR_CASES: dict[str, dict[str, Any]] = {
    "mult": {"budget": 0.2},
    "mult-hashed-first": {"budget": 0.02},
    "add": {"budget": 0.2, "params": {"op": "add"}},
    "concat": {"budget": 0.2, "params": {"op": "concat"}},
    "mult-splitmix64": {"budget": 0.02, "hash": "splitmix64"},
}


@pytest.mark.parametrize("batch", [20, 400], ids=["per-feature", "stacked"])
@pytest.mark.parametrize("case", list(QR_CASES))
def test_qr_direct_lookup_is_the_pooled_path_bit_for_bit(case: str, batch: int) -> None:
    """Single-hot eval batches skip the physical KJT (``QrCombiner.lookup_logical``): every feature's
    ``q op r`` (or full row) equals the transform -> collection -> combiner path exactly and the numpy
    twin closely; a multi-hot batch takes the transform's path. A small batch gathers feature by
    feature (more table rows than ids), a large one from the stacked tables (not ``concat``)."""
    torch.manual_seed(0)
    layer = build_embedding_layer(feature_map(False), EmbeddingConfig(kind="qr", dim=8, seed=3, **QR_CASES[case]))
    assert isinstance(layer, TableEmbeddingLayer)
    layer.eval()
    specs = layer.plan.transform.params["features"].values()
    assert any(s["modulus"] for s in specs) and any(not s["modulus"] for s in specs), "want split and full features"
    assert any(s["buckets"] for s in specs) == ("hashed" in case or "splitmix" in case)
    stacked = QR_CASES[case].get("params", {}).get("op") != "concat" and (
        sum(t.rows for t in layer.plan.tables) <= batch * len(layer.features))
    assert stacked == (batch == 400 and case != "concat"), "the batch sizes no longer pick the two ways"
    kjt, ids = single_hot(layer, batch=batch, seed=4)
    check_direct(layer, kjt, ids, exact=True)
