"""The hashing family: ``hashed``, ``qr``, ``unified`` and the id hash they share.

Checks the hash itself (torch == numpy bit for bit, the same in a fresh process,
uniform buckets by a chi-square test), the budget solvers (within 2% of the
target at 1/10, 1/100, 1/1000 of the benchmark's vocabularies), exact lookups
against hand-computed rows, the unified == full identity when nothing collides,
two gloo ranks against the unsharded layer, and one short training run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
from dist_utils import run_ranks
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recemb.config.experiment import EmbeddingConfig, EmbeddingGroup
from recemb.data.schema import FeatureInfo, FeatureMap
from recemb.embeddings.budget import BudgetError
from recemb.embeddings.hashed import HashedParams, hashed_rows
from recemb.embeddings.hashing import (
    bucket_ids,
    bucket_ids_np,
    hash64,
    hash64_np,
    hash_ids,
    hash_ids_np,
    hash_keys,
    hash_segments,
    mulshift_ids_np,
    salted_seed,
)
from recemb.embeddings.qr import solve_qr
from recemb.embeddings.registry import build_embedding_layer
from recemb.embeddings.sharding import load_full_state, shard_model
from recemb.embeddings.unified import UnifiedParams, solve_unified
from recemb.errors import ConfigError

# The 1M-row synthetic benchmark's vocabularies (min_count 2), the solvers' real workload.
BENCH_VOCAB = [11, 252, 6302, 25196, 26, 632, 13870, 24188, 64, 1586, 21569, 25189, 159, 3982, 24791, 17,
               399, 9764, 25500, 41, 1001, 18212, 24400, 101, 2513, 23371]
BUDGETS = [0.1, 0.01, 0.001]
DIM = 16


def feature_map(vocab: dict[str, int]) -> FeatureMap:
    feats = [FeatureInfo(name=n, kind="sparse", source=n, num_embeddings=v) for n, v in vocab.items()]
    return FeatureMap(dataset_id="toy", label="label", features=feats)


def bench_map() -> FeatureMap:
    return feature_map({f"C{i + 1}": v for i, v in enumerate(BENCH_VOCAB)})


def kjt(values: dict[str, list[int]]) -> KeyedJaggedTensor:
    """Single-valued features, one id per row."""
    keys = list(values)
    flat = torch.tensor([v for k in keys for v in values[k]], dtype=torch.long)
    lengths = torch.ones(len(flat), dtype=torch.long)
    return KeyedJaggedTensor(keys=keys, values=flat, lengths=lengths, stride=len(values[keys[0]]))


def tables(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: bag.weight for name, bag in layer.ebc.embedding_bags.items()}


# ---------------------------------------------------------------- the hash


def test_torch_hash_is_bit_exact_with_numpy() -> None:
    ids = torch.cat([torch.arange(-5, 1000), torch.randint(-(2**62), 2**62, (10_000,))])
    for seed in (0, 1, 2**40 + 3):
        assert (hash64(ids, seed).numpy().view(np.uint64) == hash64_np(ids.numpy(), seed)).all()
        assert (hash_ids(ids, seed, 997).numpy() == hash_ids_np(ids.numpy(), seed, 997)).all()


def test_hash_is_the_same_in_a_fresh_process() -> None:
    code = (
        "import torch, json; from recemb.embeddings.hashing import hash_ids, salted_seed;"
        "print(json.dumps(hash_ids(torch.arange(50), salted_seed(3, 1, 2), 101).tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == hash_ids(torch.arange(50), salted_seed(3, 1, 2), 101).tolist()


def test_hash_buckets_are_uniform_chi_square() -> None:
    buckets, n = 97, 200_000
    counts = np.bincount(hash_ids(torch.arange(n), 11, buckets).numpy(), minlength=buckets)
    expected = n / buckets
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 96 degrees of freedom: the 99.9% quantile is about 146; a biased hash lands far above.
    assert chi2 < 146, chi2
    # Salted seeds give independent maps: two probes of the same id rarely agree.
    a, b = hash_ids(torch.arange(n), salted_seed(0, 1, 0), buckets), hash_ids(torch.arange(n), salted_seed(0, 1, 1), buckets)
    assert abs(float((a == b).float().mean()) - 1 / buckets) < 0.003


MULSHIFT_IDS = torch.cat([torch.arange(-5, 1000), torch.randint(-(2**62), 2**62, (10_000,))])


@pytest.mark.parametrize("buckets", [1, 997, 2**31])
def test_mulshift_torch_is_bit_exact_with_numpy(buckets: int) -> None:
    ids = MULSHIFT_IDS
    seeds = [0, 1, 2**40 + 3]
    keys = hash_keys(seeds, "mulshift")
    for i, seed in enumerate(seeds):
        want = mulshift_ids_np(ids.numpy(), seed, buckets)
        assert want.min() >= 0 and want.max() < buckets
        got = bucket_ids(ids, keys[i].expand(len(ids), 2), buckets, "mulshift")
        assert np.array_equal(got.numpy(), want)
    # Segments of equal length (the [keys, ids] grid) and of unequal lengths (gathered by segment).
    for lengths in ([len(ids) // 3] * 3, [7, 1000, len(ids) // 3 * 3 - 1007]):
        values = ids[:sum(lengths)]
        got = hash_segments(values, keys, torch.tensor([buckets] * 3), lengths, hash_name="mulshift")
        parts = np.split(values.numpy(), np.cumsum(lengths)[:-1])
        want = np.concatenate([bucket_ids_np(p, s, buckets, "mulshift") for p, s in zip(parts, seeds, strict=True)])
        assert np.array_equal(got.numpy(), want), lengths
    with pytest.raises(ValueError, match="2\\*\\*31"):
        mulshift_ids_np(ids.numpy(), 0, 2**31 + 1)


def test_mulshift_spreads_ids_and_salted_probes_are_independent() -> None:
    buckets, n = 97, 200_000
    rng = np.random.default_rng(0)
    for ids in (np.arange(n), rng.integers(0, 2**32, n)):
        counts = np.bincount(mulshift_ids_np(ids, 11, buckets), minlength=buckets)
        expected = n / buckets
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 146, chi2  # 96 degrees of freedom, 99.9% quantile about 146
    ids = np.arange(n)
    a, b = mulshift_ids_np(ids, salted_seed(0, 1, 0), buckets), mulshift_ids_np(ids, salted_seed(0, 1, 1), buckets)
    assert abs(float((a == b).mean()) - 1 / buckets) < 0.003
    # Universal over seeds: a fixed pair of ids (neighbours, far apart, id 0) shares a bucket about
    # 1/buckets of the time, not systematically.
    seeds = range(4000)
    for x, y in ((0, 1), (5, 5 + 2**20), (123_456, 7_654_321)):
        same = np.mean([mulshift_ids_np(np.array([x, y]), s, buckets).tolist().count(
            int(mulshift_ids_np(np.array([x]), s, buckets)[0])) == 2 for s in seeds])
        assert same < 2.5 / buckets, (x, y, same)


def test_plans_and_checkpoints_from_before_mulshift_keep_splitmix64() -> None:
    from recemb.config.loader import from_dict
    from recemb.embeddings.hashed import HashTransform
    from recemb.embeddings.plan import VariantPlan
    from recemb.serving.transforms import apply_transform
    from recemb.train.checkpoint import fill_model_params

    fm = feature_map({"big": 1000})
    layer = build_embedding_layer(fm, EmbeddingConfig(kind="hashed", dim=8, params={"rows": 50}, seed=4))
    old = layer.plan.to_dict()
    del old["transform"]["params"]["hash"]  # as plans were written before embedding.hash
    plan = VariantPlan.from_dict(old)
    ids = np.array([999, 3, 500, 0])
    seed = plan.transform.params["features"]["big"]["seed"]
    want = hash_ids_np(ids, seed, 50)
    got = HashTransform.from_plan(plan)(kjt({"big": ids.tolist()})).values().numpy()
    assert np.array_equal(got, want)
    assert np.array_equal(apply_transform(plan, "big", ids, np.ones(4, np.int64))[0].values, want)
    # A checkpoint's config without embedding.hash rebuilds its plans with splitmix64; a new one is explicit.
    saved = {"model": {"name": "dcnv2"}, "embedding": {"kind": "hashed", "dim": 8, "params": {"rows": 50}, "seed": 4}}
    embedding = from_dict(EmbeddingConfig, fill_model_params(saved, saved=True)["embedding"], where="test")
    assert embedding.hash == "splitmix64"
    rebuilt = build_embedding_layer(fm, embedding)
    assert np.array_equal(rebuilt.transform(kjt({"big": ids.tolist()})).values().numpy(), want)
    assert fill_model_params(saved, saved=False)["embedding"]["hash"] == "mulshift"


# ---------------------------------------------------------------- solvers and budgets


@pytest.mark.parametrize("kind", ["hashed", "qr", "unified"])
@pytest.mark.parametrize("budget", BUDGETS)
def test_budget_is_hit_within_two_percent(kind: str, budget: float) -> None:
    layer = build_embedding_layer(bench_map(), EmbeddingConfig(kind=kind, dim=DIM, budget=budget),
                                  device=torch.device("meta"))
    got = layer.bytes()
    assert got.full == sum(BENCH_VOCAB) * DIM * 4
    target = budget * got.full
    assert abs(got.achieved - target) <= 0.02 * target, (got.achieved, target)


def test_solvers_by_hand() -> None:
    assert hashed_rows({"a": 10, "b": 1000}, 4, budget=0.1, params=HashedParams()) == {"a": 10, "b": 91}
    assert hashed_rows({"a": 10, "b": 1000}, 4, None, HashedParams(rows=64)) == {"a": 10, "b": 64}
    layout = solve_qr({"a": 10, "b": 10_000}, row_budget=310)
    assert (layout["a"].modulus, layout["b"].modulus, layout["b"].buckets) == (0, 261, 0)
    assert layout["b"].rows == 261 + 39
    tight = solve_qr({"b": 10_000}, row_budget=20)["b"]  # below 2*sqrt(V): hash first, then QR
    assert (tight.buckets, tight.modulus, tight.rows) == (100, 10, 20)
    uni = solve_unified({"a": 10, "b": 100_000}, 16, 0.01, UnifiedParams(tables=2, chunk=8))
    assert uni.exempt == ["a"] and uni.rows == (int(0.01 * 100_010 * 64) - 10 * 64) // (2 * 8 * 4)
    with pytest.raises(BudgetError, match="one row per feature"):
        hashed_rows({"a": 10, "b": 1000}, 4, budget=0.001, params=HashedParams())


# ---------------------------------------------------------------- exact lookups


def test_hashed_lookup_reads_the_hashed_row() -> None:
    fm = feature_map({"small": 5, "big": 1000})
    layer = build_embedding_layer(fm, EmbeddingConfig(kind="hashed", dim=8, params={"rows": 50}, seed=4))
    ids = {"small": [0, 4, 2], "big": [999, 3, 500]}
    out = layer(kjt(ids)).to_dict()
    w = tables(layer)
    assert torch.equal(out["small"], w["h_small"][torch.tensor(ids["small"])])  # fits: identity
    manifest = layer.plan.transform.params["features"]["big"]
    assert layer.plan.transform.params["hash"] == "mulshift"  # embedding.hash's default
    rows = bucket_ids_np(np.array(ids["big"]), manifest["seed"], manifest["rows"], "mulshift")
    assert torch.equal(out["big"], w["h_big"][torch.from_numpy(rows)])
    json.dumps(layer.plan.to_dict())


@pytest.mark.parametrize("op", ["mult", "add", "concat"])
def test_qr_lookup_combines_quotient_and_remainder(op: str) -> None:
    fm = feature_map({"f": 1000})
    layer = build_embedding_layer(fm, EmbeddingConfig(kind="qr", dim=8, params={"op": op, "modulus": 40}))
    ids = torch.tensor([0, 39, 40, 999])
    out = layer(kjt({"f": ids.tolist()})).values()
    w = tables(layer)
    q, r = w["q_f"][ids // 40], w["r_f"][ids % 40]
    expected = q * r if op == "mult" else q + r if op == "add" else torch.cat([q, r], 1)
    assert out.shape == (4, 8) and torch.allclose(out, expected)
    # Every id has its own (q, r) pair: distinct ids never share their whole embedding.
    pairs = {(int(i) // 40, int(i) % 40) for i in range(1000)}
    assert len(pairs) == 1000


def test_unified_concatenates_salted_probes_over_round_robin_tables() -> None:
    fm = feature_map({"a": 300, "b": 500, "tiny": 3})
    cfg = EmbeddingConfig(kind="unified", dim=8, seed=9,
                          params={"tables": 2, "chunk": 4, "rows": 64, "exempt": ["tiny"], "chunks": {"b": 3}})
    layer = build_embedding_layer(fm, cfg)
    assert layer.dims == {"a": 8, "b": 12, "tiny": 8}
    ids = {"a": [1, 299], "b": [7, 400], "tiny": [2, 0]}
    out = layer(kjt(ids)).to_dict()
    w = tables(layer)
    probes = layer.plan.transform.params["features"]
    assert [c["table"] for c in probes["a"]["chunks"] + probes["b"]["chunks"]] == [0, 1, 0, 1, 0]
    for f in ("a", "b"):
        blocks = [w[f"u{c['table']}"][torch.from_numpy(bucket_ids_np(np.array(ids[f]), c["seed"], 64, "mulshift"))]
                  for c in probes[f]["chunks"]]
        assert torch.equal(out[f], torch.cat(blocks, 1))
    assert torch.equal(out["tiny"], w["t_tiny"][torch.tensor(ids["tiny"])])


def test_unified_one_chunk_without_collisions_equals_a_full_table() -> None:
    vocab = {"f": 40}
    cfg = EmbeddingConfig(kind="unified", dim=8, seed=1, params={"tables": 1, "chunk": 8, "rows": 1 << 20})
    uni = build_embedding_layer(feature_map(vocab), cfg)
    full = build_embedding_layer(feature_map(vocab), EmbeddingConfig(kind="full", dim=8))
    seed = uni.plan.transform.params["features"]["f"]["chunks"][0]["seed"]
    rows = bucket_ids_np(np.arange(40), seed, 1 << 20, "mulshift")
    assert len(set(rows.tolist())) == 40, "the test needs a collision-free hash of the 40 ids"
    with torch.no_grad():
        tables(uni)["u0"][torch.from_numpy(rows)] = tables(full)["t_f"]
    ids = {"f": list(range(40))}
    assert torch.equal(uni(kjt(ids)).values(), full(kjt(ids)).values())


# ---------------------------------------------------------------- sharded == unsharded


SHARDED_VOCAB = {"user": 37, "item": 640, "tags": 1001, "site": 6}


def _sharded_forward(rank: int, world_size: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    fm = feature_map(SHARDED_VOCAB)
    gen = torch.Generator().manual_seed(rank)
    batch = {k: torch.randint(0, v, (16,), generator=gen).tolist() for k, v in SHARDED_VOCAB.items()}
    for kind, params in [("unified", {"tables": 2, "chunk": 4, "exempt": ["site"]}), ("qr", {}), ("hashed", {})]:
        for sharding in ("table_wise", "row_wise", "column_wise"):
            cfg = EmbeddingConfig(kind=kind, dim=8, budget=0.3, sharding=sharding, params=params, seed=5)
            torch.manual_seed(0)
            reference = build_embedding_layer(fm, cfg)
            sharded = shard_model(build_embedding_layer(fm, cfg, device=torch.device("meta")), cfg,
                                  torch.device("cpu"))
            load_full_state(sharded.model, reference.state_dict())
            with torch.no_grad():
                got, want = sharded.model(kjt(batch)), reference(kjt(batch))
            out[f"{kind}/{sharding}"] = (list(got.keys()), got.values().numpy().copy(), want.values().numpy().copy())
    return out


def test_two_rank_sharded_equals_unsharded() -> None:
    results = run_ranks(_sharded_forward, 2)
    for rank, result in enumerate(results):
        for name, (keys, got, want) in result.items():
            assert keys == list(SHARDED_VOCAB), f"rank {rank} {name}: {keys}"
            assert got.shape == want.shape and np.allclose(got, want, atol=1e-6), f"rank {rank} {name}"


# ---------------------------------------------------------------- training


def test_unified_trains_at_a_hundredth_of_the_bytes(make_experiment: Any) -> None:
    from recemb.train.loop import train

    cfg = make_experiment("dcnv2", "embedding.kind=unified", "embedding.budget=0.01", "train.epochs=2")
    result = train(cfg)
    assert result.embedding_bytes <= 0.0102 * result.full_bytes
    assert result.test["auc"] > 0.6, result.test


@pytest.mark.parametrize("model", ["deepfm", "dcnv2", "lr"])
@pytest.mark.parametrize("budget", [0.01, 100_000.0])
def test_budget_covers_every_embedding_layer_of_the_model(model: str, budget: float) -> None:
    """First-order tables follow the variant, so a fraction or a byte count bounds the whole model."""
    from recemb.config.experiment import ModelConfig
    from recemb.models.registry import build_model, embedding_layers

    built = build_model(ModelConfig(name=model), bench_map(), EmbeddingConfig(kind="unified", dim=DIM, budget=budget),
                        device=torch.device("meta"))
    layers = embedding_layers(built)
    achieved = sum(layer.parameter_bytes() for layer in layers.values())
    full = sum(layer.full_bytes() for layer in layers.values())
    target = budget * full if budget <= 1 else budget
    assert 0.97 * target <= achieved <= 1.001 * target, (achieved, target, sorted(layers))


@pytest.mark.parametrize("kind", ["hashed", "qr", "unified"])
def test_input_key_order_does_not_matter(kind: str) -> None:
    vocab = {"a": 300, "b": 5000, "c": 7}
    params = {"tables": 2, "chunk": 4, "exempt": ["c"], "chunks": {"b": 3}} if kind == "unified" else {}
    layer = build_embedding_layer(feature_map(vocab), EmbeddingConfig(kind=kind, dim=8, budget=0.2, params=params))
    ids = {"a": [1, 299, 5], "b": [4999, 0, 17], "c": [6, 2, 0]}
    forward = layer(kjt(ids))
    backward = layer(kjt({k: ids[k] for k in reversed(list(ids))}))
    assert list(backward.keys()) == list(vocab)
    assert torch.equal(forward.values(), backward.values())


# ---------------------------------------------------------------- config edges (review findings)


def test_qr_mult_refuses_multi_hot_and_concat_keeps_its_budget() -> None:
    feats = [FeatureInfo(name="tags", kind="multihot", source="tags", num_embeddings=1000)]
    multi = FeatureMap(dataset_id="toy", label="label", features=feats)
    with pytest.raises(ConfigError, match="multi-hot"):
        build_embedding_layer(multi, EmbeddingConfig(kind="qr", dim=8, params={"op": "mult"}))
    build_embedding_layer(multi, EmbeddingConfig(kind="qr", dim=8, params={"op": "add"}))  # linear in the bag: fine
    for vocab, budget in [({"s": 2000, "b": 100_000}, 0.05), ({"a": 50, "b": 20_000, "c": 300_000}, 0.5)]:
        layer = build_embedding_layer(feature_map(vocab), EmbeddingConfig(kind="qr", dim=16, budget=budget,
                                                                         params={"op": "concat"}),
                                      device=torch.device("meta"))
        got = layer.bytes()
        assert got.achieved <= 1.02 * budget * got.full, (vocab, got)


def test_groups_inherit_budget_and_params_only_of_their_own_kind() -> None:
    fm = bench_map()
    small = ["C1", "C5", "C16"]
    cfg = EmbeddingConfig(kind="unified", dim=DIM, budget=0.01, params={"tables": 3},
                          groups=[EmbeddingGroup(features=small, kind="full"),
                                  EmbeddingGroup(features=["C4"], kind="hashed")])
    layer = build_embedding_layer(fm, cfg, device=torch.device("meta"))
    full_group, hashed_group = layer.layers["g0"], layer.layers["g1"]
    assert full_group.bytes().ratio == 1.0  # no budget inherited by another kind
    assert hashed_group.bytes().ratio == 1.0  # nor params: hashed without a budget keeps its rows
    # A byte budget is shared by the blocks that inherit it, not given whole to each.
    cfg = EmbeddingConfig(kind="unified", dim=DIM, budget=50_000.0, groups=[EmbeddingGroup(features=["C4", "C8"])])
    shared = build_embedding_layer(fm, cfg, device=torch.device("meta"))
    assert 0.98 * 50_000 <= shared.parameter_bytes() <= 50_000


def test_budget_mistakes_are_config_errors() -> None:
    fm = feature_map({"a": 1000, "b": 50})
    with pytest.raises(BudgetError, match="byte counts"):
        build_embedding_layer(fm, EmbeddingConfig(kind="hashed", dim=16, budget=1.5))
    with pytest.raises(ConfigError, match="takes no budget"):
        build_embedding_layer(fm, EmbeddingConfig(kind="full", dim=16, budget=0.1))
    with pytest.raises(BudgetError, match="per_feature"):
        build_embedding_layer(fm, EmbeddingConfig(kind="hashed", dim=16, budget=0.01,
                                                  params={"per_feature": {"a": 1000, "b": 50}}))
    for kind, params in [("hashed", {"rows": -5}), ("qr", {"modulus": -3}), ("unified", {"rows": 0}),
                         ("unified", {"chunks": {"a": 0}})]:
        with pytest.raises(ConfigError):
            build_embedding_layer(fm, EmbeddingConfig(kind=kind, dim=16, params=params))
