"""Tests for the ``autodim`` variant (``recemb.embeddings.autodim``, twin ``recemb.serving.variants.autodim``).

The budget on the 26-feature benchmark vocabulary (met within 5%, never over, for any
architecture weights; too small refused), the numpy twins (single- and multi-hot, while
searching and retraining) and the stored form (bytes equal to the layer's), gradients into
the rows, the transforms and the architecture weights (checked against finite differences),
the bi-level alternation and the phase switch (widths fixed, rows rewound), the meta build,
two gloo ranks against one process on the global batch across the switch, and DCNv2 trained
end to end, exported and served, and resumed mid-search equal to one run.
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
from recemb.embeddings.autodim import AutoDimLayer, affordable, choose_widths, layout_bytes
from recemb.embeddings.budget import BudgetError
from recemb.embeddings.registry import build_embedding_layer
from recemb.errors import ConfigError
from recemb.serving.variants.autodim import stored_autodim

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH_VOCAB = [11, 252, 6302, 25196, 26, 632, 13870, 24188, 64, 1586, 21569, 25189, 159, 3982, 24791, 17, 399,
               9764, 25500, 41, 1001, 18212, 24400, 101, 2513, 23371]
MODULES = ["recemb.embeddings.autodim", "recemb.serving.variants.autodim"]


def bench_map() -> FeatureMap:
    feats = [FeatureInfo(name=f"C{i + 1}", kind="sparse", source=f"C{i + 1}", num_embeddings=v)
             for i, v in enumerate(BENCH_VOCAB)]
    return FeatureMap(dataset_id="bench", label="label", features=feats)


def layer_of(fm: FeatureMap, device: torch.device | None = None, **params: Any) -> AutoDimLayer:
    cfg = EmbeddingConfig(kind="autodim", dim=8, budget=0.3, lr=0.05, seed=1,
                          params={"search_steps": 4, "arch_lr": 0.1, **params})
    layer = build_embedding_layer(fm, cfg, device=device)
    assert isinstance(layer, AutoDimLayer)
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


# ---------------------------------------------------------------- budgets


@pytest.mark.parametrize("budget", [0.1, 0.2])
def test_budget_is_met_within_5_percent(budget: float) -> None:
    layer = build_embedding_layer(bench_map(), EmbeddingConfig(kind="autodim", dim=16, budget=budget),
                                  device=torch.device("meta"))
    assert isinstance(layer, AutoDimLayer)
    ratio = layer.parameter_bytes() / layer.full_bytes()
    assert 0.95 * budget <= ratio <= budget, ratio
    widths = layer.widths()
    assert layer.parameter_bytes() == layout_bytes(BENCH_VOCAB, 16, [widths[f] for f in layer.features])
    record = layer.plan.capabilities.budget
    assert record["solver"] == "autodim_widths" and record["initial_widths"] == widths
    assert record["target_bytes"] == int(budget * layer.full_bytes())
    # Without a preference, the small fields get the full width and the big ones are narrowed.
    assert widths["C1"] == 16 and widths["C4"] <= 2
    with pytest.raises(BudgetError, match="every field at width 1"):
        build_embedding_layer(bench_map(), EmbeddingConfig(kind="autodim", dim=16, budget=0.01),
                              device=torch.device("meta"))


@pytest.mark.parametrize("budget", [0.07, 0.1, 0.3])
def test_any_architecture_weights_meet_the_budget(budget: float) -> None:
    """The choice never exceeds the budget and fills it (within 1% here) whatever the search learned."""
    candidates = [1, 2, 4, 8, 16]
    target = int(budget * sum(BENCH_VOCAB) * 16 * 4)
    allowed = affordable(BENCH_VOCAB, 16, candidates, target)
    assert allowed[:, 0].all() and allowed[3, -1] == (budget > 0.2)  # 25k rows at width 16 take 1.6 MB
    rng = np.random.default_rng(0)
    for scale in (0.01, 1.0, 10.0):
        for _ in range(10):
            scores = np.where(allowed, scale * rng.standard_normal(allowed.shape), -np.inf)
            picked = choose_widths(scores, BENCH_VOCAB, 16, candidates, target)
            assert allowed[np.arange(len(picked)), picked].all()
            used = layout_bytes(BENCH_VOCAB, 16, [candidates[c] for c in picked])
            assert 0.99 * target <= used <= target, (scale, used / target)
    free = np.where(allowed, rng.standard_normal(allowed.shape), -np.inf)
    assert (choose_widths(free, BENCH_VOCAB, 16, candidates, None) == np.argmax(free, axis=1)).all()


def test_bad_params_are_refused() -> None:
    fm = feature_map(False)
    for params, match in [({"arch_every": 1}, "arch_every"), ({"candidates": [4, 2]}, "candidates"),
                          ({"candidates": [2, 16]}, "candidates"), ({"temperature": 0.0}, "temperature"),
                          ({"optimizer": "adam"}, "optimizer")]:
        with pytest.raises(ConfigError, match=match):
            build_embedding_layer(fm, EmbeddingConfig(kind="autodim", dim=8, budget=0.3, params=params))


def test_weight_decay_is_refused() -> None:
    """The rows update themselves (no torch or FBGEMM optimizer): a weight decay would be ignored."""
    from recemb.embeddings.sharding import check_weight_decay

    with pytest.raises(ConfigError, match="update themselves"):
        check_weight_decay(EmbeddingConfig(kind="autodim", budget=0.1, weight_decay=0.01))


# ---------------------------------------------------------------- twins and the stored form


@pytest.mark.parametrize("multihot", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("kwargs", [{"budget": 0.3}, {"budget": 0.5, "params": {"candidates": [2, 8]}}, {}],
                         ids=["budget", "two-candidates", "no-budget"])
def test_numpy_twins_equal_the_torch_layer(kwargs: dict[str, Any], multihot: bool) -> None:
    check_twins("autodim", multihot, **kwargs)


@pytest.mark.parametrize("rewind", [True, False])
def test_trained_layer_twins_and_stored_bytes_in_both_phases(rewind: bool) -> None:
    fm = feature_map(True)
    layer = layer_of(fm, rewind=rewind)
    opt = torch.optim.Adam([layer.proj], lr=0.05)
    for seed in range(6):
        step(layer, fm, seed, opt)
        if seed in (1, 5):  # searching, then retraining
            assert layer.retraining == (seed == 5)
            check_twins("autodim", True, layer=layer)
            state = {k: v.detach().numpy() for k, v in layer.state_dict().items()}
            stored = stored_autodim(layer.plan, state)
            assert set(stored) == {"widths", "rows", "projections"} and stored["widths"].dtype == np.int32
            assert sum(a.nbytes for a in stored.values()) == layer.parameter_bytes() <= layer.target


# ---------------------------------------------------------------- gradients and phases


def test_gradients_reach_rows_transforms_and_architecture_weights() -> None:
    """Batch 0 trains the rows (alpha still), batch 1 the architecture weights (rows still): their gradient
    is the loss's (finite differences), and Adam's first step moves each by ``arch_lr`` against its sign."""
    fm = feature_map(True)
    layer = layer_of(fm, search_steps=10, arch_every=2)
    kjt = as_kjt(random_ids(fm, 64, seed=3))
    noise = torch.randn(64, 8 * len(fm.sparse_features), generator=torch.Generator().manual_seed(0))

    def loss() -> torch.Tensor:
        return (layer(kjt).values() * noise).sum()

    layer.train()
    weight0, alpha0 = layer.weight.clone(), layer.alpha.clone()
    assert not layer.arch_batch()
    loss().backward()
    assert layer.proj.grad is not None and float(layer.proj.grad.abs().sum()) > 0
    touched = torch.unique(torch.cat([kjt[f].values() + layer.offsets[f] for f in layer.features]))
    moved = (layer.weight != weight0).any(1)
    assert bool(moved[touched].all()) and int(moved.sum()) == touched.numel()
    assert torch.equal(layer.alpha, alpha0) and (int(layer.updates), int(layer.arch_updates)) == (1, 0)

    assert layer.arch_batch()
    grads: list[torch.Tensor] = []
    update = layer.apply_arch_update
    layer.apply_arch_update = lambda g: (grads.append(g.clone()), update(g))[1]  # type: ignore[method-assign]
    weight1, alpha1 = layer.weight.clone(), layer.alpha.clone()
    layer.proj.grad = None
    loss().backward()
    assert torch.equal(layer.weight, weight1) and (int(layer.updates), int(layer.arch_updates)) == (1, 1)
    assert layer.proj.grad is not None and float(layer.proj.grad.abs().sum()) > 0
    grad = grads[0]
    allowed = layer.allowed
    assert bool((grad[allowed] != 0).all()) and bool((grad[~allowed] == 0).all())
    torch.testing.assert_close(layer.alpha - alpha1, -0.1 * torch.sign(grad), rtol=1e-4, atol=1e-6)
    eps = 1e-2
    with torch.no_grad():  # training mode without grad: the soft mixture, no update
        layer.alpha.copy_(alpha1)  # where the gradient was taken
        for f, c in [(0, 0), (1, 1), (2, 2), (3, 0)]:
            if not allowed[f, c]:
                continue
            layer.alpha[f, c] += eps
            up = float(loss())
            layer.alpha[f, c] -= 2 * eps
            down = float(loss())
            layer.alpha[f, c] += eps
            assert (up - down) / (2 * eps) == pytest.approx(float(grad[f, c]), rel=2e-2, abs=1e-4), (f, c)


def test_the_search_fixes_the_widths_and_rewinds_the_rows() -> None:
    fm = feature_map(True)
    layer = layer_of(fm, search_steps=5, arch_every=2, arch_lr=0.5)
    opt = torch.optim.Adam([layer.proj], lr=0.05)
    for seed in range(5):
        assert layer.arch_batch() == (seed % 2 == 1) and not layer.retraining
        step(layer, fm, seed, opt)
    assert layer.retraining and (int(layer.updates), int(layer.arch_updates)) == (3, 2)
    assert not torch.equal(layer.alpha, torch.zeros_like(layer.alpha))
    chosen = layer.chosen.clone()
    rows = torch.arange(layer.total_rows)
    kept = layer._kept_columns(rows)
    torch.testing.assert_close(layer.weight, layer.initial_rows() * kept, rtol=0, atol=0)  # rewound
    assert bool((layer.row_sq_grad == layer.update.initial_accumulator).all())
    assert layer.parameter_bytes() <= layer.target
    for seed in range(5, 8):
        assert not layer.arch_batch()
        step(layer, fm, seed, opt)
    assert torch.equal(layer.chosen, chosen) and int(layer.updates) == 6  # fixed; every batch trains the rows
    assert bool((layer.weight[kept == 0] == 0).all())  # columns beyond the chosen width take no gradient
    assert bool((layer.weight != layer.initial_rows() * kept).any())


def test_meta_build_materialises_deterministically() -> None:
    fm = feature_map(False)
    cpu = layer_of(fm)
    meta = layer_of(fm, device=torch.device("meta"))
    assert meta.parameter_bytes() == cpu.parameter_bytes()
    meta.to_empty(device=torch.device("cpu"))  # what DMP does: garbage, then the resets
    meta.reset_parameters()
    meta.reset_buffers()
    for name, value in cpu.state_dict().items():
        assert torch.equal(meta.state_dict()[name], value), name


# ---------------------------------------------------------------- two ranks


DIM = 8
STEPS = 6
LOCAL = 16
LR = 0.5
CONFIG = EmbeddingConfig(kind="autodim", dim=DIM, seed=3, budget=0.3, lr=LR,
                         params={"optimizer": "sgd", "search_steps": 4, "arch_every": 2, "arch_lr": 0.5})


def _model(device: torch.device | None = None) -> nn.Module:
    fm = feature_map(True)
    torch.manual_seed(0)
    return TinyHead(build_embedding_layer(fm, CONFIG, device=device), len(fm.sparse_features), DIM)


def _run(model: nn.Module, batches: list[LabelledBatch]) -> list[np.ndarray]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    return train_logits(model, batches, [opt])


def _layer(model: nn.Module) -> AutoDimLayer:
    return next(m for m in model.modules() if isinstance(m, AutoDimLayer))


def _two_rank_steps(rank: int, world_size: int) -> dict[str, Any]:
    from recemb.embeddings.sharding import load_full_state, shard_model

    torch.set_num_threads(1)
    state = {k: v.clone() for k, v in _model().state_dict().items()}
    dmp = shard_model(_model(torch.device("meta")), CONFIG, torch.device("cpu")).model
    load_full_state(dmp, state)
    logits = _run(dmp, [rank_batches(s, world_size, LOCAL)[rank] for s in range(STEPS)])
    layer = _layer(dmp)
    return {"logits": logits, **{k: v.detach().numpy().copy() for k, v in layer.state_dict().items()}}


@pytest.mark.usefixtures("no_process_group")
def test_two_ranks_train_like_one_process_on_the_global_batch() -> None:
    """Data parallel through the switch (4 search batches, 2 of them architecture updates, then 2 retraining)."""
    ranks = run_ranks(_two_rank_steps, 2)
    a, b = ranks
    for name in ("weight", "alpha", "chosen", "proj"):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    reference = _model()
    expected = _run(reference, [concat_batches(rank_batches(s, 2, LOCAL)) for s in range(STEPS)])
    for s in range(STEPS):
        got = np.concatenate([a["logits"][s], b["logits"][s]])
        np.testing.assert_allclose(got, expected[s], rtol=1e-4, atol=1e-5, err_msg=f"step {s}")
    layer = _layer(reference)
    assert layer.retraining and int(a["updates"]) == 4 and int(a["arch_updates"]) == 2
    np.testing.assert_array_equal(a["chosen"], layer.chosen.numpy())
    for name in ("weight", "alpha", "proj"):
        np.testing.assert_allclose(a[name], layer.state_dict()[name].detach().numpy(), rtol=1e-4, atol=1e-6,
                                   err_msg=name)


# ---------------------------------------------------------------- end to end


@pytest.mark.usefixtures("no_process_group")
def test_dcnv2_trains_resumes_and_its_bundle_serves_it(make_experiment: Any, tmp_path: Path) -> None:
    """DCNv2 at 1/10 of the bytes: it learns, the searched widths meet the budget, and its bundle (per-field
    tables and transforms) gives the trained model's embeddings and scores. Stopped while searching and
    resumed, the run fixes the same widths and retrains from the same rewound rows: the phase is in the
    layer's state (its update counts), not in the process."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recemb.data.batch import arrow_to_batch
    from recemb.export import export_bundle
    from recemb.export.format import MANIFEST
    from recemb.models.registry import embedding_layers
    from recemb.serving.bundle import Bundle
    from recemb.train.loop import train
    from recemb.train.restore import load_trained_model, resolve_checkpoint

    over = ["embedding.kind=autodim", "embedding.budget=0.1", "embedding.dim=16", "expid=dcnv2_autodim",
            "embedding.params={search_steps: 10, arch_every: 2, arch_lr: 0.05}", "train.epochs=1"]
    with in_process_run():
        result = train(make_experiment("dcnv2", *over, output_dir=tmp_path / "whole"))
    assert result.test["auc"] > 0.6, result.test
    assert 0.95 * result.full_bytes <= 10 * result.embedding_bytes <= result.full_bytes
    model, _ = load_trained_model(resolve_checkpoint(result.output_dir))
    layer = _layer(model)
    assert layer.retraining and 0.95 * layer.target <= layer.parameter_bytes() <= layer.target

    bundle_dir = export_bundle(result.output_dir, tmp_path / "bundle", record=False)
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    assert manifest["bytes"]["tables_payload"] == 0
    assert manifest["bytes"]["layers_payload"] == layer.parameter_bytes()
    bundle = Bundle.open(bundle_dir)
    cfg = make_experiment("dcnv2", *over, output_dir=tmp_path / "parts")
    fm = FeatureMap.load(cfg.data_dir)
    table = pa.concat_tables([pq.read_table(Path(cfg.data_dir) / s) for s in fm.shards["test"]])
    batch = arrow_to_batch(table, fm)
    with torch.no_grad():
        for name, emb in embedding_layers(model).items():
            want = emb(batch.sparse).to_dict()
            for f in emb.features:
                got = bundle.lookup_ids(f, table.column(f).to_numpy(), layer=name)
                np.testing.assert_allclose(got, want[f].numpy(), rtol=1e-5, atol=1e-6, err_msg=f"{name} {f}")
        logits = model(batch).numpy()
    probs = bundle.score_prepared(table)
    assert float(np.abs(probs - torch.sigmoid(torch.from_numpy(logits)).numpy()).max()) <= 1e-5

    with in_process_run():
        first = train(cfg, stop_after_steps=5)  # still searching, after an architecture batch
    with in_process_run():
        parts = train(cfg, resume=first.output_dir)
    assert parts.steps == result.steps > 10
    for key in ("auc", "logloss"):
        assert abs(parts.test[key] - result.test[key]) < 1e-6, (key, parts.test, result.test)
    resumed = _layer(load_trained_model(Path(parts.output_dir) / "checkpoints" / "last")[0])
    last = _layer(load_trained_model(Path(result.output_dir) / "checkpoints" / "last")[0])
    assert resumed.retraining and torch.equal(resumed.chosen, last.chosen)
    for name, value in last.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
