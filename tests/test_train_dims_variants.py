"""Any embedding width for the chunked and mixed-width variants: ``unified``, ``robe`` and ``mde``
at ``embedding.dim=10``.

Each builds, returns 10 columns per feature and, held for FBGEMM (``pad_for_fbgemm``), pads only
the tables that need it: unified's 10-wide chunks and mde's full-width tables go 12 wide (padding
counted in the bytes and reported), ROBE's shared array stays 4 wide (its blocks cover 12 floats,
the last one cut to the dim). Budgets pay for the padding. The numpy twins of the plans give the
torch layer's vectors, padded or not, and a trained run's bundle gives the trained model's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dist_utils import in_process_run
from test_export import load_test_split
from twin_utils import as_kjt, check_lookup_without_torch, check_twins, feature_map, random_ids, weights

from recemb.config.experiment import EmbeddingConfig, ExperimentConfig
from recemb.data.batch import arrow_to_batch
from recemb.embeddings.base import TableEmbeddingLayer, fbgemm_width, pad_for_fbgemm
from recemb.embeddings.budget import budget_bytes
from recemb.embeddings.registry import build_embedding_layer
from recemb.errors import ConfigError
from recemb.export import export_bundle
from recemb.models.registry import embedding_layers
from recemb.serving.bundle import Bundle
from recemb.serving.lookup import lookup
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
