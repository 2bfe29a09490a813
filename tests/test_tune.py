"""``recemb tune``: the search space's checks (before anything starts), and a real Tune run of
four tiny trials tracked as MLflow children of one parent, whose ``best.yaml`` reproduces the
best trial's config."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from recemb.config.experiment import load_experiment
from recemb.errors import ConfigError
from recemb.search_space import Distribution, apply_overrides, check_space, space_from_dict


@pytest.mark.parametrize(("space", "message"), [
    ({"embedding.lr": {"logunifrom": [1e-3, 0.3]}}, "embedding.lr: unknown distribution 'logunifrom'"),
    ({"embedding.lr": {"loguniform": [0.0, 0.3]}}, "embedding.lr: loguniform needs low > 0"),
    ({"embedding.lr": {"uniform": [0.3, 0.1]}}, "embedding.lr: uniform needs finite low < high"),
    ({"embedding.dim": {"randint": [4, 8.5]}}, "embedding.dim: randint needs two integers"),
    ({"train.batch_size": {"choice": []}}, "train.batch_size: choice needs a non-empty list"),
    ({"train.batch_size": {"choice": 256}}, "train.batch_size: choice expects a list"),
    ({"embedding.lr": {"uniform": [0.1, 0.2], "choice": [1]}}, "embedding.lr: expected one distribution"),
    ({"train.monitor.auc": {"uniform": [0.0, 1.0]}}, "train.monitor.auc: 'train.monitor' cannot vary"),
    ({"cluster.workers": {"choice": [0, 1]}}, "cluster.workers: 'cluster' cannot vary"),
    ({"embedding..lr": {"choice": [1]}}, "is not a key.sub override key"),
    ([1, 2], "maps override keys to distributions"),
])
def test_malformed_space_is_one_line_naming_the_key(space: object, message: str) -> None:
    with pytest.raises(ConfigError, match="space.yaml") as info:
        space_from_dict(space, where="space.yaml")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("space", "message"), [
    ({"embedding.lrr": {"loguniform": [1e-3, 0.3]}}, "embedding.lrr=0.001: unknown key 'embedding.lrr'"),
    ({"train.batch_size": {"choice": [256, "big"]}}, "train.batch_size=big: 'train.batch_size' expects int"),
    ({"embedding.lr": {"uniform": [-1.0, 0.3]}}, "embedding.lr=-1.0: embedding: embedding lr and eps must be > 0"),
    ({"embedding.kind": {"choice": ["full", "nosuchkind"]}}, "embedding.kind=nosuchkind"),
    ({"model.params.dropotu": {"uniform": [0.0, 0.5]}}, "model.params.dropotu=0.0"),
])
def test_space_the_experiment_refuses_names_the_key(make_experiment, space: object, message: str) -> None:
    from pipelines.train import check_experiment

    cfg = make_experiment("deepfm")
    fm = check_experiment(cfg)
    from recemb.train.preflight import check_run

    with pytest.raises(ConfigError) as info:
        check_space(space_from_dict(space, "space.yaml"), cfg, "space.yaml", check=lambda c: check_run(c, fm))
    text = str(info.value)
    assert text.startswith("space.yaml: ") and message in text and "\n" not in text


def test_space_edges_and_overrides(make_experiment) -> None:
    space = space_from_dict({"embedding.dim": {"randint": [4, 8]}, "model.params.mlp": {"choice": [[8], [16, 8]]}})
    assert space.edge_overrides() == [
        {"embedding.dim": 4}, {"embedding.dim": 8}, {"model.params.mlp": [8]}, {"model.params.mlp": [16, 8]},
        {"embedding.dim": 4, "model.params.mlp": [8]}, {"embedding.dim": 8, "model.params.mlp": [16, 8]}]
    cfg = apply_overrides(make_experiment("deepfm"), {"embedding.dim": 8, "model.params.mlp": [16, 8]})
    assert cfg.embedding.dim == 8 and cfg.model.params["mlp"] == [16, 8]
    import random

    rng = random.Random(0)
    draws = [Distribution("randint", (4, 8)).sample(rng) for _ in range(200)]
    assert set(draws) == {4, 5, 6, 7, 8}


def test_tune_refuses_a_bad_space_before_any_side_effect(make_experiment, tmp_path: Path) -> None:
    from pipelines.tune import run_tune

    space = tmp_path / "space.yaml"
    space.write_text("embedding.lr: {loguniform: [1.0e-3, 0.3]}\nembedding.nope: {choice: [1, 2]}\n")
    with pytest.raises(ConfigError, match="unknown key 'embedding.nope'"):
        run_tune(make_experiment("deepfm"), space, trials=2, out=tmp_path / "out",
                 mlflow_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlruns.db").exists()


@pytest.mark.slow  # about 75 s on 2 cores: each trial process imports torch and torchrec
def test_tune_runs_trials_as_mlflow_children_and_best_yaml_reproduces_the_best(
        ray_local: object, make_experiment, tmp_path: Path, no_process_group: None) -> None:
    from mlflow import MlflowClient

    from pipelines.tune import run_tune

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    space = tmp_path / "space.yaml"
    space.write_text("embedding.lr: {loguniform: [1.0e-3, 0.3]}\ntrain.batch_size: {choice: [512, 2048]}\n")
    base = make_experiment("deepfm", "train.epochs=2", "embedding.sharding=table_wise")
    out = tmp_path / "out"
    result = run_tune(base, space, trials=4, workers=2, out=out, mlflow_uri=uri, seed=1)

    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == len(result.trials) == 4
    assert {r["status"] for r in rows} <= {"finished", "stopped"}
    assert any(r["status"] == "finished" for r in rows)
    assert len({r["embedding.lr"] for r in rows}) == 4  # four distinct draws
    assert json.loads((out / "trials.json").read_text())[0]["trial"] == result.best.trial
    assert result.best.best_score == max(t.best_score for t in result.trials)
    assert 0.5 < result.best.best_score <= 1.0  # monitor {auc: 1}: the best validation AUC
    for trial in result.trials:  # every trial's best evaluation, stopped ones too
        assert trial.best_valid["auc"] == pytest.approx(trial.best_score)

    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_score"] == pytest.approx(result.best.best_score)
    assert parent.data.tags["recemb.tune.best_run_id"] == result.best.run_id
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert sorted(c.info.run_id for c in children) == sorted(t.run_id for t in result.trials)
    by_status = {t.run_id: t.status for t in result.trials}
    for child in children:
        assert child.info.status == {"finished": "FINISHED", "stopped": "KILLED"}[by_status[child.info.run_id]]
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"trials.csv", "trials.json", "best.yaml", "space.yaml"} <= artifacts

    best = load_experiment(result.best_config)
    trial = yaml.safe_load((out / "trials" / result.best.trial / "config.yaml").read_text())
    assert best.embedding.lr == result.best.params["embedding.lr"] == trial["embedding"]["lr"]
    assert best.train.batch_size == result.best.params["train.batch_size"] == trial["train"]["batch_size"]
    mine, theirs = best.to_dict(), dict(trial)
    for d in (mine, theirs):
        d.pop("expid"), d.pop("cluster")
        d["train"].pop("output_dir"), d["train"].pop("progress")
    assert mine == theirs
    assert result.command == f"recemb train --config {result.best_config}"
