"""Tests for the ``dedup`` variant (``recemb.embeddings.dedup``, numpy twin ``recemb.serving.variants.dedup``).

The layout solver on the 26-feature benchmark vocabulary (budget met within 5%, budgets the index
alone exceeds refused), the LSH deduplication (at most ``unique`` blocks, equal blocks always
together, nearer blocks merged first, the threshold floor), the numpy twins (single- and multi-hot,
whole rows and smaller blocks), the stored form (bytes within the plan's, also for a table trained
past its last deduplication), gradients into the rows and the in-place deduplication schedule, the
meta build, two gloo ranks against one process on the global batch, and DCNv2 trained end to end
and exported, and resumed across a deduplication.
"""

from __future__ import annotations

import doctest
import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dist_utils import in_process_run, run_ranks
from rank_harness import LabelledBatch, TinyHead, concat_batches, rank_batches, train_logits
from torch import nn
from twin_utils import as_kjt, check_twins, feature_map, random_ids

from recemb.config.experiment import EmbeddingConfig
from recemb.data.schema import FeatureInfo, FeatureMap
from recemb.embeddings.blockdedup import dedup_table, group_blocks
from recemb.embeddings.budget import BudgetError
from recemb.embeddings.dedup import DedupLayer, DedupLayout, dedup_bytes
from recemb.embeddings.registry import build_embedding_layer
from recemb.errors import ConfigError
from recemb.serving.variants.dedup import dedup_rows, stored_dedup

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH_VOCAB = [11, 252, 6302, 25196, 26, 632, 13870, 24188, 64, 1586, 21569, 25189, 159, 3982, 24791, 17, 399,
               9764, 25500, 41, 1001, 18212, 24400, 101, 2513, 23371]
MODULES = ["recemb.embeddings.dedup", "recemb.embeddings.blockdedup", "recemb.serving.variants.dedup"]


def bench_map() -> FeatureMap:
    feats = [FeatureInfo(name=f"C{i + 1}", kind="sparse", source=f"C{i + 1}", num_embeddings=v)
             for i, v in enumerate(BENCH_VOCAB)]
    return FeatureMap(dataset_id="bench", label="label", features=feats)


def layer_of(fm: FeatureMap | None = None, device: torch.device | None = None, **kwargs: Any) -> DedupLayer:
    cfg = EmbeddingConfig(kind="dedup", dim=kwargs.pop("dim", 8), **{"budget": 0.2, "lr": 0.05, "seed": 1, **kwargs})
    layer = build_embedding_layer(fm or feature_map(True), cfg, device=device)
    assert isinstance(layer, DedupLayer)
    return layer


def step(layer: nn.Module, fm: FeatureMap, seed: int) -> None:
    layer.train()
    out = layer(as_kjt(random_ids(fm, 32, seed=seed)))
    (out.values() * torch.randn(out.values().shape, generator=torch.Generator().manual_seed(seed))).sum().backward()


def distinct_blocks(table: torch.Tensor, block: int) -> int:
    return int(torch.unique(table.reshape(-1, block), dim=0).shape[0])


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


# ---------------------------------------------------------------- bytes and budgets


@pytest.mark.parametrize("budget", [0.1, 0.05])
def test_budget_is_met_within_5_percent(budget: float) -> None:
    layer = build_embedding_layer(bench_map(), EmbeddingConfig(kind="dedup", dim=16, budget=budget),
                                  device=torch.device("meta"))
    assert isinstance(layer, DedupLayer)
    ratio = layer.parameter_bytes() / layer.full_bytes()
    assert 0.95 * budget <= ratio <= budget, ratio
    rows = sum(BENCH_VOCAB)
    assert layer.layout == DedupLayout(16, layer.layout.unique, "uint16")  # whole rows, 2-byte indices
    assert layer.parameter_bytes() == layer.layout.unique * 64 + rows * 2 == dedup_bytes(rows, 16, layer.layout)
    record = layer.plan.capabilities.budget
    assert record["solver"] == "dedup_blocks" and record["unique"] == layer.layout.unique
    assert record["blocks"] == rows and record["unique_share"] < budget
    assert layer.plan.capabilities.achieved_bytes == layer.parameter_bytes()


def test_budgets_the_index_alone_exceeds_are_refused() -> None:
    # At block = dim = 16 the index takes at least 1 byte a row: 1/64 of the full bytes.
    with pytest.raises(BudgetError, match="block index alone"):
        build_embedding_layer(bench_map(), EmbeddingConfig(kind="dedup", dim=16, budget=0.01),
                              device=torch.device("meta"))
    layer = build_embedding_layer(bench_map(), EmbeddingConfig(kind="dedup", dim=16, budget=0.02),
                                  device=torch.device("meta"))
    assert layer.layout.index_dtype == "uint8" and layer.layout.unique == 256  # reachable, but under the budget
    assert layer.parameter_bytes() <= 0.02 * layer.full_bytes()
    with pytest.raises(BudgetError, match="block index alone"):  # smaller blocks: more index
        build_embedding_layer(bench_map(), EmbeddingConfig(kind="dedup", dim=16, budget=0.05, params={"block": 2}),
                              device=torch.device("meta"))


def test_layout_without_a_budget_and_bad_params() -> None:
    fm = feature_map(False)
    layer = build_embedding_layer(fm, EmbeddingConfig(kind="dedup", dim=8, params={"unique_share": 0.25,
                                                                                   "block": 4}))
    assert isinstance(layer, DedupLayer)
    blocks = sum(layer.full_rows.values()) * 2
    assert layer.layout == DedupLayout(4, round(0.25 * blocks), "uint16") and layer.blocks == blocks
    for kwargs, match in [({}, "needs embedding.budget"), ({"budget": 0.2, "params": {"unique_share": 0.5}}, "not both"),
                          ({"budget": 0.2, "params": {"block": 3}}, "must divide"),
                          ({"budget": 0.2, "params": {"dedup_every": -1}}, ">= 0"),
                          ({"params": {"unique_share": 1.5}}, "unique_share")]:
        with pytest.raises(ConfigError, match=match):
            build_embedding_layer(fm, EmbeddingConfig(kind="dedup", dim=8, **kwargs))


# ---------------------------------------------------------------- the deduplication


def test_dedup_keeps_at_most_unique_blocks_and_merges_the_nearest_first() -> None:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, 4)).astype(np.float32)
    table = (centers[rng.integers(0, 20, 600)] + 1e-4 * rng.standard_normal((600, 4))).astype(np.float32)
    table[:50] = table[0]  # exact duplicates
    for cap in (1, 5, 20, 100, 599):
        merged, found = dedup_table(table, 4, cap, 0.0, seed=3)
        index, unique = group_blocks(merged, 4)
        assert found.unique == unique.shape[0] <= cap and found.blocks == 600 and found.merged == 600 - found.unique
        assert (index[:50] == index[0]).all()  # equal blocks always share a copy
        np.testing.assert_array_equal(unique[index.reshape(-1)].reshape(600, 4), merged)
    merged, found = dedup_table(table, 4, 20, 0.0, seed=3)
    assert found.unique == 20  # the 20 clusters: near blocks merge, far ones do not
    assert float(np.abs(merged - table).max()) < 1e-3
    same, found = dedup_table(table, 4, 600, 0.0, seed=3)  # room for every block: nothing merges
    assert found.unique == 600 and np.array_equal(same, table)
    floor, found = dedup_table(table, 4, 600, 0.01, seed=3)  # the threshold merges near ones all the same
    assert found.unique <= 20 + 1 and float(np.abs(floor - table).max()) < 1e-3
    halves, found = dedup_table(table, 2, 40, 0.0, seed=3)  # blocks of 2: slots merge across rows and columns
    assert group_blocks(halves, 2)[1].shape[0] == found.unique <= 40


# ---------------------------------------------------------------- twins and the stored form


TWIN_CASES: list[dict[str, Any]] = [
    {"budget": 0.2},
    {"budget": 0.3, "params": {"block": 4}},
    {"params": {"unique_share": 0.05, "block": 2}},
]
TWIN_IDS = ["rows", "block-4", "share-block-2"]


@pytest.mark.parametrize("multihot", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("kwargs", TWIN_CASES, ids=TWIN_IDS)
def test_numpy_twins_equal_the_torch_layer(kwargs: dict[str, Any], multihot: bool) -> None:
    check_twins("dedup", multihot, **kwargs)


def test_trained_layer_stores_at_most_its_bytes_also_between_deduplications() -> None:
    fm = feature_map(True)
    layer = layer_of(fm, params={"dedup_every": 2, "block": 4})
    for seed in range(3):  # deduplicated at update 2, trained past it at update 3
        step(layer, fm, seed)
    assert int(layer.deduped_at) == 2 and not layer.current
    state = {k: v.numpy().copy() for k, v in layer.state_dict().items()}
    stored = stored_dedup(layer.plan, state)  # deduplicated as eval() will
    assert set(stored) == {"unique", "index"} and stored["index"].dtype == np.uint16
    assert stored["index"].shape == (layer.total_rows, 2) and stored["unique"].shape[0] <= layer.layout.unique
    assert sum(a.nbytes for a in stored.values()) <= layer.parameter_bytes()
    layer.eval()
    assert layer.current and int(layer.unique_blocks) == distinct_blocks(layer.weight, 4) <= layer.layout.unique
    for f in layer.features:
        ids = torch.arange(layer.full_rows[f])
        with torch.no_grad():
            want = layer.served_rows(ids + layer.offsets[f], [(layer.features.index(f), 0, len(ids))])
        np.testing.assert_array_equal(dedup_rows(layer.plan, stored, f, ids.numpy()), want.numpy(), err_msg=f)
    again = stored_dedup(layer.plan, {k: v.numpy() for k, v in layer.state_dict().items()})  # current: a grouping
    for name in stored:
        np.testing.assert_array_equal(again[name], stored[name], err_msg=name)
    check_twins("dedup", True, layer=layer)


# ---------------------------------------------------------------- training


def test_gradients_reach_the_rows_and_the_table_is_deduplicated_on_schedule() -> None:
    fm = feature_map(True)
    layer = layer_of(fm, params={"dedup_every": 3, "optimizer": "sgd"})
    assert int(layer.deduped_at) == -1 and layer.stats().merged == 0
    kjt = as_kjt(random_ids(fm, 64, seed=3))
    before = layer.weight.clone()
    layer.train()
    out = layer(kjt)
    (out.values() * torch.randn_like(out.values())).sum().backward()
    touched = torch.unique(torch.cat([kjt[f].values() + layer.offsets[f] for f in layer.features]))
    moved = (layer.weight != before).any(1)
    assert bool(moved[touched].all()) and not bool(moved[~torch.isin(torch.arange(layer.total_rows), touched)].any())
    assert int(layer.updates) == 1 and distinct_blocks(layer.weight, 8) == layer.total_rows
    for seed in (4, 5):
        step(layer, fm, seed)
    assert int(layer.deduped_at) == 3 and layer.current  # the third update deduplicated the table in place
    stats = layer.stats()
    assert distinct_blocks(layer.weight, 8) == stats.unique <= layer.layout.unique and stats.merged > 0
    deduped = layer.weight.clone()
    step(layer, fm, 6)  # training goes on from the merged table
    assert not layer.current and distinct_blocks(layer.weight, 8) > stats.unique
    layer.eval()  # evaluation serves the deduplicated table
    assert layer.current and distinct_blocks(layer.weight, 8) <= layer.layout.unique
    with torch.no_grad():
        out = layer(kjt).to_dict()
    f = "big"
    torch.testing.assert_close(out[f], layer.weight[layer.offsets[f] + kjt[f].values()], rtol=0, atol=0)
    assert not torch.equal(layer.weight, deduped)


def test_row_update_follows_the_scheduled_rate_and_refuses_weight_decay() -> None:
    """``train.lr_schedule`` sets the table's rate (``self_updating_rates``); its own update has no weight decay."""
    from recemb.embeddings.sharding import check_weight_decay
    from recemb.train.schedule import self_updating_rates

    fm = feature_map(True)
    layer = layer_of(fm, params={"optimizer": "sgd", "dedup_every": 0})
    (rate,) = self_updating_rates(layer)
    moves = []
    for value in (0.0, 0.05, 0.1):
        rate.set(value)
        before = layer.weight.clone()
        step(layer, fm, 4)
        moves.append((layer.weight - before).abs().sum().item())
    assert moves[0] == 0 and moves[1] > 0 and moves[2] == pytest.approx(2 * moves[1], rel=0.05)
    with pytest.raises(ConfigError, match="dedup tables update themselves"):
        check_weight_decay(EmbeddingConfig(kind="dedup", budget=0.1, weight_decay=1e-4), torch.device("cpu"))


def test_meta_build_materialises_deterministically() -> None:
    fm = feature_map(False)
    cpu = layer_of(fm)
    meta = layer_of(fm, device=torch.device("meta"))
    meta.to_empty(device=torch.device("cpu"))
    meta.reset_buffers()
    for name, value in cpu.state_dict().items():
        assert torch.equal(meta.state_dict()[name], value), name


# ---------------------------------------------------------------- two ranks


DIM = 8
STEPS = 4
LOCAL = 16
LR = 0.5


def _config() -> EmbeddingConfig:
    return EmbeddingConfig(kind="dedup", dim=DIM, seed=3, budget=0.2, lr=LR,
                           params={"optimizer": "sgd", "dedup_every": 2, "block": 4})


def _model(device: torch.device | None = None) -> nn.Module:
    fm = feature_map(True)
    torch.manual_seed(0)
    return TinyHead(build_embedding_layer(fm, _config(), device=device), len(fm.sparse_features), DIM)


def _run(model: nn.Module, batches: list[LabelledBatch]) -> list[np.ndarray]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    return train_logits(model, batches, [opt])


def _layer(model: nn.Module) -> DedupLayer:
    return next(m for m in model.modules() if isinstance(m, DedupLayer))


def _two_rank_steps(rank: int, world_size: int) -> dict[str, Any]:
    from recemb.embeddings.sharding import load_full_state, shard_model

    torch.set_num_threads(1)
    state = {k: v.clone() for k, v in _model().state_dict().items()}
    dmp = shard_model(_model(torch.device("meta")), _config(), torch.device("cpu")).model
    load_full_state(dmp, state)
    logits = _run(dmp, [rank_batches(s, world_size, LOCAL)[rank] for s in range(STEPS)])
    layer = _layer(dmp)
    trained = layer.weight.numpy().copy()
    dmp.eval()
    return {"logits": logits, "trained": trained, "served": layer.weight.numpy().copy(),
            "updates": int(layer.updates), "unique": int(layer.unique_blocks)}


@pytest.mark.usefixtures("no_process_group")
def test_two_ranks_train_like_one_process_on_the_global_batch() -> None:
    ranks = run_ranks(_two_rank_steps, 2)
    a, b = ranks
    for name in ("trained", "served"):  # data parallel: every rank holds the same table
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert a["updates"] == STEPS and a["unique"] == b["unique"]
    reference = _model()
    expected = _run(reference, [concat_batches(rank_batches(s, 2, LOCAL)) for s in range(STEPS)])
    for s in range(STEPS):
        got = np.concatenate([ranks[0]["logits"][s], ranks[1]["logits"][s]])
        np.testing.assert_allclose(got, expected[s], rtol=1e-4, atol=1e-5, err_msg=f"step {s}")
    layer = _layer(reference)
    np.testing.assert_allclose(a["trained"], layer.weight.numpy(), rtol=1e-4, atol=1e-6)
    reference.eval()
    np.testing.assert_allclose(a["served"], layer.weight.numpy(), rtol=1e-4, atol=1e-6)
    assert a["unique"] == int(layer.unique_blocks) <= layer.layout.unique


# ---------------------------------------------------------------- end to end


@pytest.mark.usefixtures("no_process_group")
def test_dcnv2_trains_and_its_bundle_serves_it(make_experiment: Any, tmp_path: Path) -> None:
    """DCNv2 at 1/10 of the bytes (dim 16): it learns, blocks merged, and its fp32 bundle (unique blocks
    and index, at most the achieved bytes) gives the trained model's embeddings and scores."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recemb.data.batch import arrow_to_batch
    from recemb.export import export_bundle
    from recemb.export.format import MANIFEST
    from recemb.models.registry import embedding_layers
    from recemb.serving.bundle import Bundle
    from recemb.train.loop import train
    from recemb.train.restore import load_trained_model, resolve_checkpoint

    cfg = make_experiment("dcnv2", "embedding.kind=dedup", "embedding.budget=0.1", "embedding.params={dedup_every: 5}",
                          "embedding.dim=16", "expid=dcnv2_dedup", "train.epochs=1")
    with in_process_run():
        result = train(cfg)
    assert result.test["auc"] > 0.6, result.test
    # 3,657 rows: uint8 indices and their 256 unique rows (85.6% of the budget) beat uint16's 251 (99.9%).
    assert 0.85 * result.full_bytes <= 10 * result.embedding_bytes <= result.full_bytes
    bundle_dir = export_bundle(result.output_dir, tmp_path / "bundle", record=False)
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    assert manifest["bytes"]["tables_payload"] == 0
    assert manifest["bytes"]["layers_payload"] <= result.embedding_bytes
    bundle = Bundle.open(bundle_dir)
    model, _ = load_trained_model(resolve_checkpoint(result.output_dir))
    layer = _layer(model)
    assert layer.current and 0 < layer.stats().unique <= layer.layout.unique < layer.stats().blocks
    fm = FeatureMap.load(cfg.data_dir)
    table = pa.concat_tables([pq.read_table(Path(cfg.data_dir) / s) for s in fm.shards["test"]])
    batch = arrow_to_batch(table, fm)
    with torch.no_grad():
        for name, emb in embedding_layers(model).items():
            want = emb(batch.sparse).to_dict()
            for f in emb.features:
                got = bundle.lookup_ids(f, table.column(f).to_numpy(), layer=name)
                np.testing.assert_array_equal(got, want[f].numpy(), err_msg=f"{name} {f}")
        logits = model(batch).numpy()
    probs = bundle.score_prepared(table)
    assert float(np.abs(probs - torch.sigmoid(torch.from_numpy(logits)).numpy()).max()) <= 1e-6


@pytest.mark.usefixtures("no_process_group")
def test_resumed_across_a_deduplication_equals_one_run(make_experiment: Any, tmp_path: Path) -> None:
    """Stopped between deduplications and resumed, a run merges the same blocks at the same updates: the
    schedule is in the layer's state (its update count and ``deduped_at``), not in the process."""
    from recemb.train.loop import train
    from recemb.train.restore import load_trained_model

    over = ["embedding.kind=dedup", "embedding.budget=0.1", "embedding.dim=16", "expid=dedup_resume",
            "embedding.params={dedup_every: 4}", "train.epochs=1"]
    with in_process_run():
        whole = train(make_experiment("dcnv2", *over, output_dir=tmp_path / "whole"))
    cfg = make_experiment("dcnv2", *over, output_dir=tmp_path / "parts")
    with in_process_run():
        first = train(cfg, stop_after_steps=6)  # deduplicated at 4, trained past it
    with in_process_run():
        parts = train(cfg, resume=first.output_dir)
    assert parts.steps == whole.steps > 6
    for key in ("auc", "logloss"):
        assert abs(parts.test[key] - whole.test[key]) < 1e-6, (key, parts.test, whole.test)
    layers = [_layer(load_trained_model(Path(r.output_dir) / "checkpoints" / "last")[0]) for r in (whole, parts)]
    for name, value in layers[0].state_dict().items():
        torch.testing.assert_close(layers[1].state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
