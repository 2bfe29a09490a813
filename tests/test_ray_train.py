"""Training on a real local Ray (2 Train workers, sharded tables) tracked in a real MLflow store.

The fast test runs one short 2-worker job end to end; the slow one kills a worker
mid-epoch and checks that the run restarts from the last epoch checkpoint, trains
every row exactly once per epoch, and ends with the uninterrupted run's metrics.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.train import run_train
from recemb.data.schema import FeatureMap
from recemb.tracking import list_runs, resolve_run


def _train_rows(data_dir: Path, world: int) -> int:
    """Rows a world of ``world`` workers trains per epoch (equal splits drop < world rows)."""
    rows = FeatureMap.load(data_dir / "feature_map.json").rows["train"]
    return rows // world * world


def test_two_workers_on_local_ray_tracked_in_mlflow(ray_local: object, make_experiment, prepared_ctr: Path,
                                                    tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = make_experiment("dcnv2", "embedding.sharding=row_wise", "train.epochs=1")
    result = run_train(cfg, workers=2, mlflow_uri=uri)
    assert result.test["auc"] > 0.55
    assert result.test["count"] > 0
    runs = list_runs(uri)
    assert [r["run_id"] for r in runs] == [result.run_id]
    assert runs[0]["status"] == "FINISHED"
    run = resolve_run(uri, result.run_id)
    assert run["tags"]["recemb.world_size"] == "2"
    assert int(run["tags"]["recemb.embedding_bytes"]) == result.embedding_bytes
    assert run["metrics"]["train_rows_epoch0"] == _train_rows(prepared_ctr, 2)
    assert run["metrics"]["test_auc"] == pytest.approx(result.test["auc"])
    assert run["params"]["embedding.sharding"] == "row_wise"
    # The same experiment again, same folders: a new run that trains, not a restore of the old one.
    again = run_train(make_experiment("dcnv2", "embedding.sharding=row_wise", "train.epochs=1"), workers=2,
                      mlflow_uri=uri)
    rerun = resolve_run(uri, again.run_id)
    assert "recemb.restored_from" not in rerun["tags"]
    assert rerun["metrics"]["train_rows_epoch0"] == _train_rows(prepared_ctr, 2)


@pytest.mark.slow
def test_killed_worker_resumes_from_epoch_checkpoint(ray_local: object, make_experiment, prepared_ctr: Path,
                                                     tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    overrides = ("embedding.sharding=row_wise", "train.epochs=2", "train.shuffle_rows=0")
    clean = run_train(make_experiment("dcnv2", *overrides, output_dir=tmp_path / "a"), workers=2, mlflow_uri=uri)
    steps_per_epoch = clean.steps // 2
    marker = tmp_path / "killed.txt"
    fail = {"rank": 1, "step": steps_per_epoch + steps_per_epoch // 2, "marker": str(marker)}
    killed = run_train(make_experiment("dcnv2", *overrides, output_dir=tmp_path / "b"), workers=2,
                       mlflow_uri=uri, fail=fail)
    assert marker.exists(), "the failure was never injected"
    assert killed.steps == clean.steps
    assert killed.test["auc"] == pytest.approx(clean.test["auc"], abs=2e-3)
    assert killed.test["logloss"] == pytest.approx(clean.test["logloss"], abs=2e-3)
    run = resolve_run(uri, killed.run_id)
    assert "recemb.restored_from" in run["tags"]
    expected = _train_rows(prepared_ctr, 2)
    assert run["metrics"]["train_rows_epoch0"] == expected
    assert run["metrics"]["train_rows_epoch1"] == expected
