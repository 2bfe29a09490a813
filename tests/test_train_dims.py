"""Any embedding width: tables whose width FBGEMM cannot run (not a multiple of 4) are held
padded (``embedding.dim=10`` -> 12 physical columns) and their lookups cut back, with the
padding counted in the bytes; what cannot be padded is refused at config time."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_utils import in_process_run, run_ranks
from test_sharding import feature_map, local_batch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recemb.config.experiment import EmbeddingConfig, ExperimentConfig
from recemb.config.loader import from_dict
from recemb.data.batch import ParquetSource
from recemb.data.schema import FeatureMap
from recemb.embeddings.base import TableEmbeddingLayer, fbgemm_width, pad_for_fbgemm
from recemb.embeddings.registry import build_embedding_layer
from recemb.embeddings.sharding import ensure_process_group, shard_model
from recemb.errors import ConfigError
from recemb.models.registry import ModelConfig, build_model
from recemb.train.checkpoint import assemble_full
from recemb.train.loop import TrainModel, evaluate, train
from recemb.train.preflight import check_table_widths
from recemb.train.restore import load_trained_model

MakeExperiment = Callable[..., ExperimentConfig]  # the conftest fixture


def test_a_10_wide_layer_holds_12_columns_and_returns_10() -> None:
    fm = feature_map()
    layer = build_embedding_layer(fm, EmbeddingConfig(kind="full", dim=10))
    assert isinstance(layer, TableEmbeddingLayer)
    before = layer(local_batch(0, 0).sparse).values()
    assert layer.padding_bytes() == 0  # unsharded, any width runs as it is
    assert pad_for_fbgemm(layer) == {f"ebc.embedding_bags.t_{f}.weight": 10 for f in fm.sparse_features}
    assert pad_for_fbgemm(layer) == {}  # once
    assert {t.embedding_dim for t in layer.physical_tables} == {12} and fbgemm_width(10) == 12
    assert {t.embedding_dim for t in layer.tables} == {10}  # as the plan gives them
    torch.testing.assert_close(layer(local_batch(0, 0).sparse).values(), before)  # weights kept
    assert layer.dims == {f: 10 for f in fm.sparse_features}
    rows = sum(t.num_embeddings for t in layer.tables)
    assert layer.parameter_bytes() == rows * 12 * 4           # honest: the physical bytes
    assert layer.padding_bytes() == rows * 2 * 4
    assert layer.full_bytes() == rows * 10 * 4                # the baseline at the asked width
    batch = local_batch(0, 0)
    pooled = layer(batch.sparse)
    assert pooled.values().shape == (batch.batch_size, 10 * len(fm.sparse_features))
    # Each feature's output is the sum of its ids' rows, first 10 columns.
    ids, weights = batch.sparse["user"].values(), layer.ebc.embedding_bags["t_user"].weight
    torch.testing.assert_close(pooled["user"], weights[ids, :10])


@pytest.mark.usefixtures("no_process_group")
@pytest.mark.parametrize("sharding", ["table_wise", "row_wise", "column_wise", "data_parallel"])
def test_sharded_10_wide_tables_match_the_unsharded_layer(sharding: str) -> None:
    ensure_process_group()
    try:
        cfg = EmbeddingConfig(kind="full", dim=10, sharding=sharding)
        model = build_model(ModelConfig(name="deepfm", params={"mlp": [16]}), feature_map(), cfg,
                            device=torch.device("meta"))
        pad_for_fbgemm(model)
        dmp = shard_model(model, cfg, torch.device("cpu")).model
        batch = local_batch(1, 0)
        layer = dmp.module.embedding
        pooled = layer(batch.sparse)
        assert pooled.values().shape[1] == 10 * len(feature_map().sparse_features)
        logits = dmp(batch)
        assert logits.shape == (batch.batch_size,) and torch.isfinite(logits).all()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("overrides", [[], ["embedding.sharding=column_wise"], ["embedding.kind=qr",
                                                                                  "embedding.budget=0.5"]])
def test_training_with_dim_10_learns(make_experiment: MakeExperiment, overrides: list[str],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    cfg = make_experiment("deepfm", "embedding.dim=10", "train.epochs=2", *overrides)
    with in_process_run():
        result = train(cfg)
    assert result.test["auc"] > 0.55, result.test
    if "embedding.budget=0.5" not in overrides:  # full tables: 12 physical columns for 10
        assert result.embedding_bytes > result.full_bytes
    assert "of the bytes above are padding" in capsys.readouterr().out


def dims_worker(rank: int, world_size: int, cfg_data: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    result = train(from_dict(ExperimentConfig, cfg_data))
    return {"steps": result.steps, "auc": result.test["auc"]}


@pytest.mark.usefixtures("no_process_group")
def test_dim_10_column_wise_on_two_ranks(make_experiment: MakeExperiment) -> None:
    """Column shards of the 12-wide tables (4 columns each) over two ranks."""
    results = run_ranks(dims_worker, 2, make_experiment("deepfm", "embedding.dim=10",
                                                        "embedding.sharding=column_wise").to_dict())
    assert results[0] == results[1] and results[0]["auc"] > 0.5


def test_a_collection_that_does_not_pad_is_refused_at_config_time() -> None:
    model = nn.Module()
    model.ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t_a", num_embeddings=5, embedding_dim=10,
                                                                  feature_names=["a"])], device=torch.device("meta"))
    with pytest.raises(ConfigError, match=r"table 't_a' is 10 wide .* set embedding\.dim .* multiple of 4"):
        check_table_widths(model, "pruned")


@pytest.mark.parametrize("overrides", [["embedding.sharding=row_wise"],
                                       ["embedding.sharding=column_wise", "embedding.optimizer=exact_adagrad"]])
def test_dim_10_checkpoints_keep_10_columns_and_resume_exactly(make_experiment: MakeExperiment, tmp_path: Path,
                                                               overrides: list[str]) -> None:
    """Checkpoints hold the plan's 10 columns (weights and exact Adagrad's per-column state), so
    the unsharded model, export and a resumed padded run all read them; the resume is exact."""
    settings = ["embedding.dim=10", "train.epochs=2", "train.eval_every_steps=8", *overrides]
    with in_process_run():
        full = train(make_experiment("deepfm", *settings, output_dir=tmp_path / "a"))
    cfg = make_experiment("deepfm", *settings, output_dir=tmp_path / "b")
    with in_process_run():
        train(cfg, stop_after_steps=11)
    with in_process_run():
        last = train(cfg, resume=tmp_path / "b" / cfg.expid)
    assert [h["step"] for h in last.history] == [h["step"] for h in full.history]
    for mine, theirs in zip(last.history, full.history, strict=True):
        assert mine == pytest.approx(theirs, abs=1e-6)
    assert last.test == pytest.approx(full.test, abs=1e-6)

    best = tmp_path / "a" / cfg.expid / "checkpoints" / "best"
    tables = {k: v for k, v in assemble_full(best).items() if ".embedding_bags.t_" in k}
    assert tables and {v.shape[1] for v in tables.values() if v.dim() == 2} == {10}
    model, _ = load_trained_model(best)  # unsharded, 10-wide tables
    fm = FeatureMap.load(cfg.data_dir)
    test = evaluate(TrainModel(model), ParquetSource(fm, cfg.data_dir).batches("test", 4096, 0),
                    torch.device("cpu"))
    assert test["auc"] == pytest.approx(full.test["auc"], abs=1e-6)
