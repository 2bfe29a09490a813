"""Tests for the ``autosrh`` variant (``recemb.embeddings.autosrh``, twin ``recemb.serving.variants.autosrh``).

Frequency groups and the budget-filling dim selection, the budget on the 26-feature benchmark
vocabulary (met within 5%, never over, for both scopes and groupings; too small refused), the
gradients into rows and into the selection weights (their L1 term included), the phase switch
(dims fixed, alpha folded in or rows rewound, masked dims stay zero), the numpy twins (both
scopes, single- and multi-hot, after training in both phases; the stored bytes), weight decay
refused (the rows update themselves), the meta build, two gloo ranks against one process on the
global batch, and DCNv2 trained end to end and exported.
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
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from twin_utils import as_kjt, check_twins, feature_map, random_ids

from recemb.config.experiment import EmbeddingConfig
from recemb.data.schema import FeatureInfo, FeatureMap
from recemb.embeddings.autosrh import DimSelectedLayer, group_rows_of, group_sizes, select_dims
from recemb.embeddings.budget import BudgetError
from recemb.embeddings.registry import VariantSpec, build_embedding_layer
from recemb.errors import ConfigError
from recemb.serving.variants.autosrh import stored_autosrh

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH_VOCAB = [11, 252, 6302, 25196, 26, 632, 13870, 24188, 64, 1586, 21569, 25189, 159, 3982, 24791, 17, 399,
               9764, 25500, 41, 1001, 18212, 24400, 101, 2513, 23371]
MODULES = ["recemb.embeddings.autosrh", "recemb.serving.variants.autosrh"]


def bench_map() -> FeatureMap:
    feats = [FeatureInfo(name=f"C{i + 1}", kind="sparse", source=f"C{i + 1}", num_embeddings=v)
             for i, v in enumerate(BENCH_VOCAB)]
    return FeatureMap(dataset_id="bench", label="label", features=feats)


def layer_of(fm: FeatureMap | None = None, device: torch.device | None = None, **kwargs: Any) -> DimSelectedLayer:
    cfg = EmbeddingConfig(kind="autosrh", dim=kwargs.pop("dim", 8),
                          **{"budget": 0.3, "lr": 0.05, "seed": 1, **kwargs})
    layer = build_embedding_layer(fm or feature_map(True), cfg, device=device)
    assert isinstance(layer, DimSelectedLayer)
    return layer


def step(layer: DimSelectedLayer, fm: FeatureMap, seed: int, opt: torch.optim.Optimizer | None = None,
         scale: float = 1.0) -> None:
    """One training step on random ids with a random upstream gradient (times ``scale``) and the L1 term."""
    layer.train()
    out = layer(as_kjt(random_ids(fm, 32, seed=seed)))
    upstream = torch.randn(out.values().shape, generator=torch.Generator().manual_seed(seed)) * scale
    if opt is not None:
        opt.zero_grad()
    ((out.values() * upstream).sum() + layer.regularization()).backward()
    if opt is not None:
        opt.step()


def random_alpha(layer: DimSelectedLayer, seed: int) -> None:
    with torch.no_grad():
        layer.alpha.copy_(torch.rand(layer.alpha.shape, generator=torch.Generator().manual_seed(seed)) + 0.5)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


# ---------------------------------------------------------------- groups, selection, budget


def test_frequency_groups_are_id_ranges_of_count_numbered_ids(prepared_ctr: Path) -> None:
    for rows in (1, 5, 11, 1000, 25_196):
        for grouping in ("geometric", "equal"):
            sizes = group_sizes(rows, 6, grouping)
            assert len(sizes) == 6 and sum(sizes) == rows and min(sizes) >= 0, (rows, grouping, sizes)
    geometric = group_sizes(25_196, 6, "geometric")
    assert geometric == sorted(geometric) and geometric[0] < 10  # a few hot ids, ever larger rare groups
    assert max(group_sizes(25_196, 6, "equal")) - min(group_sizes(25_196, 6, "equal")) <= 1
    fm = FeatureMap.load(prepared_ctr)
    spec = VariantSpec(features=[fm.feature(f) for f in fm.sparse_features], dim=8, budget=0.1, params=None,
                       feature_map=fm)
    assert group_rows_of(spec, 6, "geometric") == {f: group_sizes(n, 6, "geometric") for f, n in spec.vocab.items()}

    class Unsorted:
        def id_counts(self, _: str) -> np.ndarray:
            return np.array([0, 5, 9, 1])

    spec = VariantSpec(features=[FeatureInfo(name="x", kind="sparse", source="x", num_embeddings=4)], dim=8,
                       budget=0.5, params=None, feature_map=Unsorted())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not numbered by training count"):
        group_rows_of(spec, 2, "equal")


def test_selection_takes_the_largest_alphas_that_fit_and_fills_the_rest() -> None:
    score = torch.tensor([[0.9, 0.2, 0.9], [0.5, 0.8, 0.1]])
    cost = torch.tensor([100, 10])  # bytes of one dim of each row
    # 0.9 (100), 0.9 (100) -> 200; 0.8 (10) -> 210; 0.5 (10) -> 220; 0.2 (100) does not fit; 0.1 (10) -> 230
    assert select_dims(score, cost, 230, 0.0).tolist() == [[True, False, True], [True, True, True]]
    assert select_dims(score, cost, 150, 0.0).tolist() == [[True, False, False], [True, True, True]]  # tie: lowest
    assert select_dims(score, cost, 10_000, 0.3).tolist() == [[True, False, True], [True, True, False]]  # threshold
    assert not select_dims(score, cost, 5, 0.0).any()


@pytest.mark.parametrize(("scope", "grouping"), [("field_group", "geometric"), ("group", "equal")])
def test_budget_is_met_within_5_percent(scope: str, grouping: str) -> None:
    layer = layer_of(bench_map(), dim=16, budget=0.1, params={"scope": scope, "grouping": grouping})
    target = int(0.1 * layer.full_bytes())
    assert layer.parameter_bytes() == target  # the most a bundle holds: the budget
    assert layer.plan.capabilities.budget["solver"] == "autosrh_dims"
    assert layer.index_bytes == 26 * 6 * 2  # 16 dims: 2 bytes of mask per feature and group
    for seed in range(3):
        random_alpha(layer, seed)
        layer._refresh_kept()
        assert 0.95 * target <= layer.stored_bytes() <= target, (seed, layer.stored_bytes(), target)
    layer.eval()
    state = {k: v.numpy() for k, v in layer.state_dict().items()}
    stored = stored_autosrh(layer.plan, state)
    assert sum(a.nbytes for a in stored.values()) == layer.stored_bytes()
    dims = layer.kept_dims()
    assert set(dims) == set(layer.features) and all(len(v) == 6 and max(v) <= 16 for v in dims.values())
    with pytest.raises(BudgetError, match="dim masks"):
        layer_of(bench_map(), dim=16, budget=300, device=torch.device("meta"))
    with pytest.raises(ConfigError, match="needs embedding.budget"):
        layer_of(bench_map(), dim=16, budget=None, device=torch.device("meta"))
    with pytest.raises(ConfigError, match="scope"):
        layer_of(bench_map(), dim=16, params={"scope": "dimension"}, device=torch.device("meta"))


def test_weight_decay_is_refused_as_for_the_other_row_tables() -> None:
    from recemb.embeddings.sharding import check_weight_decay

    with pytest.raises(ConfigError, match="autosrh tables update themselves"):
        check_weight_decay(EmbeddingConfig(kind="autosrh", budget=0.1, weight_decay=1e-5))


# ---------------------------------------------------------------- gradients and phases


def _reference_step(layer: DimSelectedLayer, kjt: KeyedJaggedTensor, upstream: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of rows and alpha by plain autograd: each id's row times its slot's alpha, summed per bag."""
    weight = layer.weight.detach().clone().requires_grad_(True)
    alpha = layer.alpha.detach().clone().requires_grad_(True)
    rows = layer.stacked_rows(kjt)
    slots = layer.slot_of(rows)
    a = alpha.index_select(0, slots if layer.scope == "field_group" else slots % layer.groups)
    per_id = weight.index_select(0, rows) * a
    bags = torch.repeat_interleave(torch.arange(kjt.lengths().numel()), kjt.lengths().to(torch.int64))
    pooled = torch.zeros(kjt.lengths().numel(), layer.dim).index_add(0, bags, per_id)
    batch = kjt.stride()
    out = pooled.view(len(kjt.keys()), batch, layer.dim).transpose(0, 1).reshape(batch, -1)
    ((out * upstream).sum() + layer.l1 * alpha.abs().sum()).backward()
    assert weight.grad is not None and alpha.grad is not None
    return weight.grad, alpha.grad


@pytest.mark.parametrize("scope", ["field_group", "group"])
def test_gradients_reach_rows_and_selection_weights(scope: str) -> None:
    fm = feature_map(True)
    layer = layer_of(fm, params={"scope": scope, "optimizer": "sgd", "l1": 0.01, "search_steps": 5})
    random_alpha(layer, 0)
    kjt = as_kjt(random_ids(fm, 32, seed=3))
    layer.train()
    out = layer(kjt).values()
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    want_rows, want_alpha = _reference_step(layer, kjt, upstream)
    before = layer.weight.clone()
    ((out * upstream).sum() + layer.regularization()).backward()
    assert layer.alpha.grad is not None
    torch.testing.assert_close(layer.alpha.grad, want_alpha, rtol=1e-5, atol=1e-6)
    assert float((layer.alpha.grad - 0.01 * torch.sign(layer.alpha.detach())).abs().sum()) > 0  # data, not only L1
    torch.testing.assert_close(layer.weight, before - 0.05 * want_rows, rtol=1e-5, atol=1e-7)  # SGD, lr 0.05


@pytest.mark.parametrize("rewind", [False, True])
def test_dims_are_fixed_then_alpha_folded_or_rows_rewound(rewind: bool) -> None:
    fm = feature_map(True)
    layer = layer_of(fm, params={"search_steps": 3, "mask_every": 1, "alpha_lr": 0.05, "rewind": rewind})
    assert layer.optimizer_groups()[0]["lr"] == 0.05
    opt = torch.optim.Adam([layer.alpha], lr=0.05)
    step(layer, fm, 0, opt)
    step(layer, fm, 1, opt)
    assert not layer.retraining and float(layer.regularization().detach()) > 0
    before, alpha = layer.weight.clone(), layer.alpha.detach().clone()
    step(layer, fm, 2, opt, scale=0.0)  # no row moves: the fold reads the rows as they were
    assert layer.retraining and float(layer.regularization()) == 0
    kept = layer.kept.clone()
    chosen = select_dims(alpha.abs(), layer._column_cost(), layer.value_cap, 0.0)
    assert torch.equal(kept, chosen)
    assert layer.stored_bytes() <= layer.parameter_bytes()
    slots = layer.slot_of(torch.arange(layer.total_rows))
    mask = kept[slots]
    if rewind:
        torch.testing.assert_close(layer.weight, layer.initial_rows() * mask, rtol=0, atol=0)
    else:
        torch.testing.assert_close(layer.weight, before * alpha[slots] * mask, rtol=0, atol=0)
    assert bool((layer.row_sq_grad == layer.update.initial_accumulator).all())  # a fresh row optimizer
    for seed in (3, 4):
        step(layer, fm, seed, opt)
    assert torch.equal(layer.kept, kept) and bool((layer.weight[~mask] == 0).all())
    assert not torch.equal(layer.weight, layer.initial_rows() * mask)
    layer.eval()
    kjt = as_kjt(random_ids(fm, 16, seed=9))
    with torch.no_grad():
        served = layer(kjt).values()
        layer.alpha.mul_(3.0)  # alpha no longer serves
        assert torch.equal(layer(kjt).values(), served)


# ---------------------------------------------------------------- twins


@pytest.mark.parametrize("multihot", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("scope", ["field_group", "group"])
def test_numpy_twins_equal_the_torch_layer(scope: str, multihot: bool) -> None:
    layer = check_twins("autosrh", multihot, budget=0.3, params={"scope": scope})
    assert isinstance(layer, DimSelectedLayer) and not layer.retraining


@pytest.mark.parametrize("scope", ["field_group", "group"])
def test_trained_layers_serve_from_their_stored_bytes(scope: str) -> None:
    fm = feature_map(True)
    layer = layer_of(fm, params={"scope": scope, "search_steps": 3, "mask_every": 1, "alpha_lr": 0.05})
    opt = torch.optim.Adam([layer.alpha], lr=0.05)
    for seed in range(5):
        step(layer, fm, seed, opt)
        if seed == 1:  # still searching: rows times alpha, masked
            check_twins("autosrh", True, layer=layer)
    assert layer.retraining
    check_twins("autosrh", True, layer=layer)
    stored = stored_autosrh(layer.plan, {k: v.numpy() for k, v in layer.state_dict().items()})
    assert set(stored) == {"kept", "values"} and stored["kept"].dtype == np.uint8
    assert sum(a.nbytes for a in stored.values()) == layer.stored_bytes() <= layer.parameter_bytes()


def test_meta_build_materialises_deterministically() -> None:
    fm = feature_map(False)
    cpu = layer_of(fm)
    meta = layer_of(fm, device=torch.device("meta"))
    meta.to_empty(device=torch.device("cpu"))
    meta.reset_parameters()
    meta.reset_buffers()
    for name, value in cpu.state_dict().items():
        assert torch.equal(meta.state_dict()[name], value), name
    assert torch.equal(meta.slot_starts, cpu.slot_starts)


# ---------------------------------------------------------------- two ranks


DIM = 8
STEPS = 4
LOCAL = 16
LR = 0.5
PARAMS = {"optimizer": "sgd", "search_steps": 2, "mask_every": 1, "alpha_lr": 0.05, "l1": 1e-3}


def _config() -> EmbeddingConfig:
    return EmbeddingConfig(kind="autosrh", dim=DIM, seed=3, budget=0.3, lr=LR, params=PARAMS)


def _model(device: torch.device | None = None) -> nn.Module:
    fm = feature_map(True)
    torch.manual_seed(0)
    return TinyHead(build_embedding_layer(fm, _config(), device=device), len(fm.sparse_features), DIM)


def _layer(model: nn.Module) -> DimSelectedLayer:
    return next(m for m in model.modules() if isinstance(m, DimSelectedLayer))


def _run(model: nn.Module, batches: list[LabelledBatch]) -> list[np.ndarray]:
    """SGD, Adam on the dimension weights alpha, and alpha's regularization in the loss."""
    layer = _layer(model)
    dense = [p for p in model.parameters() if p.requires_grad and p is not layer.alpha]
    opts = [torch.optim.SGD(dense, lr=LR), torch.optim.Adam([layer.alpha], lr=0.05)]
    return train_logits(model, batches, opts, extra_loss=layer.regularization)


def _two_rank_steps(rank: int, world_size: int) -> dict[str, Any]:
    from recemb.embeddings.sharding import load_full_state, shard_model

    torch.set_num_threads(1)
    state = {k: v.clone() for k, v in _model().state_dict().items()}
    dmp = shard_model(_model(torch.device("meta")), _config(), torch.device("cpu")).model
    load_full_state(dmp, state)
    logits = _run(dmp, [rank_batches(s, world_size, LOCAL)[rank] for s in range(STEPS)])
    layer = _layer(dmp)
    return {"logits": logits, "weight": layer.weight.numpy().copy(), "kept": layer.kept.numpy().copy(),
            "alpha": layer.alpha.detach().numpy().copy(), "updates": int(layer.updates)}


@pytest.mark.usefixtures("no_process_group")
def test_two_ranks_train_like_one_process_on_the_global_batch() -> None:
    a, b = run_ranks(_two_rank_steps, 2)
    for name in ("weight", "kept", "alpha"):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert a["updates"] == STEPS
    reference = _model()
    expected = _run(reference, [concat_batches(rank_batches(s, 2, LOCAL)) for s in range(STEPS)])
    for s in range(STEPS):
        got = np.concatenate([a["logits"][s], b["logits"][s]])
        np.testing.assert_allclose(got, expected[s], rtol=1e-4, atol=1e-5, err_msg=f"step {s}")
    layer = _layer(reference)
    assert layer.retraining
    np.testing.assert_allclose(a["weight"], layer.weight.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a["alpha"], layer.alpha.detach().numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(a["kept"], layer.kept.numpy())


# ---------------------------------------------------------------- end to end


@pytest.mark.usefixtures("no_process_group")
def test_dcnv2_trains_and_its_bundle_serves_it(make_experiment: Any, tmp_path: Path) -> None:
    """DCNv2 at 1/10 of the bytes: it learns, the searched dims fill the budget, and its bundle (dense
    blocks of each group's kept dims) gives the trained model's embeddings and scores."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recemb.data.batch import arrow_to_batch
    from recemb.export import export_bundle
    from recemb.export.format import MANIFEST
    from recemb.models.registry import embedding_layers
    from recemb.serving.bundle import Bundle
    from recemb.train.loop import train
    from recemb.train.restore import load_trained_model, resolve_checkpoint

    cfg = make_experiment("dcnv2", "embedding.kind=autosrh", "embedding.budget=0.1", "embedding.dim=16",
                          "embedding.params={search_steps: 10, alpha_lr: 0.05}", "expid=dcnv2_autosrh",
                          "train.epochs=1")
    with in_process_run():
        result = train(cfg)
    assert result.test["auc"] > 0.6, result.test
    assert 0.95 * result.full_bytes <= 10 * result.embedding_bytes <= result.full_bytes
    model, _ = load_trained_model(resolve_checkpoint(result.output_dir))
    layer = _layer(model)
    assert layer.retraining and result.steps > 10
    assert 0.95 * layer.parameter_bytes() <= layer.stored_bytes() <= layer.parameter_bytes()
    bundle_dir = export_bundle(result.output_dir, tmp_path / "bundle", record=False)
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    assert manifest["bytes"]["tables_payload"] == 0
    assert manifest["bytes"]["layers_payload"] == layer.stored_bytes()
    bundle = Bundle.open(bundle_dir)
    fm = FeatureMap.load(cfg.data_dir)
    table = pa.concat_tables([pq.read_table(Path(cfg.data_dir) / s) for s in fm.shards["test"]])
    batch = arrow_to_batch(table, fm)
    with torch.no_grad():
        for name, emb in embedding_layers(model).items():
            want = emb(batch.sparse).to_dict()
            for f in emb.features:
                got = bundle.lookup_ids(f, table.column(f).to_numpy(), layer=name)
                np.testing.assert_allclose(got, want[f].numpy(), rtol=1e-6, atol=1e-7, err_msg=f"{name} {f}")
        logits = model(batch).numpy()
    probs = bundle.score_prepared(table)
    assert float(np.abs(probs - torch.sigmoid(torch.from_numpy(logits)).numpy()).max()) <= 1e-6
