"""MLflow tracking on a temporary sqlite store: runs, params, metrics, resume, ranks, URIs.

Creating a sqlite store runs MLflow's schema migrations (about 6 s), so one store is
made per session and copied for each test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from mlflow import MlflowClient

from recemb.config.experiment import EmbeddingConfig, ExperimentConfig
from recemb.tracking import (
    TAG_CHECKPOINT_DIR,
    TAG_EMBEDDING_BYTES,
    TAG_GIT_COMMIT,
    TAG_VARIANT,
    Tracker,
    TrackingError,
    format_runs_table,
    list_runs,
    resolve_run,
    resolve_tracking_uri,
)
from recemb.tracking.mlflow_tracker import ARTIFACTS_DIR_NAME, DEFAULT_DB_NAME, flatten_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An empty, migrated MLflow sqlite store (built in memory-backed /dev/shm when there is
    one: the migrations fsync dozens of times, 3 s there against 8 s on a disk)."""
    shm = Path("/dev/shm")
    folder = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() and os.access(shm, os.W_OK) else None
    path = (folder or tmp_path_factory.mktemp("mlflow_template")) / "template.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    yield path
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def uri(template_db: Path, tmp_path: Path) -> str:
    """A fresh store for this test (a copy of the template), as an absolute sqlite URI."""
    path = tmp_path / "store" / "mlflow.db"
    path.parent.mkdir()
    shutil.copy(template_db, path)
    return f"sqlite:///{path}"


@pytest.fixture
def cfg() -> ExperimentConfig:
    cfg = ExperimentConfig(dataset_id="synthetic_ctr", data_dir="x", embedding=EmbeddingConfig(kind="unified"))
    cfg.train.batch_size = 512
    cfg.train.epochs = 1
    cfg.train.monitor = {"auc": 1.0, "logloss": -1.0}
    return cfg


def all_runs(client: MlflowClient) -> list:
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids) if ids else []


def test_run_logs_params_metrics_tags_and_artifacts(uri: str, cfg: ExperimentConfig, tmp_path: Path) -> None:
    tracker = Tracker(uri, rank=0)
    run_id = tracker.start(cfg, tags={"purpose": "test"})
    tracker.log_params_from_config(cfg)
    hook = tracker.metrics_hook("valid")
    hook(10, {"auc": 0.61, "logloss": 0.5, "step": 10, "epoch": 0})
    hook(20, {"auc": 0.66, "logloss": float("nan"), "step": 20, "epoch": 1})
    tracker.log_metrics(20, {"auc": 0.65, "count": 100}, split="test")
    report = tmp_path / "report.txt"
    report.write_text("hello")
    tracker.log_artifact(report)
    tracker.log_dict({"a": 1}, "extra/result.json")
    tracker.set_tags({TAG_EMBEDDING_BYTES: 4096, TAG_CHECKPOINT_DIR: "runs/x/checkpoints"})
    tracker.end("FINISHED")

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == cfg.expid == "deepfm_synthetic_ctr_unified"
    assert client.get_experiment(run.info.experiment_id).name == "synthetic_ctr"
    params = run.data.params
    assert params["train.batch_size"] == "512"
    assert params["train.monitor.auc"] == "1.0" and params["train.monitor.logloss"] == "-1.0"
    assert params["embedding.kind"] == "unified"
    assert params["embedding.groups"] == "[]"
    tags = run.data.tags
    assert tags[TAG_VARIANT] == "unified"
    assert tags[TAG_GIT_COMMIT] and tags["mlflow.source.git.commit"] == tags[TAG_GIT_COMMIT]
    if (ROOT / ".git").exists():
        assert len(tags[TAG_GIT_COMMIT]) == 40
    assert tags["recemb.version.mlflow"] != "none" and tags["recemb.version.torch"] != "none"
    assert {"recemb.host", "recemb.world_size", "recemb.version.fbgemm_gpu"} <= tags.keys()
    assert tags["purpose"] == "test" and tags[TAG_EMBEDDING_BYTES] == "4096"
    auc = client.get_metric_history(run_id, "valid_auc")
    assert [(m.step, m.value) for m in auc] == [(10, 0.61), (20, 0.66)]
    assert [m.step for m in client.get_metric_history(run_id, "valid_logloss")] == [10]  # NaN skipped
    assert [m.value for m in client.get_metric_history(run_id, "epoch")] == [0, 1]
    assert "step" not in run.data.metrics and "valid_step" not in run.data.metrics
    assert run.data.metrics["test_auc"] == 0.65
    names = {f.path for f in client.list_artifacts(run_id)}
    assert names == {"report.txt", "config.json", "extra"}
    local = Path(client.download_artifacts(run_id, "config.json", str(tmp_path)))
    assert json.loads(local.read_text())["train"]["batch_size"] == 512
    # Artifacts sit next to the sqlite file, not in ./mlruns of the working directory.
    assert run.info.artifact_uri.startswith((Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri())


def test_resume_appends_to_the_same_run(uri: str, cfg: ExperimentConfig) -> None:
    first = Tracker(uri)
    run_id = first.start(cfg)
    first.log_params_from_config(cfg)
    first.log_metrics(10, {"auc": 0.6}, split="valid")
    first.end("FAILED")  # the worker died

    cfg.train.epochs = 3  # params are immutable in MLflow: a changed value becomes a tag
    second = Tracker(uri)
    assert second.start(cfg, run_id=run_id) == run_id
    assert MlflowClient(uri).get_run(run_id).info.status == "RUNNING"
    second.log_params_from_config(cfg)
    second.log_metrics(20, {"auc": 0.7}, split="valid")
    second.end()

    client = MlflowClient(uri)
    assert len(all_runs(client)) == 1
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "valid_auc")] == [10, 20]
    assert run.data.params["train.epochs"] == "1"
    assert run.data.tags["recemb.param_changed.train.epochs"] == "3"
    assert run.data.tags["recemb.resumes"] == "1"


def test_resume_of_an_unknown_run_is_a_user_error(uri: str, cfg: ExperimentConfig) -> None:
    with pytest.raises(TrackingError, match="no MLflow run"):
        Tracker(uri).start(cfg, run_id="0" * 32)


def test_context_manager_marks_failed_runs(uri: str, cfg: ExperimentConfig) -> None:
    with pytest.raises(RuntimeError), Tracker(uri) as tracker:
        run_id = tracker.start(cfg)
        raise RuntimeError("boom")
    assert MlflowClient(uri).get_run(run_id).info.status == "FAILED"


def test_other_ranks_write_nothing(uri: str, cfg: ExperimentConfig, tmp_path: Path) -> None:
    tracker = Tracker(uri, rank=1)
    assert not tracker.enabled
    assert tracker.start(cfg) == ""
    tracker.log_params_from_config(cfg)
    tracker.metrics_hook()(10, {"auc": 0.6})
    tracker.set_tags({"x": 1})
    tracker.log_artifact(tmp_path / "does-not-matter")
    tracker.log_dict({"a": 1}, "a.json")
    tracker.end("FAILED")
    assert tracker._client is None  # never even connected
    client = MlflowClient(uri)
    assert all_runs(client) == []
    assert client.get_experiment_by_name("synthetic_ctr") is None
    assert Tracker(uri, rank=1).start(cfg, run_id="abc") == "abc"  # a resumed id is passed through


def test_logging_before_start_is_an_error(uri: str) -> None:
    with pytest.raises(TrackingError, match="start"):
        Tracker(uri).log_metrics(1, {"auc": 0.5})


def test_experiment_name_is_configurable(uri: str, cfg: ExperimentConfig) -> None:
    run_id = Tracker(uri, experiment_name="ablation").start(cfg)
    client = MlflowClient(uri)
    assert client.get_experiment(client.get_run(run_id).info.experiment_id).name == "ablation"


def test_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / DEFAULT_DB_NAME}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_tracking_uri(None) == "http://tracking:5000"
    assert resolve_tracking_uri("") == "http://tracking:5000"
    assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"


def test_uri_normalisation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///rel/m.db") == f"sqlite:///{tmp_path / 'rel/m.db'}"
    assert resolve_tracking_uri("sqlite:///m.db?timeout=30") == f"sqlite:///{tmp_path / 'm.db'}?timeout=30"
    assert resolve_tracking_uri("store/m.db") == f"sqlite:///{tmp_path / 'store/m.db'}"
    with pytest.raises(TrackingError, match="file store"):
        resolve_tracking_uri("file:///tmp/mlruns")
    with pytest.raises(TrackingError, match="plain path"):
        resolve_tracking_uri("mlruns")


def test_default_uri_never_creates_mlruns(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                          template_db: Path, cfg: ExperimentConfig) -> None:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(template_db, work / DEFAULT_DB_NAME)  # spare the migrations; the URI is what is tested
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker()
    assert tracker.uri == f"sqlite:///{work / DEFAULT_DB_NAME}"
    run_id = tracker.start(cfg)
    tracker.log_params_from_config(cfg)
    tracker.log_dict({"a": 1}, "a.json")
    tracker.end()
    assert not (work / "mlruns").exists()
    assert sorted(p.name for p in work.iterdir()) == [ARTIFACTS_DIR_NAME, DEFAULT_DB_NAME]
    assert MlflowClient(tracker.uri).get_run(run_id).info.status == "FINISHED"


def test_list_runs_and_resolve_run(uri: str, cfg: ExperimentConfig) -> None:
    tracker = Tracker(uri)
    run_id = tracker.start(cfg)
    tracker.log_metrics(5, {"auc": 0.7123}, split="valid")
    tracker.set_tags({TAG_EMBEDDING_BYTES: 3 * 1024 * 1024, TAG_CHECKPOINT_DIR: "runs/x/ckpt"})
    tracker.end()
    other = ExperimentConfig(dataset_id="criteo", data_dir="y")
    other_id = Tracker(uri).start(other)

    rows = list_runs(uri)
    assert [r["run_id"] for r in rows] == [other_id, run_id]  # newest first, across experiments
    row = rows[1]
    assert row["name"] == cfg.expid and row["experiment"] == "synthetic_ctr"
    assert row["variant"] == "unified" and row["embedding_bytes"] == 3 * 1024 * 1024
    assert row["best_valid_auc"] == pytest.approx(0.7123) and row["status"] == "FINISHED"
    assert rows[0]["best_valid_auc"] is None and rows[0]["status"] == "RUNNING"
    assert len(list_runs(uri, max_results=1)) == 1

    table = format_runs_table(rows).splitlines()
    assert table[0].split() == ["run_id", "name", "experiment", "status", "variant", "bytes",
                                "best_valid_auc", "test_auc", "started"]
    assert run_id in table[2] and "3.0 MiB" in table[2] and "0.7123" in table[2]
    assert format_runs_table([]) == "no runs"

    info = resolve_run(uri, run_id)
    assert info["checkpoint_dir"] == "runs/x/ckpt" and info["experiment"] == "synthetic_ctr"
    assert info["params"] == {} and info["tags"][TAG_VARIANT] == "unified"
    assert info["artifact_uri"].endswith(f"{run_id}/artifacts")
    with pytest.raises(TrackingError, match="no MLflow run"):
        resolve_run(uri, "f" * 32)


def test_runs_list_shows_the_best_validation_auc_not_the_last(uri: str, cfg: ExperimentConfig) -> None:
    """A run's AUC rose, then fell (overfitting): the list shows its best; once the run logs
    ``best_valid_auc`` (the monitored best, whose checkpoint gave the test metrics), that one."""
    tracker = Tracker(uri)
    run_id = tracker.start(cfg)
    for step, auc in [(10, 0.70), (20, 0.74), (30, 0.72)]:
        tracker.log_metrics(step, {"auc": auc, "logloss": 0.5}, split="valid")
    assert list_runs(uri)[0]["best_valid_auc"] == pytest.approx(0.74)  # while it runs
    tracker.log_metrics(10, {"auc": 0.70}, split="best_valid")  # e.g. monitor {logloss: -1} chose step 10
    tracker.end()
    row = list_runs(uri)[0]
    assert row["run_id"] == run_id and row["best_valid_auc"] == pytest.approx(0.70)
    assert "0.7000" in format_runs_table([row]).splitlines()[1]


def test_reading_a_missing_store_creates_nothing(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'none.db'}"
    assert list_runs(uri) == []
    with pytest.raises(TrackingError, match="no MLflow store"):
        resolve_run(uri, "abc")
    assert list(tmp_path.iterdir()) == []


def test_flatten_config_writes_lists_and_empty_dicts_as_json() -> None:
    flat = flatten_config({"a": {"b": [1, "x"], "c": None, "d": {}}})
    assert flat == {"a.b": '[1, "x"]', "a.c": "None", "a.d": "{}"}


def test_long_params_are_truncated(uri: str, cfg: ExperimentConfig) -> None:
    cfg.model.params = {"note": "x" * 10_000}
    tracker = Tracker(uri)
    run_id = tracker.start(cfg)
    tracker.log_params_from_config(cfg)
    value = MlflowClient(uri).get_run(run_id).data.params["model.params.note"]
    assert len(value) == 6000 and value.endswith("...")


def test_import_does_not_load_mlflow_or_torch() -> None:
    code = (
        "import sys, recemb.tracking as t\n"
        "tr = t.Tracker('sqlite:////nonexistent/x.db', rank=1)\n"
        "tr.log_metrics(1, {'auc': 0.5})\n"
        "assert 'mlflow' not in sys.modules, 'mlflow imported'\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)



class FakeDist:
    """Stands in for ``torch.distributed`` with a running group (importing torch costs seconds)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_rank(self) -> int:
        return self.rank

    def get_world_size(self) -> int:
        return self.world_size


def test_a_running_process_group_decides_the_rank(uri: str, cfg: ExperimentConfig,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The explicit rank only counts when no process group is running.
    monkeypatch.setitem(sys.modules, "torch.distributed", FakeDist(rank=1, world_size=4))
    assert not Tracker(uri, rank=0).enabled
    monkeypatch.setitem(sys.modules, "torch.distributed", FakeDist(rank=0, world_size=4))
    tracker = Tracker(uri, rank=1)
    assert tracker.enabled
    run_id = tracker.start(cfg)
    assert MlflowClient(uri).get_run(run_id).data.tags["recemb.world_size"] == "4"


def test_a_finished_training_run_lists_its_monitored_best(make_experiment: Any, tmp_path: Path) -> None:
    from pipelines.train import run_train

    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    try:
        result = run_train(make_experiment("lr", "train.epochs=2", "train.monitor={logloss: -1}"), mlflow_uri=uri)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    row = list_runs(uri)[0]
    assert row["best_valid_auc"] == pytest.approx(result.best_valid["auc"])
    assert row["test_auc"] == pytest.approx(result.test["auc"])
