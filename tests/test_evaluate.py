"""Tests for ``recemb evaluate``: restoring a trained model unsharded, Ray Data scoring, predictions.

One small DeepFM is trained once per module (in-process, tracked in a sqlite MLflow
store) and one local Ray serves every evaluation. The unsharded model restored from
the checkpoint must reproduce the sharded model's test metrics, and the Ray Data
scoring must give every test row exactly once, keyed by its shard and row.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
from conftest import experiment_config
from dist_utils import in_process_run
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from pipelines.evaluate import RowKeys, run_evaluate
from pipelines.train import run_train
from recemb.cli import main
from recemb.data.batch import ParquetBatches, arrow_to_batch
from recemb.data.schema import FeatureMap
from recemb.errors import DataError, RecembError
from recemb.eval.metrics import compute_metrics
from recemb.tracking import resolve_run
from recemb.train.checkpoint import write_meta
from recemb.train.loop import TrainResult
from recemb.train.restore import load_trained_model, locate_checkpoint, model_state, resolve_checkpoint

METRICS = ("auc", "logloss", "ne", "calibration")


@dataclass
class Trained:
    """The module's trained run: its result, MLflow store and run folder."""

    result: TrainResult
    uri: str
    root: Path

    @property
    def run_dir(self) -> Path:
        return Path(self.result.output_dir)


TEST_SHARD_ROWS = (700, 700)  # the test split is cut into three files: 700, 700 and the rest


@pytest.fixture(scope="module")
def data_dir(prepared_ctr: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session dataset with its test split in three shards, so keys and order span files."""
    root = tmp_path_factory.mktemp("evaluate_data") / "prepared"
    shutil.copytree(prepared_ctr, root)
    fm = FeatureMap.load(root)
    (only,) = fm.shards["test"]
    table = pq.read_table(root / only)
    (root / only).unlink()
    names, start = [], 0
    for i, n in enumerate((*TEST_SHARD_ROWS, table.num_rows - sum(TEST_SHARD_ROWS))):
        names.append(f"test/part-{i:05d}.parquet")
        pq.write_table(table.slice(start, n), root / names[-1])
        start += n
    fm.shards["test"] = names
    fm.save(root / "feature_map.json")
    return root


@pytest.fixture(scope="module")
def trained(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    """A DeepFM trained in this process (``workers=0``) and tracked in a fresh sqlite store."""
    root = tmp_path_factory.mktemp("evaluate")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    cfg = experiment_config("deepfm", data_dir, root / "runs")
    with in_process_run():
        result = run_train(cfg, workers=0, mlflow_uri=uri)
    yield Trained(result, uri, root)


@pytest.fixture(scope="module")
def evaluated(ray_local: Any, trained: Trained) -> dict[str, Any]:
    """``run_evaluate`` on the test split by MLflow run id, with predictions (small batches: several per actor)."""
    return run_evaluate(trained.result.run_id, "test", mlflow_uri=trained.uri,
                        predictions=trained.root / "preds.parquet", workers=2, batch_size=512)


# ----------------------------------------------------------------------------- restore


def test_restored_model_reproduces_training_test_metrics(trained: Trained, data_dir: Path) -> None:
    assert not dist.is_initialized()
    model, cfg = load_trained_model(resolve_checkpoint(str(trained.run_dir)))
    assert not dist.is_initialized()  # no process group was needed
    assert cfg.expid == trained.result.expid and cfg.model.name == "deepfm"
    assert not model.training
    assert any(isinstance(m, EmbeddingBagCollection) for m in model.modules())  # plain torchrec, not sharded
    fm = FeatureMap.load(data_dir)
    logits, labels = [], []
    with torch.no_grad():
        for batch in ParquetBatches(fm, "test", 4096, root=data_dir):
            logits.append(model(batch))
            labels.append(batch.labels)
    metrics = compute_metrics(torch.cat(logits), torch.cat(labels))
    for key in METRICS:
        assert metrics[key] == pytest.approx(trained.result.test[key], abs=1e-6), key
    assert metrics["count"] == trained.result.test["count"] == fm.rows["test"]


def test_model_state_strips_prefixes_and_drops_optimizer_state() -> None:
    full = {"model/model.mlp.bias": torch.zeros(2), "dense/0/exp_avg": torch.ones(2), "fused/x/m": torch.ones(1)}
    assert list(model_state(full)) == ["mlp.bias"]


def test_load_refuses_checkpoint_of_another_model(trained: Trained, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained.run_dir / "checkpoints" / "best", ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    params = meta["config"]["model"]["params"]  # first_order as trained: only the MLP changes below
    meta["config"]["model"]["params"] = {**params, "mlp": [16]}
    write_meta(ckpt, meta)
    with pytest.raises(DataError, match="do not fit the model"):
        load_trained_model(ckpt)
    meta["config"]["model"]["params"] = {**params, "mlp": [24, 16]}
    write_meta(ckpt, meta)
    with pytest.raises(DataError, match="has shape"):
        load_trained_model(ckpt)


def test_evaluate_refuses_a_damaged_checkpoint_before_scoring(trained: Trained, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained.run_dir / "checkpoints" / "best", ckpt)
    part = ckpt / "rank-0.safetensors"
    data = bytearray(part.read_bytes())
    data[-10] ^= 0xFF
    part.write_bytes(bytes(data))
    import pipelines.ray_runtime as runtime

    def no_ray(*args: object, **kwargs: object) -> str:
        raise AssertionError("Ray was started for a damaged checkpoint")

    monkeypatch.setattr(runtime, "init_ray", no_ray)
    with pytest.raises(DataError, match=r"rank-0\.safetensors: checksum mismatch"):
        run_evaluate(str(ckpt), "test", workers=1)


def test_resolve_checkpoint_forms(trained: Trained, tmp_path: Path) -> None:
    run_dir = trained.run_dir
    best, last = run_dir / "checkpoints" / "best", run_dir / "checkpoints" / "last"
    assert resolve_checkpoint(str(run_dir)) == best
    assert resolve_checkpoint(str(run_dir / "checkpoints")) == best
    assert resolve_checkpoint(str(last)) == last
    only_last = tmp_path / "run"
    shutil.copytree(last, only_last / "checkpoints" / "last")
    assert resolve_checkpoint(only_last) == only_last / "checkpoints" / "last"

    ref = locate_checkpoint(trained.result.run_id, trained.uri)
    assert ref.path == best.resolve() and ref.run_id == trained.result.run_id

    with pytest.raises(RecembError, match="no such folder"):
        resolve_checkpoint(str(tmp_path / "bogus"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecembError, match="neither a checkpoint"):
        resolve_checkpoint(str(tmp_path / "empty"))
    with pytest.raises(RecembError, match="is a file"):
        resolve_checkpoint(str(best / "meta.json"))
    with pytest.raises(RecembError, match="no MLflow run"):
        resolve_checkpoint("0" * 32, trained.uri)


def test_row_keys_count_per_file_across_batches() -> None:
    keys = RowKeys({"/d/a.parquet": "test/a.parquet", "/d/b.parquet": "test/b.parquet"})
    codes, rows = keys.assign(pa.array(["/d/a.parquet", "/d/a.parquet", "/d/b.parquet"]))
    assert codes.tolist() == [0, 0, 1] and rows.tolist() == [0, 1, 0]
    codes, rows = keys.assign(pa.chunked_array([pa.array(["/d/b.parquet", "/d/a.parquet"]).dictionary_encode()]))
    assert codes.tolist() == [1, 0] and rows.tolist() == [1, 2]
    with pytest.raises(RecembError, match="not a shard"):
        keys.assign(pa.array(["/elsewhere.parquet"]))


# ----------------------------------------------------------------------------- Ray Data scoring


def test_evaluate_matches_training_and_logs_to_mlflow(evaluated: dict[str, Any], trained: Trained) -> None:
    metrics = evaluated["metrics"]
    for key in METRICS:
        assert metrics[key] == pytest.approx(trained.result.test[key], abs=1e-6), key
    assert evaluated["rows"] == metrics["count"] == trained.result.test["count"]
    assert evaluated["checkpoint"] == str((trained.run_dir / "checkpoints" / "best").resolve())
    run = resolve_run(trained.uri, trained.result.run_id)
    assert run["status"] == "FINISHED"  # logging the evaluation does not reopen the run
    for key in METRICS:
        assert run["metrics"][f"eval_test_{key}"] == pytest.approx(metrics[key])


def test_predictions_are_keyed_by_shard_and_row(evaluated: dict[str, Any], trained: Trained,
                                                data_dir: Path) -> None:
    fm = FeatureMap.load(data_dir)
    assert len(fm.shards["test"]) == 3
    preds = pq.read_table(evaluated["predictions"])
    assert preds.column_names == ["shard", "row", "label", "logit", "prob"]
    assert preds.num_rows == fm.rows["test"]
    pairs = list(zip(preds.column("shard").to_pylist(), preds.column("row").to_pylist(), strict=True))
    assert len(set(pairs)) == len(pairs) and pairs == sorted(pairs)
    logit = preds.column("logit").to_numpy()
    prob = preds.column("prob").to_numpy()
    np.testing.assert_allclose(prob, torch.sigmoid(torch.from_numpy(logit.copy())).numpy(), rtol=0, atol=1e-7)

    # Each key points at its source row: same label, and the restored model's logit for that row.
    model, _ = load_trained_model(Path(evaluated["checkpoint"]))
    for shard in fm.shards["test"]:
        mine = preds.filter(pa.array(preds.column("shard").to_numpy(zero_copy_only=False) == shard))
        source = pq.read_table(data_dir / shard)
        rows = mine.column("row").to_numpy()
        assert sorted(rows.tolist()) == list(range(source.num_rows))
        batch = arrow_to_batch(source, fm)
        with torch.no_grad():
            expected = model(batch).numpy()
        np.testing.assert_array_equal(mine.column("label").to_numpy(), batch.labels.numpy()[rows])
        np.testing.assert_allclose(mine.column("logit").to_numpy(), expected[rows], rtol=0, atol=1e-5)


def test_cli_evaluate(ray_local: Any, trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--run", str(trained.run_dir), "--split", "valid", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{\n"):])
    # The best checkpoint is the one whose validation metrics training recorded as best.
    for key in METRICS:
        assert result["metrics"][key] == pytest.approx(trained.result.best_valid[key], abs=1e-6), key
    assert result["predictions"] is None and "mlflow_run_id" not in result

    assert main(["evaluate", "--run", str(tmp_path / "nope")]) == 2
    assert "recemb: error:" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(trained.run_dir), "--split", "holdout"]) == 2
    assert "split 'holdout'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- anomaly models


def test_score_task_judges_each_family_by_its_own_metrics() -> None:
    from pipelines.evaluate import score_task

    assert score_task({"name": "deepfm", "params": {"mlp": [8]}}).family == "ctr"
    task = score_task({"name": "ape", "params": {"normal_label": 1.0, "anomaly_label": -1.0, "top_k": 2}})
    scores = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.5])
    m = task.metrics(scores, torch.tensor([-1.0, 1.0, 1.0, -1.0, 0.0]))
    assert m["auc"] == 0.75 and m["count"] == 4 and m["unlabelled"] == 1 and m["k"] == 2
    assert m["precision_at_k"] == 0.5 and "logloss" not in m
    with pytest.raises(DataError, match="do not follow the model's convention"):
        task.metrics(scores, torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]) * 2)


@pytest.fixture(scope="module")
def ape_run(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """APE trained for 2 epochs on small synthetic events, prepared from their given train and test files."""
    from conftest import CONFIGS

    from recemb.config.experiment import load_experiment
    from recemb.data.preprocess import prepare_dataset
    from recemb.data.schema import load_dataset_config
    from recemb.data.synthetic import EventSynthConfig, generate_events
    from recemb.train.loop import train

    root = tmp_path_factory.mktemp("evaluate_ape")
    generate_events(EventSynthConfig(train_events=10_000, test_events=3_000, seed=2), root / "raw")
    files = {"train": [str(root / "raw" / "train.csv")], "test": [str(root / "raw" / "test.csv")]}
    prepare_dataset(load_dataset_config(CONFIGS / "datasets" / "synthetic_events.yaml",
                                        {"split": {"files": files}, "output": str(root / "data")}))
    cfg = load_experiment(CONFIGS / "experiments" / "ape_synthetic_events.yaml",
                          [f"data_dir={root / 'data'}", f"train.output_dir={root / 'runs'}", "train.progress=false",
                           "train.epochs=2", "embedding.dim=8"])
    with in_process_run():
        return train(cfg)


def test_evaluate_an_anomaly_model_reports_anomaly_metrics(ray_local: Any, ape_run: TrainResult,
                                                           tmp_path: Path) -> None:
    out = run_evaluate(ape_run.output_dir, "test", predictions=tmp_path / "preds.parquet", workers=1)
    assert out["family"] == "anomaly"
    # The trainer scores through the sharded (data-parallel, FBGEMM dense kernel) tables, evaluate
    # through the unsharded model: float32 sums in another order may swap one near-tied pair,
    # which moves AUC by 1 / (anomalies x normals) ~ 2e-6 here.
    for key in ("auc", "ap", "precision_at_k", "recall_at_k", "anomaly_rate"):
        assert out["metrics"][key] == pytest.approx(ape_run.test[key], abs=2e-5), key
    assert "logloss" not in out["metrics"] and out["metrics"]["unlabelled"] == 0
    preds = pq.read_table(out["predictions"])
    assert preds.column_names == ["shard", "row", "label", "anomaly_score"]
    assert set(preds.column("label").to_pylist()) == {1.0, -1.0}
