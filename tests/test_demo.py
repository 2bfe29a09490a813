"""The whole-life demo at a tiny size: every stage runs and its figures are consistent; a second
run in the same folder makes a new run folder and new MLflow runs and names the first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dist_utils import in_process_run

from pipelines.demo import run_demo


@pytest.mark.slow  # ~2 minutes: outside `make test`, but .ci/run runs it after the suite
@pytest.mark.usefixtures("no_process_group")
def test_demo_whole_life_tiny(tmp_path: Path) -> None:
    with in_process_run():  # in-process training: one torch thread
        _check_two_runs(tmp_path)


def _check_two_runs(tmp_path: Path) -> None:
    first = run_demo(tmp_path, rows=20_000, events=4_000, workers=0, ape_epochs=3)
    assert first["rejected_rows"] == {"ctr": 3, "events": 2}  # the injected bad rows, quarantined
    assert Path(first["ab"]["report"]).is_file() and first["ab"]["verdicts"]
    assert set(first["ab"]["auc_delta"]) == {"demo_deepfm_unified"}
    full, unified = first["runs"]["full"], first["runs"]["unified"]
    assert unified["embedding_bytes"] <= full["embedding_bytes"] / 50
    exported = first["export"]
    assert exported["max_logit_gap"] < 1e-4 and Path(exported["bundle"], "manifest.json").is_file()
    best = first["runs"][exported["arm"]]["test"]["auc"]
    assert abs(exported["served_auc"] - best) < 1e-4
    anomaly = first["anomaly"]  # quality needs the default sizes (make demo); here: the stage ran and reports
    assert 0.0 <= anomaly["auc"] <= 1.0 and 0.0 < anomaly["frequency_auc"] < 1.0 and anomaly["mlflow_run_id"]
    assert json.loads((Path(first["folder"]) / "summary.json").read_text())["folder"] == first["folder"]

    second = run_demo(tmp_path, rows=3_000, events=1_000, workers=0, ape_epochs=1)
    assert second["previous"] == first["folder"] and second["folder"] != first["folder"]
    assert second["runs"]["full"]["mlflow_run_id"] != full["mlflow_run_id"]
