"""Tests for the ``robe``, ``mde`` and ``hybrid`` variants: contract, budgets, ids, gradients, sharding.

Budgets are checked on the meta device for the benchmark's 26-feature vocabulary;
physical ids are recomputed with the numpy hash twins; one spawned pair of gloo
ranks compares every variant's sharded forward with the unsharded layer; one short
DeepFM run shows a variant learns the planted signal of the session dataset.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dist_utils import in_process_run, run_ranks
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recemb.config.experiment import EmbeddingConfig
from recemb.data.schema import FeatureInfo, FeatureMap
from recemb.embeddings.base import TableEmbeddingLayer
from recemb.embeddings.budget import BudgetError
from recemb.embeddings.hashing import bucket_ids_np, hash64_np, hash_ids_np, salted_seed
from recemb.embeddings.hybrid import HybridParams, hot_rows, solve_hot_ids, solve_hybrid
from recemb.embeddings.idhash import mulshift_rows_np, mulshift_z_np
from recemb.embeddings.mde import (
    MdeParams,
    frequency_blocks,
    mde_bytes,
    power_law_widths,
    solve_mde,
)
from recemb.embeddings.plan import VariantPlan
from recemb.embeddings.registry import VariantSpec, build_embedding_layer, build_variant
from recemb.embeddings.robe import RobeParams, RobeTransform, robe_rows
from recemb.embeddings.sharding import load_full_state, shard_model
from recemb.errors import ConfigError

BENCH_VOCAB = [11, 252, 6302, 25196, 26, 632, 13870, 24188, 64, 1586, 21569, 25189, 159, 3982, 24791, 17, 399,
               9764, 25500, 41, 1001, 18212, 24400, 101, 2513, 23371]
SMALL = {"user": 37, "item": 64, "tags": 101, "site": 16}
DIM = 8
BATCH = 6
PARAMS = {"robe": RobeParams, "mde": MdeParams, "hybrid": HybridParams}
# Small-vocab settings that exercise every path: two ROBE blocks, capped (hashed) MDE tables, hot and cold ids.
SMALL_CASES: dict[str, tuple[float | None, dict[str, Any]]] = {
    "robe": (None, {"block": 4, "rows": 23}),
    "mde": (0.3, {"alpha": 0.3}),
    "hybrid": (None, {"hot": 0.2, "rows": 29}),
}


def features(vocab: dict[str, int]) -> list[FeatureInfo]:
    return [FeatureInfo(name=n, kind="sparse", source=n, num_embeddings=r) for n, r in vocab.items()]


def spec(kind: str, vocab: dict[str, int], budget: float | None, params: dict[str, Any], dim: int = DIM,
         device: torch.device | None = None, seed: int = 3) -> VariantSpec:
    return VariantSpec(features=features(vocab), dim=dim, budget=budget, params=PARAMS[kind](**params),
                       init_std=0.1, device=device, seed=seed, prefix="x_")


def build(kind: str, **kwargs: Any) -> TableEmbeddingLayer:
    budget, params = SMALL_CASES[kind]
    layer = build_variant(kind, spec(kind, SMALL, budget, params, **kwargs))
    assert isinstance(layer, TableEmbeddingLayer)
    return layer


def batch(seed: int, keys: list[str] | None = None) -> KeyedJaggedTensor:
    """One id per bag, except ``tags`` (0-3 ids, first bag empty); keys in ``keys`` order."""
    gen = torch.Generator().manual_seed(seed)
    lengths, values = [], []
    for name in keys or list(SMALL):
        length = torch.ones(BATCH, dtype=torch.long)
        if name == "tags":
            length = torch.randint(0, 4, (BATCH,), generator=gen)
            length[0] = 0
        lengths.append(length)
        values.append(torch.randint(0, SMALL[name], (int(length.sum()),), generator=gen))
    return KeyedJaggedTensor.from_lengths_sync(keys=keys or list(SMALL), values=torch.cat(values),
                                               lengths=torch.cat(lengths))


# ------------------------------------------------------------------------------ contract


@pytest.mark.parametrize("kind", list(PARAMS))
def test_forward_contract(kind: str) -> None:
    torch.manual_seed(0)
    layer = build(kind)
    out = layer(batch(0))
    assert out.keys() == list(SMALL) == layer.features
    assert out.values().shape == (BATCH, DIM * len(SMALL)) and out.values().dtype == torch.float32
    assert layer.dims == {n: DIM for n in SMALL} and layer.full_rows == SMALL
    assert all(t.name.startswith("x_") for t in layer.tables)
    assert layer.plan is not None and set(layer.plan.sharding()) == {t.name for t in layer.tables}
    # The input's key order does not matter: the transform reorders.
    shuffled = layer(batch(0, keys=["site", "tags", "user", "item"]))
    by_name = out.to_dict()
    for name, value in shuffled.to_dict().items():
        assert value.shape == by_name[name].shape
    plan = json.loads(json.dumps(layer.plan.to_dict()))
    assert plan["features"] == list(SMALL) and plan["kind"] == kind


@pytest.mark.parametrize("kind", list(PARAMS))
def test_empty_bag_of_a_table_is_zero(kind: str) -> None:
    layer = build(kind)
    out = layer(batch(1)).to_dict()["tags"]
    assert torch.count_nonzero(out[0]) == 0, "the empty first bag of 'tags' pooled to a non-zero vector"
    assert torch.count_nonzero(out[1:]) > 0


@pytest.mark.parametrize("budget", [0.1, 0.01, 0.001])
@pytest.mark.parametrize("kind", list(PARAMS))
def test_budget_met_on_benchmark_vocab(kind: str, budget: float) -> None:
    vocab = {f"C{i + 1}": n for i, n in enumerate(BENCH_VOCAB)}
    layer = build_variant(kind, spec(kind, vocab, budget, {}, dim=16, device=torch.device("meta")))
    achieved, full = layer.bytes().achieved, layer.bytes().full
    assert full == sum(BENCH_VOCAB) * 16 * 4
    target = int(budget * full)
    assert 0.95 * target <= achieved <= target, f"{kind}@{budget}: {achieved} bytes for a target of {target}"


def test_mde_at_budget_one_is_the_full_layout() -> None:
    """At budget 1 MDE is the full layout: every width is ``dim`` and there is no projection."""
    layer = build_variant("mde", spec("mde", SMALL, 1.0, {}, dim=16, device=torch.device("meta")))
    assert {t.embedding_dim for t in layer.tables} == {16}
    assert layer.parameter_bytes() == layer.full_bytes()


# ------------------------------------------------------------------------------ physical ids


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def test_robe_rows_and_signs_match_numpy() -> None:
    kjt = batch(2)
    a, b = build("robe"), build("robe")
    out = a.transform(kjt)
    again = b.transform(kjt)
    assert torch.equal(out.values(), again.values()) and torch.equal(out.weights(), again.weights())
    assert out.keys() == [f"{f}__b{j}" for f in SMALL for j in range(2)]
    got = out.to_dict()
    for fi, (name, ids) in enumerate(kjt.to_dict().items()):
        for j in range(2):
            seed = salted_seed(3, fi, j)
            part = got[f"{name}__b{j}"]
            assert a.plan.transform.params["hash"] == "mulshift"
            z = mulshift_z_np(_array(ids.values()), seed)
            assert np.array_equal(_array(part.values()), mulshift_rows_np(z, 23))
            sign = 1.0 - 2.0 * ((z >> np.uint64(31)) & np.uint64(1)).astype(np.float32)
            assert np.array_equal(_array(part.weights()), sign)
            assert torch.equal(part.lengths(), ids.lengths())
    assert {1.0, -1.0} == set(_array(out.weights()).tolist())


def test_robe_plans_without_a_hash_keep_splitmix64_rows_and_signs() -> None:
    kjt = batch(2)
    layer = build("robe")
    old = layer.plan.to_dict()
    del old["transform"]["params"]["hash"]  # as plans were written before embedding.hash
    transform = RobeTransform.from_plan(VariantPlan.from_dict(old))
    got = transform(kjt).to_dict()
    for fi, (name, ids) in enumerate(kjt.to_dict().items()):
        for j in range(2):
            seed = salted_seed(3, fi, j)
            part = got[f"{name}__b{j}"]
            assert np.array_equal(_array(part.values()), hash_ids_np(_array(ids.values()), seed, 23))
            sign = 1.0 - 2.0 * (hash64_np(_array(ids.values()), seed) & np.uint64(1)).astype(np.float32)
            assert np.array_equal(_array(part.weights()), sign)


def test_hybrid_rows_match_numpy() -> None:
    kjt = batch(3)
    layer = build("hybrid")
    out = layer.transform(kjt).to_dict()
    assert torch.equal(layer.transform(kjt).values(), build("hybrid").transform(kjt).values())
    for fi, (name, ids) in enumerate(kjt.to_dict().items()):
        k = round(0.2 * (SMALL[name] - 1))
        v = _array(ids.values())
        assert np.array_equal(_array(out[f"{name}__hot"].values()), np.minimum(v, k + 1))
        cold = out[f"{name}__cold"]
        assert np.array_equal(_array(cold.values()), bucket_ids_np(v[v > k], salted_seed(3, fi), 29,
                                                                     layer.plan.transform.params["hash"]))
        bags = np.split(v, np.cumsum(_array(ids.lengths()))[:-1])
        assert _array(cold.lengths()).tolist() == [int((bag > k).sum()) for bag in bags]
    tables = {t.name: t.num_embeddings for t in layer.tables}
    assert tables["x_hot_user"] == round(0.2 * 36) + 2 and tables["x_hashed"] == 29


def test_mde_rows_match_numpy() -> None:
    kjt = batch(4)
    layer = build("mde")
    tables = layer.plan.transform.params["tables"]
    hashed = [t for t in tables if t["hashed"]]
    assert hashed and len(hashed) < len(tables), "the small case must mix capped and whole tables"
    out = layer.transform(kjt).to_dict()
    assert torch.equal(layer.transform(kjt).values(), build("mde").transform(kjt).values())
    for t in tables:
        v = _array(kjt.to_dict()[t["feature"]].values()) - t["start"]
        seed = salted_seed(3, list(SMALL).index(t["feature"]), 0)
        want = bucket_ids_np(v, seed, t["rows"], layer.plan.transform.params["hash"]) if t["hashed"] else v
        assert np.array_equal(_array(out[t["key"]].values()), want)


# ------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("kind", list(PARAMS))
def test_gradient_reaches_the_tables(kind: str) -> None:
    layer = build(kind)
    kjt = batch(5)
    layer(kjt).values().square().sum().backward()
    touched = layer.transform(kjt).to_dict()
    for table in layer.tables:
        grad = layer.ebc.embedding_bags[table.name].weight.grad
        assert grad is not None, f"{kind}: no gradient for {table.name}"
        rows = set()
        for key in table.feature_names:
            rows |= set(_array(touched[key].values()).tolist())
        nonzero = set(torch.nonzero(grad.abs().sum(dim=1)).flatten().tolist())
        assert nonzero == rows, f"{kind}/{table.name}: gradient rows {sorted(nonzero)} != looked-up {sorted(rows)}"
    for p in layer.combiner.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ solvers


def test_robe_rows_solver() -> None:
    assert robe_rows(8 * 4 * 10, block=8) == 10
    assert robe_rows(8 * 4 * 10 + 31, block=8) == 10
    with pytest.raises(BudgetError, match=r"at least 32 bytes"):
        robe_rows(31, block=8)


def test_robe_refuses_bad_block() -> None:
    with pytest.raises(ConfigError, match=r"block=6"):
        build_variant("robe", spec("robe", SMALL, None, {"block": 6}, dim=12))
    with pytest.raises(ConfigError, match=r"divides embedding.dim=8"):
        build_variant("robe", spec("robe", SMALL, None, {"block": 16}))


def test_frequency_blocks_split_count_mass() -> None:
    counts = np.array([0, 50, 20, 10, 8, 6, 4, 2])
    blocks = frequency_blocks(counts, 8, blocks=2)
    assert blocks == [(0, 2, 0.25), (2, 6, 0.5 / 6)]
    assert frequency_blocks(counts, 8, blocks=1) == [(0, 8, 1 / 8)]
    assert frequency_blocks(None, 8, blocks=3) == [(0, 8, 1 / 8)]
    many = frequency_blocks(counts, 8, blocks=20)  # more blocks than ids: each id range at least one id
    assert [s for s, _, _ in many] == sorted({s for s, _, _ in many}) and sum(n for _, n, _ in many) == 8


def test_power_law_widths_round_and_clamp() -> None:
    probs = np.array([1.0, 0.1, 0.01, 1e-6])
    assert power_law_widths(probs, 0.3, 16.0, 16).tolist() == [16, 8, 4, 4]
    assert power_law_widths(probs, 0.0, 9.9, 16).tolist() == [8, 8, 8, 8]
    assert power_law_widths(probs, 0.3, 100.0, 16).tolist() == [16, 16, 16, 4]  # 1.58 rounds up to 4


def test_solve_mde_scales_widths_then_caps_rows() -> None:
    sizes, probs = [10, 100, 1000], [0.1, 0.01, 0.001]
    widths, cap = solve_mde(sizes, probs, 16, 0.5, None)
    assert widths.tolist() == [16, 4, 4] and cap is None  # d0 rule: the most popular table gets dim
    all4 = mde_bytes(np.array(sizes), np.array([4, 4, 4]), 16)
    full = mde_bytes(np.array(sizes), np.array([16, 16, 16]), 16)
    assert solve_mde(sizes, probs, 16, 0.5, full)[0].tolist() == [16, 16, 16]
    mid_widths, mid_cap = solve_mde(sizes, probs, 16, 0.5, (all4 + full) // 2)
    assert mid_cap is None and mde_bytes(np.array(sizes), mid_widths, 16) <= (all4 + full) // 2
    assert mid_widths.tolist() == sorted(mid_widths.tolist(), reverse=True)  # rarer ids, narrower rows
    widths, cap = solve_mde(sizes, probs, 16, 0.5, all4 - 1)
    assert widths.tolist() == [16, 4, 4] and cap is not None and cap < 1000
    assert mde_bytes(np.minimum(sizes, cap), widths, 16) <= all4 - 1 < mde_bytes(np.minimum(sizes, cap + 1), widths, 16)
    with pytest.raises(BudgetError, match=r"3 tables of one row"):
        solve_mde(sizes, probs, 16, 0.5, 100)


def test_solve_hot_ids_by_global_count_threshold() -> None:
    counts = [np.array([0, 9, 5, 1]), np.array([0, 7, 6, 5, 2, 1, 1])]
    # Budget of 8 rows: ids with count >= 6 are hot: [9] and [7, 6], each feature + OOV + cold row.
    assert solve_hot_ids([4, 7], counts, row_budget=8) == [1, 2]
    assert [hot_rows(4, 1), hot_rows(7, 2)] == [3, 4]
    assert solve_hot_ids([4, 7], counts, row_budget=3) == [0, 0]  # minimum: OOV and cold rows
    assert solve_hot_ids([4, 7], counts, row_budget=100) == [3, 6]
    assert solve_hot_ids([4, 7], None, row_budget=9) == [3, 3]  # 4 + 5 rows: the small feature is all hot


def test_solve_hybrid_fills_the_target() -> None:
    hot, rows = solve_hybrid([4, 7], None, dim=4, target=16 * 30, hot_fraction=0.3)
    used = sum(hot_rows(n, k) for n, k in zip([4, 7], hot, strict=True))
    assert used <= 9 and used + rows == 30
    with pytest.raises(BudgetError, match=r"raise embedding.budget"):
        solve_hybrid([4, 7], None, dim=4, target=16 * 4, hot_fraction=0.5)


# ------------------------------------------------------------------------------ frequency-aware, real counts


def test_count_aware_layouts_on_prepared_data(prepared_ctr: Path) -> None:
    fm = FeatureMap.load(prepared_ctr)
    cfg = EmbeddingConfig(kind="hybrid", dim=8, budget=0.05, params={"hot_fraction_of_budget": 0.5})
    layer = build_embedding_layer(fm, cfg, device=torch.device("meta"))
    hot = dict(zip(layer.features, layer.plan.arrays["hot_ids"].tolist(), strict=True))
    hot_counts, cold_counts = [], []
    for name, k in hot.items():
        counts = fm.id_counts(name)
        assert counts is not None
        hot_counts += counts[1 : k + 1].tolist()
        cold_counts += counts[k + 1 :].tolist()
    assert hot_counts and cold_counts
    assert min(hot_counts) >= max(cold_counts), "a cold id is more frequent than a hot id of another feature"
    assert layer.parameter_bytes() <= 0.05 * layer.full_bytes()

    mde = build_embedding_layer(fm, EmbeddingConfig(kind="mde", dim=16, params={"blocks": 3}),
                               device=torch.device("meta"))
    per_feature: dict[str, list[int]] = {}
    for t in mde.plan.combiner.params["inputs"]:
        per_feature.setdefault(t["feature"], []).append(t["width"])
    assert any(len(w) > 1 for w in per_feature.values()), "no feature was split into frequency blocks"
    assert all(w == sorted(w, reverse=True) for w in per_feature.values()), "a rarer block got wider rows"

    # A budget too small for three blocks' tables per feature falls back to one table per feature.
    # One 4-wide row (16 bytes) and its 4x16 projection (256 bytes) per table, with room for more rows.
    one_each = int(len(mde.features) * (16 + 256) * 1.5)
    tight = build_embedding_layer(fm, EmbeddingConfig(kind="mde", dim=16, budget=float(one_each), params={"blocks": 3}),
                                  device=torch.device("meta"))
    assert len(tight.plan.transform.params["tables"]) == len(tight.features)
    assert tight.parameter_bytes() <= one_each


# ------------------------------------------------------------------------------ two ranks


SHARDED_CASES = [("robe", "row_wise"), ("hybrid", "table_wise"), ("hybrid", "row_wise"), ("mde", "row_wise")]


def _small_map() -> FeatureMap:
    feats = [FeatureInfo(name=n, kind="multihot" if n == "tags" else "sparse", source=n, num_embeddings=r)
             for n, r in SMALL.items()]
    return FeatureMap(dataset_id="toy", label="label", features=feats)


def sharded_worker(rank: int, world_size: int) -> dict[str, Any]:
    """Each case: the sharded layer (built on meta, loaded with the reference's weights) vs the unsharded one."""
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    for kind, sharding in SHARDED_CASES:
        budget, params = SMALL_CASES[kind]
        cfg = EmbeddingConfig(kind=kind, dim=DIM, budget=budget, params=params, sharding=sharding, seed=3,
                              init_std=0.1)
        torch.manual_seed(0)
        reference = build_embedding_layer(_small_map(), cfg)
        sharded = shard_model(build_embedding_layer(_small_map(), cfg, device=torch.device("meta")), cfg,
                              torch.device("cpu"))
        load_full_state(sharded.model, reference.state_dict())
        kjt = batch(10 + rank)
        with torch.no_grad():
            got = sharded.model(kjt)
            want = reference(kjt)
        out[f"{kind}/{sharding}"] = {"keys": list(got.keys()), "got": _array(got.values()).copy(),
                                     "want": _array(want.values()).copy()}
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return run_ranks(sharded_worker, 2)


@pytest.mark.parametrize(("kind", "sharding"), SHARDED_CASES)
def test_sharded_forward_matches_unsharded(ranks: list[dict[str, Any]], kind: str, sharding: str) -> None:
    for rank, result in enumerate(ranks):
        run = result[f"{kind}/{sharding}"]
        assert run["keys"] == list(SMALL)
        assert run["got"].shape == (BATCH, DIM * len(SMALL))
        assert np.abs(run["want"]).max() > 0
        assert np.allclose(run["got"], run["want"], atol=1e-6), f"rank {rank}: {kind}/{sharding} differs"


# ------------------------------------------------------------------------------ training


def test_hybrid_deepfm_learns(make_experiment: Any) -> None:
    from recemb.train.loop import train

    cfg = make_experiment("deepfm", "embedding.kind=hybrid", "embedding.budget=0.1")
    with in_process_run():
        result = train(cfg)
    assert result.test["auc"] > 0.55, result.test
    # The budget covers the first-order (linear) tables too: they are hybrid at the same fraction.
    assert 0.095 * result.full_bytes <= result.embedding_bytes <= 0.1 * result.full_bytes
