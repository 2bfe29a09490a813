"""``pipelines.train.run_train`` in this process: MLflow tracking and resume by run id."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from pipelines.train import run_train
from recemb.errors import RecembError
from recemb.tracking import resolve_run


@pytest.fixture(autouse=True)
def no_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_resume_by_mlflow_run_id_continues_training(make_experiment, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    first = run_train(make_experiment("dcnv2", "train.epochs=1"), workers=0, mlflow_uri=uri)
    dist.destroy_process_group()
    run = resolve_run(uri, first.run_id)
    assert run["status"] == "FINISHED"
    assert Path(run["checkpoint_dir"]).is_dir()
    assert run["metrics"]["test_auc"] == pytest.approx(first.test["auc"])
    second = run_train(make_experiment("dcnv2", "train.epochs=2"), workers=0, mlflow_uri=uri,
                       resume=first.run_id)
    assert second.steps == 2 * first.steps
    assert second.run_id != first.run_id
    assert resolve_run(uri, second.run_id)["tags"]["recemb.resumed_from"].endswith("last")


def test_resume_refuses_unknown_reference(make_experiment, tmp_path: Path) -> None:
    with pytest.raises(RecembError, match="not an MLflow run id"):
        run_train(make_experiment("dcnv2"), workers=0, mlflow_uri=f"sqlite:///{tmp_path / 'm.db'}",
                  resume="no-such-run")


def test_a_picked_batch_is_logged_as_the_batch_trained_with(make_experiment, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """``train.batch_size=0`` is resolved before the run is tracked: MLflow's param, the run's
    saved config and the printed line all name the batch the run trained with, never 0."""
    from mlflow.tracking import MlflowClient

    from recemb.data.schema import FeatureMap
    from recemb.train.loop import auto_batch_size, epoch_train_rows

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = make_experiment("dcnv2", "train.epochs=1", "train.batch_size=0")
    rows = epoch_train_rows(cfg.train, FeatureMap.load(Path(cfg.data_dir) / "feature_map.json"), cfg.data_dir)
    picked = auto_batch_size(rows)
    result = run_train(cfg, workers=0, mlflow_uri=uri)
    assert 0 < picked < 4096
    assert MlflowClient(uri).get_run(result.run_id).data.params["train.batch_size"] == str(picked)
    saved = (Path(cfg.train.output_dir) / cfg.expid / "config.yaml").read_text()
    assert f"batch_size: {picked}\n" in saved
    out = capsys.readouterr().out
    assert f"[train] batch_size {picked:,} ({rows:,} rows an epoch" in out and out.count("[train] batch_size") == 1
