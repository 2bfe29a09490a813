"""Tests for the product-quantized variants ``dpq`` and ``mgqe`` (``recemb.embeddings.dpq``/``mgqe``).

The layout solver on the 26-feature benchmark vocabulary (budget met within 5%, MGQE's finer
codes at equal bytes, budgets no code can reach), the numpy twins (single- and multi-hot, vq and
softmax, 4- and 8-bit cold codes), the stored form (no query table, bytes equal to the layer's
achieved bytes, codes decoded back exactly), gradients into queries, codebooks and keys, codes
as nearest allowed centroids, hot ids from training counts, the meta-device build, two gloo
ranks against one process on the global batch, and DeepFM trained end to end and exported.
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
from recemb.embeddings.base import EmbeddingLayer, GroupedEmbeddingLayer
from recemb.embeddings.budget import BudgetError
from recemb.embeddings.dpq import ProductQuantizedLayer, coded_bytes, hot_rows_of, quantizers
from recemb.embeddings.registry import VariantSpec, build_embedding_layer
from recemb.errors import ConfigError
from recemb.serving.variants.dpq import code_rows, stored_codes

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH_VOCAB = [11, 252, 6302, 25196, 26, 632, 13870, 24188, 64, 1586, 21569, 25189, 159, 3982, 24791, 17, 399,
               9764, 25500, 41, 1001, 18212, 24400, 101, 2513, 23371]
MODULES = ["recemb.embeddings.rowwise", "recemb.embeddings.dpq", "recemb.embeddings.mgqe",
           "recemb.serving.variants.dpq", "recemb.serving.variants.mgqe"]


def bench_map() -> FeatureMap:
    feats = [FeatureInfo(name=f"C{i + 1}", kind="sparse", source=f"C{i + 1}", num_embeddings=v)
             for i, v in enumerate(BENCH_VOCAB)]
    return FeatureMap(dataset_id="bench", label="label", features=feats)


def coded(layer: EmbeddingLayer) -> ProductQuantizedLayer:
    """The product-quantized part of a layer (grouped with plain tables, or alone)."""
    found = quantizers(layer)
    assert len(found) == 1, type(layer).__name__
    return found[0]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


# ---------------------------------------------------------------- budgets


@pytest.mark.parametrize("kind", ["dpq", "mgqe"])
@pytest.mark.parametrize("budget", [0.1, 0.01])
def test_budget_is_met_within_5_percent(kind: str, budget: float) -> None:
    layer = build_embedding_layer(bench_map(), EmbeddingConfig(kind=kind, dim=16, budget=budget),
                                  device=torch.device("meta"))
    ratio = layer.parameter_bytes() / layer.full_bytes()
    assert 0.95 * budget <= ratio <= budget, ratio
    part = coded(layer)
    assert part.plan is not None and part.plan.capabilities.achieved_bytes == part.parameter_bytes()
    record = part.plan.capabilities.budget
    assert record["solver"] == "product_quantization" and record["target_bytes"] == int(budget * layer.full_bytes())
    assert set(record["subspaces"]) == set(part.features)  # the rest are plain tables
    assert all(16 % d == 0 for d in part.subspaces.values())


def test_budgets_no_code_reaches_are_refused() -> None:
    with pytest.raises(BudgetError, match="smallest product-quantized layout"):
        build_embedding_layer(bench_map(), EmbeddingConfig(kind="dpq", dim=16, budget=0.001),
                              device=torch.device("meta"))


def test_mgqe_affords_finer_codes_than_dpq_at_equal_bytes() -> None:
    layers = {kind: coded(build_embedding_layer(bench_map(), EmbeddingConfig(kind=kind, dim=16, budget=0.1),
                                                device=torch.device("meta"))) for kind in ("dpq", "mgqe")}
    dpq, mgqe = layers["dpq"], layers["mgqe"]
    assert (dpq.centroids, dpq.cold_centroids) == (256, 256)
    assert (mgqe.centroids, mgqe.cold_centroids) == (256, 16)  # rare ids: 4-bit codes
    for f in dpq.features:
        assert mgqe.subspaces[f] >= dpq.subspaces[f]
    assert sum(mgqe.subspaces.values()) > sum(dpq.subspaces.values())


def test_layout_without_a_budget_and_bad_params() -> None:
    layer = build_embedding_layer(feature_map(False), EmbeddingConfig(kind="dpq", dim=8))
    assert isinstance(layer, GroupedEmbeddingLayer) and set(layer.layers) == {"dpq", "dense"}
    part = coded(layer)
    assert part.features == ["mid", "big"]  # 7 rows: a 256-centroid codebook is not smaller than its table
    assert part.subspaces == {"mid": 2, "big": 2} and part.centroids == 256  # D = dim // 4 without a budget
    assert layer.layers["dense"].features == ["small"]
    assert part.parameter_bytes() == coded_bytes(5300, 5300, 8, 2, 256, 256) + 256 * 8 * 4 == 5300 * 2 + 2 * 256 * 8 * 4
    for params, match in [({"subspaces": 3}, "must divide"), ({"centroids": 300}, "centroids"),
                          ({"relaxation": "gumbel"}, "relaxation"), ({"optimizer": "adam"}, "optimizer")]:
        with pytest.raises(ConfigError, match=match):
            build_embedding_layer(feature_map(False), EmbeddingConfig(kind="dpq", dim=8, params=params))
    with pytest.raises(ConfigError, match="hot_share"):
        build_embedding_layer(feature_map(False), EmbeddingConfig(kind="mgqe", dim=8, params={"hot_share": 0}))


# ---------------------------------------------------------------- twins and the stored form


TWIN_CASES: list[tuple[str, dict[str, Any]]] = [
    ("dpq", {}),
    ("dpq", {"budget": 0.2}),
    ("dpq", {"budget": 0.3, "params": {"relaxation": "softmax"}}),
    ("mgqe", {"budget": 0.2}),
    ("mgqe", {"params": {"hot_share": 0.3, "cold_centroids": 64, "centroids": 128}}),
]
TWIN_IDS = ["dpq", "dpq-budget", "dpq-softmax", "mgqe-4bit-cold", "mgqe-8bit-cold"]


@pytest.mark.parametrize("multihot", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize(("kind", "kwargs"), TWIN_CASES, ids=TWIN_IDS)
def test_numpy_twins_equal_the_torch_layer(kind: str, kwargs: dict[str, Any], multihot: bool) -> None:
    check_twins(kind, multihot, **kwargs)


def train_steps(layer: EmbeddingLayer, fm: FeatureMap, steps: int = 3, lr: float = 0.05) -> None:
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr) if params else None
    layer.train()
    for step in range(steps):
        out = layer(as_kjt(random_ids(fm, 32, seed=10 + step)))
        loss = (out.values() * torch.randn_like(out.values())).sum()
        loss = loss + sum(m.regularization() for m in quantizers(layer))
        if opt is not None:
            opt.zero_grad()
        loss.backward()
        if opt is not None:
            opt.step()


@pytest.mark.parametrize(("kind", "kwargs"), TWIN_CASES[2:], ids=TWIN_IDS[2:])
def test_stored_form_round_trips_after_training(kind: str, kwargs: dict[str, Any]) -> None:
    fm = feature_map(True)
    layer = build_embedding_layer(fm, EmbeddingConfig(kind=kind, dim=8, lr=0.05, seed=2, **kwargs))
    train_steps(layer, fm)
    check_twins(kind, True, layer=layer)
    part = coded(layer)
    assert part.plan is not None
    state = {k: v.numpy() for k, v in part.state_dict().items()}
    stored = stored_codes(part.plan, state)
    assert "weight" not in stored and "keys" not in stored and "row_sq_grad" not in stored
    assert sum(a.nbytes for a in stored.values()) == part.parameter_bytes()
    assert stored["codes_hot"].dtype == np.uint8 and stored["codebook"].dtype == np.float32
    part.eval()
    for f in part.features:
        ids = torch.arange(part.full_rows[f])
        with torch.no_grad():
            want = part.served_rows(ids + part.offsets[f], [(part.features.index(f), 0, len(ids))])
        np.testing.assert_array_equal(code_rows(part.plan, stored, f, ids.numpy()), want.numpy(), err_msg=f)


# ---------------------------------------------------------------- training


def nearest_codes(part: ProductQuantizedLayer, rows: torch.Tensor) -> torch.Tensor:
    """Brute-force nearest allowed centroid of the first ``min D`` sub-vectors of ``rows``' queries."""
    width = min(part.subspaces.values())
    out = []
    for r in rows.tolist():
        i = int(torch.searchsorted(part.bounds, torch.tensor(r), right=True)) - 1
        book = part.book(i, keys=True).detach()
        d = book.shape[0]
        q = part.weight[r].view(d, 1, -1)
        dist = (q - book).pow(2).sum(-1)  # [D, K]
        if r >= int(part.hot_end[i]):
            dist[:, part.cold_centroids:] = torch.inf
        out.append(dist.argmin(-1)[:width])
    return torch.stack(out)


@pytest.mark.parametrize("relaxation", ["vq", "softmax"])
def test_gradients_reach_queries_codebooks_and_codes(relaxation: str) -> None:
    fm = feature_map(True)
    layer = build_embedding_layer(fm, EmbeddingConfig(kind="mgqe", dim=8, lr=0.05, seed=1, params={
        "relaxation": relaxation, "hot_share": 0.2, "cold_centroids": 4, "centroids": 32}))
    part = coded(layer)
    weight0 = part.weight.clone()
    kjt = as_kjt(random_ids(fm, 64, seed=3))
    layer.train()
    out = layer(kjt)
    reg = part.regularization()
    assert (float(reg.detach()) > 0) == (relaxation == "vq")
    ((out.values() * torch.randn_like(out.values())).sum() + reg).backward()
    assert part.codebook.grad is not None and bool((part.codebook.grad.abs().sum(1) > 0).all())
    if relaxation == "softmax":
        assert part.keys is not None and part.keys.grad is not None and float(part.keys.grad.abs().sum()) > 0
    touched = torch.unique(torch.cat([kjt[f].values() + part.offsets[f] for f in part.features]))
    moved = (part.weight != weight0).any(1)
    assert bool(moved[touched].all()) and not bool(moved[~torch.isin(torch.arange(part.total_rows), touched)].any())
    assert int(part.updates) == 1
    width = min(part.subspaces.values())
    agree = (part.codes[touched, :width].long() == nearest_codes(part, touched)[:, :width]).float().mean()
    assert float(agree) > 0.99  # the nearest centroid of each updated query (exact but for float near-ties)
    cold = torch.cat([torch.arange(part.offsets[f] + part.hot_rows[f], part.offsets[f] + part.full_rows[f])
                      for f in part.features])
    assert int(part.codes[cold].max()) < 4  # cold ids only ever take the first cold_centroids
    hot = torch.cat([torch.arange(part.offsets[f], part.offsets[f] + part.hot_rows[f]) for f in part.features])
    assert int(part.codes[hot].max()) >= 4


def test_hot_rows_follow_training_counts(prepared_ctr: Path) -> None:
    fm = FeatureMap.load(prepared_ctr)
    name = max(fm.sparse_features, key=lambda f: fm.feature(f).num_embeddings)
    spec = VariantSpec(features=[fm.feature(name)], dim=8, budget=None, params=None, feature_map=fm)
    n = fm.feature(name).num_embeddings
    assert hot_rows_of(spec, 0.1) == {name: int(np.ceil(0.1 * n))}
    assert hot_rows_of(spec, None) == {name: n}

    class Unsorted:
        def id_counts(self, _: str) -> np.ndarray:
            return np.array([0, 5, 9, 1])

    spec = VariantSpec(features=[FeatureInfo(name="x", kind="sparse", source="x", num_embeddings=4)], dim=8,
                       budget=None, params=None, feature_map=Unsorted())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not numbered by training count"):
        hot_rows_of(spec, 0.5)


def test_meta_build_materialises_deterministically() -> None:
    fm = feature_map(False)
    cfg = EmbeddingConfig(kind="mgqe", dim=8, seed=5, params={"relaxation": "softmax", "hot_share": 0.5})
    cpu = coded(build_embedding_layer(fm, cfg))
    meta = coded(build_embedding_layer(fm, cfg, device=torch.device("meta")))
    meta.to_empty(device=torch.device("cpu"))  # what DMP does: garbage, then the resets
    meta.reset_parameters()
    meta.reset_buffers()
    for name, value in cpu.state_dict().items():
        assert torch.equal(meta.state_dict()[name], value), name
    assert int((cpu.codes > 0).sum()) > 0  # codes are assigned at initialisation


# ---------------------------------------------------------------- two ranks


DIM = 8
STEPS = 3
LOCAL = 16
LR = 0.5


def _config(kind: str) -> EmbeddingConfig:
    """Plain SGD everywhere (row updates, fused tables, dense): two ranks then match one process exactly."""
    return EmbeddingConfig(kind=kind, dim=DIM, seed=3, optimizer="exact_sgd", lr=LR, sharding="row_wise",
                           params={"optimizer": "sgd", "centroids": 16})


def _model(kind: str, device: torch.device | None = None) -> nn.Module:
    fm = feature_map(True)
    torch.manual_seed(0)
    return TinyHead(build_embedding_layer(fm, _config(kind), device=device), len(fm.sparse_features), DIM)


def _run(model: nn.Module, batches: list[LabelledBatch]) -> list[np.ndarray]:
    """SGD on what the fused tables do not update in backward, with the quantizers' regularization."""
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    opt = torch.optim.SGD([p for _, p in in_backward_optimizer_filter(model.named_parameters())], lr=LR)
    return train_logits(model, batches, [opt],
                        extra_loss=lambda: sum(m.regularization() for m in quantizers(model)))


def _two_rank_steps(rank: int, world_size: int) -> dict[str, Any]:
    from recemb.embeddings.sharding import load_full_state, shard_model

    torch.set_num_threads(1)
    out = {}
    for kind in ("dpq", "mgqe"):
        state = {k: v.clone() for k, v in _model(kind).state_dict().items()}
        dmp = shard_model(_model(kind, torch.device("meta")), _config(kind), torch.device("cpu")).model
        load_full_state(dmp, state)
        logits = _run(dmp, [rank_batches(step, world_size, LOCAL)[rank] for step in range(STEPS)])
        part = coded(dmp)
        out[kind] = {"logits": logits, "codes": part.codes.numpy().copy(), "weight": part.weight.numpy().copy(),
                     "codebook": part.codebook.detach().numpy().copy()}
    return out


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, Any]]:
    return run_ranks(_two_rank_steps, 2)


@pytest.mark.usefixtures("no_process_group")
@pytest.mark.parametrize("kind", ["dpq", "mgqe"])
def test_two_ranks_train_like_one_process_on_the_global_batch(two_ranks: list[dict[str, Any]], kind: str) -> None:
    a, b = two_ranks[0][kind], two_ranks[1][kind]
    for name in ("codes", "weight", "codebook"):  # data parallel: every rank holds the same state
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    reference = _model(kind)
    expected = _run(reference, [concat_batches(rank_batches(step, 2, LOCAL)) for step in range(STEPS)])
    for step in range(STEPS):
        got = np.concatenate([two_ranks[0][kind]["logits"][step], two_ranks[1][kind]["logits"][step]])
        np.testing.assert_allclose(got, expected[step], rtol=1e-4, atol=1e-5, err_msg=f"{kind} step {step}")
    part = coded(reference)
    np.testing.assert_allclose(a["weight"], part.weight.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a["codebook"], part.codebook.detach().numpy(), rtol=1e-4, atol=1e-6)
    assert (a["codes"] == part.codes.numpy()).mean() > 0.99
    assert int(part.updates) == STEPS


# ---------------------------------------------------------------- end to end


@pytest.mark.usefixtures("no_process_group")
@pytest.mark.parametrize("kind", ["dpq", "mgqe"])
def test_deepfm_trains_and_its_bundle_serves_it(make_experiment: Any, kind: str, tmp_path: Path) -> None:
    """DeepFM (its first-order tables are ``kind`` too, 4 wide) at 1/10 of the bytes: it learns, and its
    fp32 bundle (codes and codebooks only) gives the trained model's embeddings and scores."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recemb.data.batch import arrow_to_batch
    from recemb.export import export_bundle
    from recemb.export.format import MANIFEST
    from recemb.models.registry import embedding_layers
    from recemb.serving.bundle import Bundle
    from recemb.train.loop import train
    from recemb.train.restore import load_trained_model, resolve_checkpoint

    cfg = make_experiment("deepfm", f"embedding.kind={kind}", "embedding.budget=0.1", f"expid=deepfm_{kind}",
                          "train.epochs=1")
    with in_process_run():
        result = train(cfg)
    assert result.test["auc"] > 0.6, result.test
    assert 0.9 * result.full_bytes <= 10 * result.embedding_bytes <= result.full_bytes
    bundle_dir = export_bundle(result.output_dir, tmp_path / "bundle", record=False)
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    payload = manifest["bytes"]["tables_payload"] + manifest["bytes"]["layers_payload"]
    assert payload == result.embedding_bytes  # the bundle holds exactly the achieved bytes
    bundle = Bundle.open(bundle_dir)
    model, _ = load_trained_model(resolve_checkpoint(result.output_dir))
    fm = FeatureMap.load(cfg.data_dir)
    table = pa.concat_tables([pq.read_table(Path(cfg.data_dir) / s) for s in fm.shards["test"]])
    batch = arrow_to_batch(table, fm)
    with torch.no_grad():
        for name, layer in embedding_layers(model).items():
            want = layer(batch.sparse).to_dict()
            for f in layer.features:
                got = bundle.lookup_ids(f, table.column(f).to_numpy(), layer=name)
                np.testing.assert_array_equal(got, want[f].numpy(), err_msg=f"{name} {f}")
        logits = model(batch).numpy()
    probs = bundle.score_prepared(table)
    assert float(np.abs(probs - torch.sigmoid(torch.from_numpy(logits)).numpy()).max()) <= 1e-6


@pytest.mark.parametrize("kind", ["dpq", "deeplight"])
def test_row_update_follows_the_scheduled_rate(kind: str) -> None:
    """``train.lr_schedule`` sets the row tables' rate (``self_updating_rates``), and the update uses it."""
    from recemb.embeddings.rowwise import RowTableLayer
    from recemb.train.schedule import self_updating_rates

    fm = feature_map(True)
    layer = build_embedding_layer(fm, EmbeddingConfig(kind=kind, dim=8, lr=0.05, budget=0.3,
                                                      params={"optimizer": "sgd"}))
    table = next(m for m in layer.modules() if isinstance(m, RowTableLayer))
    (rate,) = self_updating_rates(layer)
    assert rate.base == 0.05
    moves = []
    for value in (0.0, 0.05, 0.1):
        rate.set(value)
        before = table.weight.clone()
        kjt = as_kjt(random_ids(fm, 32, seed=4))
        layer.train()
        out = layer(kjt)
        torch.manual_seed(0)
        (out.values() * torch.randn_like(out.values())).sum().backward()
        moves.append((table.weight - before).abs().sum().item())
    assert moves[0] == 0 and moves[1] > 0 and moves[2] == pytest.approx(2 * moves[1], rel=0.05)
