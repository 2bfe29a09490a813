"""Bad settings are refused at config time, as one line naming the key, for every model.

Each case here was accepted before (exit 0 or a traceback deep in training): LR trained
with an unknown embedding kind, NaN or negative learning rates, a run folder named
``../..``, ``cluster.workers=-3``, overrides after ``--resume``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipelines.train import apply_cluster_args, check_experiment, run_train
from recemb.cli import main, parse_args
from recemb.config.experiment import (
    ClusterConfig,
    EmbeddingConfig,
    EmbeddingGroup,
    ModelConfig,
    load_experiment,
)
from recemb.errors import ConfigError
from recemb.models.registry import check_model_config, model_names
from recemb.tracking import list_runs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LR = CONFIGS / "experiments" / "lr_synthetic_ctr.yaml"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("embedding.lr=.nan", "'embedding.lr' expects a finite number, got nan"),
        ("embedding.lr=.inf", "'embedding.lr' expects a finite number, got inf"),
        ("embedding.lr=-0.01", "embedding lr and eps must be > 0"),
        ("embedding.lr=0", "embedding lr and eps must be > 0"),
        ("embedding.eps=0", "embedding lr and eps must be > 0"),
        ("embedding.init_std=-1", "embedding init_std must be > 0"),
        ("embedding.l2=-1", "weight_decay, l2 and initial_accumulator must be >= 0"),
        ("train.dense_lr=-0.001", "dense_lr must be > 0"),
        ("train.dense_lr=.nan", "'train.dense_lr' expects a finite number"),
        ("train.eval_batch_size=0", "eval_batch_size must be >= 1"),
        ("train.max_steps=-1", "these must be >= 0: {'max_steps': -1}"),
        ("train.patience=-2", "these must be >= 0: {'patience': -2}"),
        ("train.monitor={acc: 1}", "monitor names metrics to weight"),
        ("train.clip_grad_norm=-1", "dense_weight_decay and clip_grad_norm must be >= 0"),
        ("cluster.workers=-3", "workers must be 0 (train in this process) or a number of Ray workers"),
        ("cluster.cpus_per_worker=0", "cpus_per_worker must be > 0"),
        ("cluster.max_failures=-2", "max_failures must be >= 0, or -1"),
        ("expid=../../escape", "expid '../../escape' is not a safe file name"),
        ("expid=/tmp/abs", "expid '/tmp/abs' is not a safe file name"),
        ("expid=.hidden", "expid '.hidden' is not a safe file name"),
        ("embedding.groups=[{features: [], kind: full}]", "groups[0] names no features"),
        ("embedding.groups=[{features: [C1], budget: -0.1}]", "groups[0].budget must be > 0"),
        ("train.shuffle_rows=-1", "these must be >= 0: {'shuffle_rows': -1}"),
        ("train.eval_every_steps=-5", "these must be >= 0: {'eval_every_steps': -5}"),
        ("train.output_dir=' '", "output_dir must name a folder"),
        ("cluster.cpus_per_worker=2000", "cpus_per_worker must be > 0"),
        ("dataset_id=../x", "is not a safe file name"),
        ("embedding.groups=[{features: [C1], dim: 0}]", "groups[0].dim must be >= 1"),
    ],
)
def test_bad_numeric_and_path_settings_are_config_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_experiment(LR, [override])
    assert message in str(err.value)
    assert str(LR) in str(err.value)


@pytest.mark.parametrize("model", model_names())
@pytest.mark.parametrize(
    ("embedding", "message"),
    [
        (EmbeddingConfig(kind="bogus"), "embedding.kind 'bogus' is unknown"),
        (EmbeddingConfig(params={"bogus": 1}), "embedding.params: unknown key 'bogus'"),
        (EmbeddingConfig(kind="hashed", params={"row": 10}), "embedding.params: unknown key 'row'"),
        (EmbeddingConfig(groups=[EmbeddingGroup(features=["C1"], kind="nope")]), "embedding.kind 'nope' is unknown"),
    ],
)
def test_every_model_checks_the_whole_embedding_block(model: str, embedding: EmbeddingConfig,
                                                      message: str) -> None:
    # LR builds only first-order tables, which drop params: it used to train on regardless.
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_model_config(ModelConfig(name=model), embedding)


def test_group_naming_a_missing_feature_is_refused_before_a_run_is_tracked(
        make_experiment, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = make_experiment("lr", "embedding.groups=[{features: [C1, no_such_field], kind: full}]")
    with pytest.raises(ConfigError, match="unknown sparse feature 'no_such_field'"):
        check_experiment(cfg)
    with pytest.raises(ConfigError, match="unknown sparse feature 'no_such_field'"):
        run_train(cfg, mlflow_uri=uri)
    # Refused before MLflow: no FAILED run left behind.
    assert list_runs(uri) == []


def test_config_show_refuses_what_train_would_refuse(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--config", str(LR), "embedding.kind=bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recemb: error: embedding.kind 'bogus' is unknown") and "Traceback" not in err
    assert main(["config", "show", "--config", str(LR), "model.params={bogus: 1}"]) == 2
    assert "model.params: unknown key 'bogus'" in capsys.readouterr().err


def test_command_line_workers_are_validated_like_the_file() -> None:
    with pytest.raises(ConfigError, match="got -3"):
        apply_cluster_args(ClusterConfig(), workers=-3, address=None, mlflow_uri=None)
    assert apply_cluster_args(ClusterConfig(), workers=2, address="", mlflow_uri=None).workers == 2


def test_overrides_may_follow_or_surround_options(capsys: pytest.CaptureFixture[str]) -> None:
    # Before: argparse refused the words after --resume ("unrecognized arguments: train.max_steps=3").
    args = parse_args(["train", "--config", "x.yaml", "train.epochs=2", "--resume", "runs/r", "train.max_steps=3"])
    assert args.overrides == ["train.epochs=2", "train.max_steps=3"]
    assert args.resume == Path("runs/r")
    assert main(["config", "show", "--config", str(LR), "train.epochs=2", "--config", str(LR), "train.seed=7"]) == 0
    shown = capsys.readouterr().out
    assert "epochs: 2" in shown and "seed: 7" in shown
    with pytest.raises(SystemExit) as exc:
        parse_args(["train", "--config", "x.yaml", "a=1", "--resume", "r", "stray"])
    assert exc.value.code == 2
    assert "unrecognized arguments: stray" in capsys.readouterr().err


def test_feature_map_paths_may_not_leave_its_folder(prepared_ctr: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from recemb.data.schema import FeatureMap
    from recemb.errors import DataError

    copy = tmp_path / "prepared"
    shutil.copytree(prepared_ctr, copy)
    data = json.loads((copy / "feature_map.json").read_text())
    data["shards"]["train"][0] = "../../etc/passwd"
    (copy / "feature_map.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="leads outside"):
        FeatureMap.load(copy)
    (copy / "feature_map.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="a feature map is a JSON object"):
        FeatureMap.load(copy)
    data["shards"]["train"][0] = "train/part-00000.parquet"
    data["version"] = 99
    (copy / "feature_map.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="version 99 is newer"):
        FeatureMap.load(copy)
