"""Any embedding width for the chunked and mixed-width variants (``unified``, ``robe``, ``mde``), for
the row-budget variants (``hashed``, ``qr``, ``hybrid``, ``tt``'s plain tables) and for OptEmbed's
search and its ``pruned`` tables, at ``embedding.dim=10``.

Each builds, returns 10 columns per feature and, held for FBGEMM (``pad_for_fbgemm``), pads only
the tables that need it: unified's 10-wide chunks and mde's full-width tables go 12 wide (padding
counted in the bytes and reported), ROBE's shared array stays 4 wide (its blocks cover 12 floats,
the last one cut to the dim). Budgets pay for the padding. The numpy twins of the plans give the
torch layer's vectors, padded or not, and a trained run's bundle gives the trained model's.
hashed, qr and hybrid hold every table ``dim`` wide, tt its plain tables: all are padded at dim 10
or 6, and their solvers pay for the padding too (the baseline stays at the real width). The
search (``dim_step: 5``) pads the supernet's and the compact tables, reads and saves the plan's
columns only, and counts the compact tables' bytes padded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import CONFIGS, SMALL_MODEL_PARAMS, SMALL_RUN
from dist_utils import in_process_run
from safetensors.torch import load_file
from test_export import load_test_split
from twin_utils import (
    VOCAB,
    as_kjt,
    check_lookup_without_torch,
    check_twins,
    feature_map,
    random_ids,
    weights,
)

from recemb.config.experiment import EmbeddingConfig, ExperimentConfig, load_experiment
from recemb.data.batch import arrow_to_batch
from recemb.embeddings.base import EmbeddingLayer, TableEmbeddingLayer, fbgemm_width, pad_for_fbgemm
from recemb.embeddings.budget import BudgetError, budget_bytes
from recemb.embeddings.pruned import FeaturePruning, PrunedLayer, PruningPlan, remap_from_mask, save_pruning
from recemb.embeddings.registry import build_embedding_layer
from recemb.errors import ConfigError
from recemb.export import export_bundle
from recemb.models.registry import embedding_layers
from recemb.serving.bundle import Bundle
from recemb.serving.lookup import lookup
from recemb.tracking import list_runs
from recemb.train.loop import train
from recemb.train.restore import load_trained_model, resolve_checkpoint

MakeExperiment = Callable[..., ExperimentConfig]  # the conftest fixture
KINDS = ["unified", "robe", "mde"]
DIM = 10


def layer_of(kind: str, multihot: bool = True, **kwargs: Any) -> TableEmbeddingLayer:
    torch.manual_seed(0)
    layer = build_embedding_layer(feature_map(multihot), EmbeddingConfig(kind=kind, dim=DIM, seed=3, **kwargs))
    assert isinstance(layer, TableEmbeddingLayer)
    return layer


def plan_wide(layer: TableEmbeddingLayer) -> dict[str, np.ndarray]:
    """The layer's tables cut to the plan's widths: what a checkpoint and a bundle hold of a padded layer."""
    tables, _ = weights(layer)
    widths = {t.name: t.dim for t in layer.plan.tables}
    return {name: table[:, :widths[name]] for name, table in tables.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_a_10_wide_layer_pads_what_fbgemm_needs_and_returns_10(kind: str) -> None:
    layer = layer_of(kind)
    kjt = as_kjt(random_ids(feature_map(True), batch=32, seed=2))
    with torch.no_grad():
        before = layer(kjt).values()
    assert before.shape == (32, DIM * len(layer.features)) and layer.dims == {f: DIM for f in layer.features}
    unpadded = layer.parameter_bytes()
    widths = {t.name: t.embedding_dim for t in layer.tables}
    padded = pad_for_fbgemm(layer)
    assert all(t.embedding_dim % 4 == 0 for t in layer.physical_tables)  # FBGEMM runs every table
    assert padded == {f"ebc.embedding_bags.{n}.weight": w for n, w in widths.items() if w % 4}
    extra = sum(t.num_embeddings * (fbgemm_width(t.embedding_dim) - t.embedding_dim) * 4 for t in layer.tables)
    assert layer.padding_bytes() == extra and layer.parameter_bytes() == unpadded + extra
    if kind == "robe":  # the shared array is 4 wide: 3 blocks cover 12 floats, the last read for 2
        assert widths == {"robe": 4} and extra == 0
    else:  # unified: the 10-wide chunk tables; mde: the full-width (unprojected) tables
        assert extra > 0 and DIM in widths.values()
    with torch.no_grad():
        after = layer(kjt).values()
    assert torch.equal(after, before)  # weights kept in the first columns, lookups cut back
    assert layer.full_bytes() == sum(layer.full_rows.values()) * DIM * 4  # the baseline at the asked width


def test_robe_with_one_block_per_id_pads_its_table() -> None:
    """``block: 12`` at dim 10: one block per id would leave two floats of every row unread, so the
    table is 10 wide and padded like any table, the padding reported."""
    layer = layer_of("robe", params={"block": 12})
    assert {t.name: t.embedding_dim for t in layer.tables} == {"robe": 10}
    pad_for_fbgemm(layer)
    assert layer.padding_bytes() == layer.tables[0].num_embeddings * 2 * 4


@pytest.mark.parametrize(("kind", "params", "message"), [
    ("robe", {"block": 8}, r"block=8: must be a multiple of 4 .* divides 12 \(embedding\.dim=10 rounded up"),
    ("robe", {"block": 6}, r"block=6: .*would pad every row"),
    ("unified", {"chunk": -1}, r"chunk=-1: must be >= 1"),
])
def test_what_cannot_be_laid_out_is_refused_with_the_reason(kind: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        layer_of(kind, params=params)


@pytest.mark.parametrize("dim", [6, 14])
@pytest.mark.parametrize("kind", KINDS)
def test_other_widths_build(kind: str, dim: int) -> None:
    layer = build_embedding_layer(feature_map(False), EmbeddingConfig(kind=kind, dim=dim, budget=0.1))
    with torch.no_grad():
        out = layer(as_kjt(random_ids(feature_map(False), batch=8, seed=0))).values()
    assert out.shape == (8, dim * len(layer.features))


@pytest.mark.parametrize("budget", [0.05, 0.3])
@pytest.mark.parametrize("kind", KINDS)
def test_budgets_pay_for_the_padding(kind: str, budget: float) -> None:
    layer = layer_of(kind, budget=budget)
    pad_for_fbgemm(layer)
    target = budget_bytes(budget, layer.full_bytes())
    assert layer.parameter_bytes() <= target, (layer.parameter_bytes(), layer.padding_bytes(), target)
    assert layer.parameter_bytes() > 0.8 * target  # and the budget is used, not left over


@pytest.mark.parametrize("multihot", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize(("kind", "kwargs"), [("unified", {}), ("unified", {"budget": 0.05}),
                                              ("robe", {"budget": 0.05}), ("robe", {"params": {"signed": False}}),
                                              ("mde", {}), ("mde", {"budget": 0.3}), ("mde", {"budget": 0.05})])
def test_numpy_twins_at_dim_10(kind: str, kwargs: dict[str, Any], multihot: bool) -> None:
    check_twins(kind, multihot, dim=DIM, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_the_plan_wide_tables_serve_the_padded_layer(kind: str, tmp_path: Path) -> None:
    """Training pads; a bundle keeps the plan's widths: the numpy lookup over the padded layer's tables
    cut to those widths gives its vectors, and the plan alone, without torch, gives the unpadded layer's."""
    layer = layer_of(kind, budget=0.3)
    layer.eval()
    check_lookup_without_torch(layer, feature_map(True), tmp_path, kind)
    with torch.no_grad():  # trained weights in the padding columns must not leak into the vectors
        for table in layer.ebc.embedding_bags.values():
            table.weight.normal_()
    pad_for_fbgemm(layer)
    with torch.no_grad():
        for t in layer.tables:
            layer.ebc.embedding_bags[t.name].weight[:, t.embedding_dim:].fill_(123.0)
    ids = random_ids(feature_map(True), batch=64, seed=5)
    with torch.no_grad():
        want = layer(as_kjt(ids)).to_dict()
    tables, dense = plan_wide(layer), weights(layer)[1]
    for f in layer.features:
        got = lookup(layer.plan, tables, dense, f, *ids[f])
        assert got.shape == (64, DIM)
        np.testing.assert_allclose(got, want[f].numpy(), rtol=1e-5, atol=1e-6, err_msg=f"{kind} {f}")


@pytest.mark.parametrize("kind", KINDS)
def test_training_with_dim_10_learns_and_exports_10_wide(kind: str, make_experiment: MakeExperiment,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = make_experiment("deepfm", f"embedding.kind={kind}", "embedding.dim=10", "embedding.budget=0.3",
                          "train.epochs=2")
    with in_process_run():
        result = train(cfg)
    assert result.test["auc"] > 0.55, result.test
    out = capsys.readouterr().out
    assert result.embedding_bytes <= 0.3 * result.full_bytes  # padding included
    model, _ = load_trained_model(resolve_checkpoint(result.output_dir))  # unsharded, the plan's widths
    layer = embedding_layers(model)["embedding"]
    assert isinstance(layer, TableEmbeddingLayer) and layer.plan is not None
    widths = {t.name: t.dim for t in layer.plan.tables}
    assert ("of the bytes above are padding" in out) == any(w % 4 for w in widths.values())
    if kind != "robe":
        assert DIM in widths.values()  # a table that was held padded
    bundle = Bundle.open(export_bundle(result.output_dir, tmp_path / "bundle"))
    stored = {n: t["dim"] for n, t in bundle.manifest["tables"].items() if t["layer"] == "embedding"}
    assert stored == widths  # the bundle keeps the plan's widths, not the padded ones
    fm, table = load_test_split(cfg.data_dir)
    batch = arrow_to_batch(table.slice(0, 512), fm)
    with torch.no_grad():
        want = layer(batch.sparse).to_dict()
    for f in layer.features:
        values, lengths = batch.sparse[f].values().numpy(), batch.sparse[f].lengths().numpy()
        got = bundle.lookup_ids(f, values, lengths)
        assert got.shape == (512, DIM)
        np.testing.assert_allclose(got, want[f].numpy(), rtol=1e-5, atol=1e-6, err_msg=f)


# ----------------------------------------------------------------------------- hashed, qr, hybrid and tt

# (kind, params, multihot): qr's mult takes no bags; tt keeps a plain table where its TT form is not
# smaller (the 7-id feature; at some budgets the 300-id one too).
ROW_KINDS = [("hashed", {}, True), ("qr", {"op": "mult"}, False), ("qr", {"op": "add"}, True),
             ("hybrid", {}, True), ("tt", {}, True)]
ROW_IDS = ["hashed", "qr-mult", "qr-add", "hybrid", "tt"]
PADDED_KEY = {"qr": "padded_part_dim"}  # the budget record's key for the width rows were paid at (else padded_dim)


def table_layers(layer: EmbeddingLayer) -> list[TableEmbeddingLayer]:
    """The table layers in ``layer`` (itself, or a grouped layer's: tt's plain tables beside its cores)."""
    return [m for m in layer.modules() if isinstance(m, TableEmbeddingLayer)]


@pytest.mark.parametrize("budget", [0.05, 0.3])
@pytest.mark.parametrize("dim", [DIM, 6])
@pytest.mark.parametrize(("kind", "params", "multihot"), ROW_KINDS, ids=ROW_IDS)
def test_row_budgets_pay_for_the_padding(kind: str, params: dict[str, Any], multihot: bool, dim: int,
                                         budget: float) -> None:
    """The padded layer (tables ``fbgemm_width`` wide) is within the budget and uses most of it; the
    padding is reported, the baseline stays at the real width and the vectors at ``dim`` columns."""
    fm = feature_map(multihot)
    torch.manual_seed(0)
    layer = build_embedding_layer(fm, EmbeddingConfig(kind=kind, dim=dim, seed=3, budget=budget, params=params))
    kjt = as_kjt(random_ids(fm, batch=16, seed=2))
    with torch.no_grad():
        before = layer(kjt).values()
    assert before.shape == (16, dim * len(layer.features))
    pad_for_fbgemm(layer)
    tables = table_layers(layer)
    assert tables and all(t.embedding_dim % 4 == 0 for sub in tables for t in sub.physical_tables)
    padding = sum(t.num_embeddings * (fbgemm_width(dim) - dim) * 4 for sub in tables for t in sub.tables)
    assert padding > 0 and sum(sub.padding_bytes() for sub in tables) == padding
    for sub in tables:  # the plan records the width its rows were paid at
        assert sub.plan is not None
        assert sub.plan.capabilities.budget[PADDED_KEY.get(kind, "padded_dim")] == fbgemm_width(dim)
    assert layer.full_bytes() == sum(layer.full_rows.values()) * dim * 4  # the baseline at the asked width
    target = budget_bytes(budget, layer.full_bytes())
    achieved = layer.parameter_bytes()  # padding included
    assert 0.8 * target <= achieved <= target, (achieved, padding, target)
    with torch.no_grad():
        assert torch.equal(layer(kjt).values(), before)  # weights kept, lookups cut back to dim


def test_row_budget_floors_count_the_padding() -> None:
    """Where a layout floor exceeds the budget, the error names it at the padded width (48 bytes a
    row at dim 10): hybrid's OOV and cold rows (two per feature) plus one hashed row, and the rows
    a ``per_feature`` setting takes of hashed's budget."""
    fm = feature_map(False)
    floor = (2 * len(VOCAB) + 1) * 48
    with pytest.raises(BudgetError, match=f"take {floor:,} bytes"):  # 40 bytes a row would have fitted
        build_embedding_layer(fm, EmbeddingConfig(kind="hybrid", dim=DIM, budget=float(floor - 8)))
    target = budget_bytes(0.01, sum(VOCAB.values()) * DIM * 4)
    with pytest.raises(BudgetError, match=rf"takes 50 rows of the budget's {target // 48:,},"):
        build_embedding_layer(fm, EmbeddingConfig(kind="hashed", dim=DIM, budget=0.01,
                                                  params={"per_feature": {"mid": 50}}))


@pytest.mark.parametrize(("kind", "kwargs", "multihot"), [
    ("hashed", {"budget": 0.05}, False), ("hashed", {"budget": 0.05}, True), ("qr", {"budget": 0.05}, False),
    ("qr", {"budget": 0.3, "params": {"op": "add"}}, True), ("hybrid", {"budget": 0.05}, False),
    ("hybrid", {"budget": 0.05}, True)])
def test_row_budget_twins_at_dim_10(kind: str, kwargs: dict[str, Any], multihot: bool) -> None:
    check_twins(kind, multihot, dim=DIM, **kwargs)


# ----------------------------------------------------------------------------- pruned and OptEmbed's search


def pruned_layer(tmp_path: Path, dims: dict[str, int]) -> PrunedLayer:
    """A ``pruned`` layer over the twin features from a hand-made pruning at ``dims`` (about half the rows kept)."""
    fm = feature_map(False)
    rng = np.random.default_rng(0)
    features = {}
    for f in fm.sparse_features:
        keep = rng.random(fm.feature(f).num_embeddings) < 0.5
        keep[0] = False  # the OOV id pruned: its rows read the OOV vector
        features[f] = FeaturePruning(remap_from_mask(keep), dim=dims[f])
    folder = save_pruning(tmp_path / "pruned", PruningPlan(full_dim=DIM, features=features))
    torch.manual_seed(0)
    layer = build_embedding_layer(fm, EmbeddingConfig(kind="pruned", dim=DIM, params={
        "path": str(folder), "pruned_vector": "oov"}))
    assert isinstance(layer, PrunedLayer)
    return layer


def test_pruned_tables_of_searched_widths_5_and_10_pad_and_keep_their_twin(tmp_path: Path) -> None:
    dims = {"small": 5, "mid": 10, "big": 4}
    layer = pruned_layer(tmp_path, dims)
    layer.eval()
    ids = random_ids(feature_map(False), batch=64, seed=4)
    with torch.no_grad():
        before = layer(as_kjt(ids)).to_dict()
    assert {f: v.shape[1] for f, v in before.items()} == dims
    unpadded = layer.parameter_bytes()
    assert pad_for_fbgemm(layer) == {"ebc.embedding_bags.p_small.weight": 5, "ebc.embedding_bags.p_mid.weight": 10}
    assert all(t.embedding_dim % 4 == 0 for t in layer.physical_tables)
    kept = layer.kept_rows
    assert layer.padding_bytes() == (kept["small"] * 3 + kept["mid"] * 2) * 4
    assert layer.parameter_bytes() == unpadded + layer.padding_bytes()
    with torch.no_grad():
        for t in layer.tables:  # what the padding columns hold never reaches a vector
            layer.ebc.embedding_bags[t.name].weight[:, t.embedding_dim:].fill_(123.0)
        after = layer(as_kjt(ids)).to_dict()
    tables, dense = weights(layer)
    widths = {t.name: t.dim for t in layer.plan.tables}
    tables = {n: v[:, :widths[n]] for n, v in tables.items()}  # as a checkpoint and a bundle hold them
    for f in layer.features:
        assert torch.equal(after[f], before[f])
        np.testing.assert_allclose(lookup(layer.plan, tables, dense, f, *ids[f]), before[f].numpy(),
                                   rtol=1e-5, atol=1e-6, err_msg=f)


def search_config(prepared: Path, tmp_path: Path, *overrides: str) -> ExperimentConfig:
    return load_experiment(CONFIGS / "experiments" / "optembed_synthetic_ctr.yaml", [
        f"data_dir={prepared}", f"train.output_dir={tmp_path / 'runs'}", *SMALL_RUN,
        f"model.params={SMALL_MODEL_PARAMS['dcnv2']}", "train.eval_every_steps=4",
        "embedding.params.threshold_init=0.02", "search.supernet_max_steps=4", "search.retrain_max_steps=4",
        "search.population=4", "search.generations=1", "search.valid_rows=1000", "search.bytes_penalty=1.0",
        f"cluster.mlflow_uri=sqlite:///{tmp_path / 'mlruns.db'}", *overrides,
    ])


@pytest.mark.usefixtures("no_process_group")
def test_a_dim_step_that_does_not_divide_the_dim_is_refused_before_a_run(prepared_ctr: Path, tmp_path: Path) -> None:
    import pipelines.search as search

    cfg = search_config(prepared_ctr, tmp_path, "embedding.dim=10")  # dim_step 4
    with pytest.raises(ConfigError, match=r"dim_step=4: set dim_step to a divisor of 10 \(1, 2, 5, 10\)"):
        search.run_search(cfg)
    assert list_runs(cfg.cluster.mlflow_uri) == []


@pytest.mark.usefixtures("no_process_group")
def test_search_at_dim_10_pads_every_stage(prepared_ctr: Path, tmp_path: Path) -> None:
    """Supernet at dim 10 (tables held 12 wide), search on the 10 plan columns, retrain on compact tables
    of widths 5 or 10 (held 8 or 12 wide), their bytes counted padded."""
    import pipelines.search as search

    cfg = search_config(prepared_ctr, tmp_path, "embedding.dim=10", "embedding.params.dim_step=5")
    summary = search.run_search(cfg)
    found, retrain = summary["search"], summary["retrain"]
    assert set(found["dims"].values()) <= {5, 10}
    padding = sum(found["kept_rows"][f] * (fbgemm_width(d) - d) * 4 for f, d in found["dims"].items())
    assert padding > 0 and found["table_padding_bytes"] == padding
    assert found["table_bytes"] == sum(found["kept_rows"][f] * fbgemm_width(d) * 4 for f, d in found["dims"].items())
    assert retrain["steps"] == 4 and 0 < retrain["test"]["auc"] < 1  # four steps: it runs, learning is shown above
    assert retrain["embedding_bytes"] < retrain["full_bytes"]
    root = tmp_path / "runs" / cfg.expid / "search"
    initial = load_file(str(root / "initial_tables.safetensors"))
    assert {v.shape[1] for v in initial.values()} == {DIM}  # the supernet's plan width, not 12
    compact = load_file(str(root / "pruned_initial.safetensors"))
    assert {f: v.shape[1] for f, v in compact.items()} == {f: d for f, d in found["dims"].items() if f in compact}
    bundle = Bundle.open(export_bundle(root / "retrain", tmp_path / "bundle"))  # the searched widths, unpadded
    stored = {n: t["dim"] for n, t in bundle.manifest["tables"].items() if t["layer"] == "embedding"}
    assert stored == {f"p_{f}": d for f, d in found["dims"].items() if found["kept_rows"][f]}
