"""Tests for the sparse-row variants ``deeplight`` and ``pep`` (``recemb.embeddings.deeplight``/``pep``).

CSR bytes and the budget (met within 5%, too small refused), the CSR codec and the top-k rule
(torch and numpy bit for bit), the numpy twins (single- and multi-hot, every threshold scope,
after training in both PEP phases), DeepLight's damped schedule (pruned weights stay zero, the
served mask always at the target), PEP's thresholds, mask and lottery-ticket rewind, the meta
build, two gloo ranks against one process on the global batch, and DCNv2 trained end to end
and exported (bundle bytes equal the achieved bytes, lookups and scores equal the model's).
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
from recemb.embeddings.budget import BudgetError
from recemb.embeddings.deeplight import MagnitudePrunedLayer, SparseRowLayer, csr_bytes, sparsity_at
from recemb.embeddings.pep import SoftThresholdLayer
from recemb.embeddings.registry import build_embedding_layer
from recemb.embeddings.rowwise import top_k_mask
from recemb.errors import ConfigError
from recemb.serving.variants.deeplight import csr_encode, csr_rows, stored_csr, top_k_np
from recemb.serving.variants.pep import stored_pep

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH_VOCAB = [11, 252, 6302, 25196, 26, 632, 13870, 24188, 64, 1586, 21569, 25189, 159, 3982, 24791, 17, 399,
               9764, 25500, 41, 1001, 18212, 24400, 101, 2513, 23371]
MODULES = ["recemb.embeddings.deeplight", "recemb.embeddings.pep", "recemb.serving.variants.deeplight",
           "recemb.serving.variants.pep"]
KINDS = ["deeplight", "pep"]


def bench_map() -> FeatureMap:
    feats = [FeatureInfo(name=f"C{i + 1}", kind="sparse", source=f"C{i + 1}", num_embeddings=v)
             for i, v in enumerate(BENCH_VOCAB)]
    return FeatureMap(dataset_id="bench", label="label", features=feats)


def layer_of(kind: str, fm: FeatureMap | None = None, device: torch.device | None = None, **kwargs: Any) -> Any:
    cfg = EmbeddingConfig(kind=kind, dim=kwargs.pop("dim", 8), **{"budget": 0.2, "lr": 0.05, "seed": 1, **kwargs})
    layer = build_embedding_layer(fm or feature_map(True), cfg, device=device)
    assert isinstance(layer, SparseRowLayer)
    return layer


def step(layer: nn.Module, fm: FeatureMap, seed: int, opt: torch.optim.Optimizer | None = None) -> None:
    layer.train()
    out = layer(as_kjt(random_ids(fm, 32, seed=seed)))
    if opt is not None:
        opt.zero_grad()
    (out.values() * torch.randn(out.values().shape, generator=torch.Generator().manual_seed(seed))).sum().backward()
    if opt is not None:
        opt.step()


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


# ---------------------------------------------------------------- bytes and budgets


@pytest.mark.parametrize("kind", KINDS)
def test_budget_is_met_within_5_percent(kind: str) -> None:
    layer = build_embedding_layer(bench_map(), EmbeddingConfig(kind=kind, dim=16, budget=0.1),
                                  device=torch.device("meta"))
    ratio = layer.parameter_bytes() / layer.full_bytes()
    assert 0.095 <= ratio <= 0.1, ratio
    rows = sum(BENCH_VOCAB)
    assert layer.parameter_bytes() == (rows + 1) * 4 + layer.nnz * 5 == csr_bytes(rows, 16, layer.nnz)
    record = layer.plan.capabilities.budget
    assert record["solver"] == "csr_nnz" and record["nnz"] == layer.nnz
    assert record["sparsity"] == pytest.approx(0.97, abs=0.001)  # the row pointers take 1/16 of the full bytes
    with pytest.raises(BudgetError, match="row pointers"):
        build_embedding_layer(bench_map(), EmbeddingConfig(kind=kind, dim=16, budget=0.01),
                              device=torch.device("meta"))


@pytest.mark.parametrize("kind", KINDS)
def test_sparsity_without_a_budget(kind: str) -> None:
    fm = feature_map(False)
    layer = build_embedding_layer(fm, EmbeddingConfig(kind=kind, dim=8, params={"sparsity": 0.75}))
    total = sum(layer.full_rows.values()) * 8
    assert layer.nnz == total // 4 and int(layer.kept.sum()) <= layer.nnz
    with pytest.raises(ConfigError, match="not both"):
        build_embedding_layer(fm, EmbeddingConfig(kind=kind, dim=8, budget=0.2, params={"sparsity": 0.5}))
    with pytest.raises(ConfigError, match="needs embedding.budget"):
        build_embedding_layer(fm, EmbeddingConfig(kind=kind, dim=8))


def test_csr_dtypes_and_round_trip() -> None:
    rng = np.random.default_rng(0)
    for dim in (8, 300):
        dense = rng.standard_normal((50, dim)).astype(np.float32)
        kept = rng.random((50, dim)) < 0.1
        kept[3] = False  # an empty row
        csr = csr_encode(dense, kept, "int32", "uint8" if dim <= 256 else "uint16")
        assert csr["indices"].dtype == (np.uint8 if dim <= 256 else np.uint16)
        assert csr["values"].size == kept.sum() and csr["indptr"][-1] == kept.sum()
        rows = rng.integers(0, 50, 200)
        np.testing.assert_array_equal(csr_rows(csr, rows, dim), (dense * kept)[rows])
        assert sum(a.nbytes for a in csr.values()) == csr_bytes(50, dim, int(kept.sum()))


def test_top_k_is_the_same_in_torch_and_numpy_ties_included() -> None:
    rng = np.random.default_rng(1)
    score = np.round(rng.random(10_000), 2).astype(np.float32)  # many ties
    score[:3000] = 0.0
    for k in (0, 1, 500, 7000, 9999, 10_000, 20_000):
        want = top_k_np(score, k)
        got = top_k_mask(torch.from_numpy(score), k).numpy()
        np.testing.assert_array_equal(got, want, err_msg=str(k))
        assert want.sum() == min(max(k, 0), score.size)


# ---------------------------------------------------------------- twins


TWIN_CASES: list[tuple[str, dict[str, Any]]] = [
    ("deeplight", {"budget": 0.2}),
    ("deeplight", {"params": {"sparsity": 0.5}}),
    ("pep", {"budget": 0.2, "params": {"threshold": "global", "threshold_init": -7.0}}),
    ("pep", {"budget": 0.2, "params": {"threshold": "field", "threshold_init": -7.0}}),
    ("pep", {"budget": 0.2, "params": {"threshold": "dimension", "threshold_init": -7.0}}),
    ("pep", {"budget": 0.2, "params": {"threshold": "field_dimension", "threshold_init": -7.0}}),
]
TWIN_IDS = ["deeplight", "deeplight-sparsity", "pep-global", "pep-field", "pep-dimension", "pep-field-dimension"]


@pytest.mark.parametrize("multihot", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize(("kind", "kwargs"), TWIN_CASES, ids=TWIN_IDS)
def test_numpy_twins_equal_the_torch_layer(kind: str, kwargs: dict[str, Any], multihot: bool) -> None:
    check_twins(kind, multihot, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_trained_layers_store_exactly_their_bytes(kind: str) -> None:
    fm = feature_map(True)
    params = {"damping_steps": 1, "prune_every": 1} if kind == "deeplight" else {"search_steps": 3,
                                                                                  "threshold_init": -7.0}
    layer = layer_of(kind, fm, params=params)
    opt = torch.optim.Adam([p for p in layer.parameters()], lr=0.05) if kind == "pep" else None
    for seed in range(5):
        step(layer, fm, seed, opt)
        if seed == 1:  # pep: still searching
            check_twins(kind, True, layer=layer)
    check_twins(kind, True, layer=layer)
    state = {k: v.numpy() for k, v in layer.state_dict().items()}
    stored = (stored_csr if kind == "deeplight" else stored_pep)(layer.plan, state)
    assert set(stored) == {"indptr", "indices", "values"}
    payload = sum(a.nbytes for a in stored.values())
    if kind == "deeplight":  # exactly nnz values
        assert payload == layer.parameter_bytes()
    else:  # at most nnz: the thresholds may prune more than the budget asks
        assert payload <= layer.parameter_bytes() and stored["values"].size == int(layer.kept.sum())


# ---------------------------------------------------------------- DeepLight


def test_deeplight_prunes_on_the_damped_schedule() -> None:
    fm = feature_map(True)
    layer = layer_of("deeplight", fm, params={"damping": 0.5, "damping_steps": 1, "prune_every": 2})
    assert isinstance(layer, MagnitudePrunedLayer)
    total = layer.weight.numel()
    for seed in range(6):
        step(layer, fm, seed)
        t = int(layer.updates)
        expected = max(layer.nnz, total - round(sparsity_at(t - t % 2, layer.target, 0.5, 1) * total))
        assert int(layer.mask.sum()) == expected, t
        assert bool((layer.weight[~layer.mask] == 0).all())  # pruned weights are zeroed and take no gradient
    pruned = ~layer.mask.clone()
    step(layer, fm, 99)
    assert bool((layer.weight[pruned] == 0).all())
    layer.eval()  # the served mask: the target's nnz largest surviving weights
    assert int(layer.kept.sum()) == layer.nnz and not bool((layer.kept & ~layer.mask).any())
    smallest_kept = float(layer.weight.abs()[layer.kept].min())
    assert smallest_kept >= float((layer.weight.abs() * (layer.mask & ~layer.kept)).max())
    kjt = as_kjt(random_ids(fm, 16, seed=5))
    with torch.no_grad():
        out = layer(kjt).to_dict()
    f = "big"
    want = (layer.weight * layer.kept)[layer.offsets[f] + kjt[f].values()]
    torch.testing.assert_close(out[f], want, rtol=0, atol=0)


def test_sparsity_schedule() -> None:
    values = [sparsity_at(t, 0.9, 0.99, 100) for t in range(0, 30_000, 1000)]
    assert values[0] == 0 and all(b > a for a, b in zip(values, values[1:], strict=False))
    assert values[-1] < 0.9 and sparsity_at(23_000, 0.9, 0.99, 100) > 0.81


# ---------------------------------------------------------------- PEP


@pytest.mark.parametrize("rewind", [True, False])
def test_pep_thresholds_learn_then_the_mask_is_fixed_and_weights_rewound(rewind: bool) -> None:
    fm = feature_map(True)
    layer = layer_of("pep", fm, params={"search_steps": 3, "threshold_init": -7.0, "threshold_lr": 0.05,
                                        "rewind": rewind})
    assert isinstance(layer, SoftThresholdLayer)
    assert layer.thresholds.shape == (len(fm.sparse_features), 8)
    assert layer.optimizer_groups()[0]["lr"] == 0.05
    opt = torch.optim.Adam([layer.thresholds], lr=0.05)
    g = float(torch.sigmoid(torch.tensor(-7.0)))  # 9e-4, about the rows' init std (1e-3)
    under = layer.weight.abs() <= g
    assert bool(under.any()) and not bool(under.all())
    before = layer.weight.clone()
    step(layer, fm, 0, opt)
    assert layer.thresholds.grad is not None and float(layer.thresholds.grad.abs().sum()) > 0
    assert bool((layer.weight[under] == before[under]).all())  # under their threshold: no gradient
    assert not layer.retraining
    step(layer, fm, 1, opt)
    layer.eval()
    kjt = as_kjt(random_ids(fm, 16, seed=9))
    with torch.no_grad():
        served = layer(kjt).values()  # the searched model as it serves: soft-thresholded, masked
    step(layer, fm, 2, opt)
    assert layer.retraining and int(layer.updates) == 3
    kept = layer.kept.clone()
    assert int(kept.sum()) <= layer.nnz
    if rewind:
        torch.testing.assert_close(layer.weight, layer.initial_rows() * kept, rtol=0, atol=0)  # the lottery ticket
        assert bool((layer.row_sq_grad == layer.update.initial_accumulator).all())
    else:  # the searched weights, as they served, go on training
        assert bool((layer.weight[~kept] == 0).all()) and bool((layer.weight[kept] != 0).all())
        assert not torch.equal(layer.weight, layer.initial_rows() * kept)
        assert served.abs().sum() > 0
    for seed in (3, 4):
        step(layer, fm, seed, opt)
    assert torch.equal(layer.kept, kept)  # fixed while retraining
    assert bool((layer.weight[~kept] == 0).all()) and bool((layer.weight != layer.initial_rows() * kept).any())


@pytest.mark.parametrize("kind", KINDS)
def test_meta_build_materialises_deterministically(kind: str) -> None:
    fm = feature_map(False)
    cpu = layer_of(kind, fm)
    meta = layer_of(kind, fm, device=torch.device("meta"))
    meta.to_empty(device=torch.device("cpu"))
    for m in (meta,):
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
        m.reset_buffers()
    for name, value in cpu.state_dict().items():
        assert torch.equal(meta.state_dict()[name], value), name
    assert torch.equal(meta.kept, cpu.kept)


# ---------------------------------------------------------------- two ranks


DIM = 8
STEPS = 4
LOCAL = 16
LR = 0.5
PARAMS = {"deeplight": {"optimizer": "sgd", "damping": 0.5, "damping_steps": 1, "prune_every": 1},
          "pep": {"optimizer": "sgd", "search_steps": 2, "threshold_init": -7.0, "threshold_lr": 0.05,
                  "mask_every": 1}}


def _config(kind: str) -> EmbeddingConfig:
    return EmbeddingConfig(kind=kind, dim=DIM, seed=3, budget=0.2, lr=LR, params=PARAMS[kind])


def _model(kind: str, device: torch.device | None = None) -> nn.Module:
    fm = feature_map(True)
    torch.manual_seed(0)
    return TinyHead(build_embedding_layer(fm, _config(kind), device=device), len(fm.sparse_features), DIM)


def _run(model: nn.Module, batches: list[LabelledBatch]) -> list[np.ndarray]:
    """SGD, and Adam on PEP's thresholds."""
    aux = [p for m in model.modules() if isinstance(m, SoftThresholdLayer) for p in m.parameters()]
    dense = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in aux)]
    opts = [torch.optim.SGD(dense, lr=LR)] + ([torch.optim.Adam(aux, lr=0.05)] if aux else [])
    return train_logits(model, batches, opts)


def _layer(model: nn.Module) -> SparseRowLayer:
    return next(m for m in model.modules() if isinstance(m, SparseRowLayer))


def _two_rank_steps(rank: int, world_size: int) -> dict[str, Any]:
    from recemb.embeddings.sharding import load_full_state, shard_model

    torch.set_num_threads(1)
    out = {}
    for kind in KINDS:
        state = {k: v.clone() for k, v in _model(kind).state_dict().items()}
        dmp = shard_model(_model(kind, torch.device("meta")), _config(kind), torch.device("cpu")).model
        load_full_state(dmp, state)
        logits = _run(dmp, [rank_batches(s, world_size, LOCAL)[rank] for s in range(STEPS)])
        layer = _layer(dmp)
        dmp.eval()
        out[kind] = {"logits": logits, "weight": layer.weight.numpy().copy(), "kept": layer.kept.numpy().copy(),
                     "updates": int(layer.updates)}
    return out


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, Any]]:
    return run_ranks(_two_rank_steps, 2)


@pytest.mark.usefixtures("no_process_group")
@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_train_like_one_process_on_the_global_batch(two_ranks: list[dict[str, Any]], kind: str) -> None:
    a, b = two_ranks[0][kind], two_ranks[1][kind]
    for name in ("weight", "kept"):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert a["updates"] == STEPS
    reference = _model(kind)
    expected = _run(reference, [concat_batches(rank_batches(s, 2, LOCAL)) for s in range(STEPS)])
    for s in range(STEPS):
        got = np.concatenate([two_ranks[0][kind]["logits"][s], two_ranks[1][kind]["logits"][s]])
        np.testing.assert_allclose(got, expected[s], rtol=1e-4, atol=1e-5, err_msg=f"{kind} step {s}")
    reference.eval()
    layer = _layer(reference)
    np.testing.assert_allclose(a["weight"], layer.weight.numpy(), rtol=1e-4, atol=1e-6)
    assert (a["kept"] == layer.kept.numpy()).mean() > 0.999


# ---------------------------------------------------------------- end to end


@pytest.mark.usefixtures("no_process_group")
@pytest.mark.parametrize(("kind", "params"), [("deeplight", "{damping_steps: 2, prune_every: 2}"),
                                              ("pep", "{search_steps: 15, threshold_init: -8.0}")])
def test_dcnv2_trains_and_its_bundle_serves_it(make_experiment: Any, kind: str, params: str, tmp_path: Path) -> None:
    """DCNv2 at 1/10 of the bytes (dim 16: at dim 8 the row pointers alone take 1/8): it learns, and
    its fp32 bundle (CSR rows) gives the trained model's embeddings and scores."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recemb.data.batch import arrow_to_batch
    from recemb.export import export_bundle
    from recemb.export.format import MANIFEST
    from recemb.models.registry import embedding_layers
    from recemb.serving.bundle import Bundle
    from recemb.train.loop import train
    from recemb.train.restore import load_trained_model, resolve_checkpoint

    cfg = make_experiment("dcnv2", f"embedding.kind={kind}", "embedding.budget=0.1", f"embedding.params={params}",
                          "embedding.dim=16", f"expid=dcnv2_{kind}", "train.epochs=1")
    with in_process_run():
        result = train(cfg)
    assert result.test["auc"] > 0.6, result.test
    assert 0.95 * result.full_bytes <= 10 * result.embedding_bytes <= result.full_bytes
    bundle_dir = export_bundle(result.output_dir, tmp_path / "bundle", record=False)
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    assert manifest["bytes"]["tables_payload"] == 0
    if kind == "deeplight":
        assert manifest["bytes"]["layers_payload"] == result.embedding_bytes
    else:
        assert manifest["bytes"]["layers_payload"] <= result.embedding_bytes
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
                np.testing.assert_allclose(got, want[f].numpy(), rtol=1e-6, atol=1e-7, err_msg=f"{name} {f}")
        logits = model(batch).numpy()
    probs = bundle.score_prepared(table)
    assert float(np.abs(probs - torch.sigmoid(torch.from_numpy(logits)).numpy()).max()) <= 1e-6


@pytest.mark.usefixtures("no_process_group")
def test_pep_resumed_across_its_phase_switch_equals_one_run(make_experiment: Any, tmp_path: Path) -> None:
    """Stopped while searching and resumed, a run retrains on the same mask from the same rewound rows: the
    phase is in the layer's state (its update count), not in the process."""
    from recemb.train.loop import train
    from recemb.train.restore import load_trained_model

    over = ["embedding.kind=pep", "embedding.budget=0.1", "embedding.dim=16", "expid=pep_resume",
            "embedding.params={search_steps: 10, threshold_init: -8.0, mask_every: 1}", "train.epochs=1"]
    with in_process_run():
        whole = train(make_experiment("dcnv2", *over, output_dir=tmp_path / "whole"))
    cfg = make_experiment("dcnv2", *over, output_dir=tmp_path / "parts")
    with in_process_run():
        first = train(cfg, stop_after_steps=6)  # still searching
    with in_process_run():
        parts = train(cfg, resume=first.output_dir)
    assert parts.steps == whole.steps > 10
    for key in ("auc", "logloss"):
        assert abs(parts.test[key] - whole.test[key]) < 1e-6, (key, parts.test, whole.test)
    layers = [_layer(load_trained_model(Path(r.output_dir) / "checkpoints" / "last")[0]) for r in (whole, parts)]
    assert all(isinstance(layer, SoftThresholdLayer) and layer.retraining for layer in layers)
    for name, value in layers[0].state_dict().items():
        torch.testing.assert_close(layers[1].state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
