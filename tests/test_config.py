"""Tests for recemb.config: typed ``from_dict``, overrides, ``base`` chains, dataset blocks, CLI.

Every error a user can make in a YAML file or on the command line must be a
``ConfigError`` naming the key (and the file), never a traceback from deep inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from recemb.cli import main
from recemb.config.experiment import ExperimentConfig, load_experiment
from recemb.config.loader import deep_merge, from_dict, parse_overrides, read_yaml, to_dict
from recemb.data.schema import dataset_from_dict, load_dataset_config
from recemb.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEEPFM = CONFIGS / "experiments" / "deepfm_synthetic_ctr.yaml"


@dataclass
class Inner:
    n: int = 1
    name: str = "x"


@dataclass
class Everything:
    """One field of every kind ``from_dict`` handles."""

    count: int
    rate: float = 0.5
    flag: bool = False
    label: str = "a"
    mode: Literal["fast", "slow"] = "fast"
    sizes: list[int] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)
    maybe: int | None = None
    pair: tuple[int, str] = (0, "")


# ----------------------------------------------------------------------------- from_dict


def test_from_dict_builds_every_kind_of_field() -> None:
    cfg = from_dict(Everything, {
        "count": 3, "rate": 2, "flag": True, "label": "b", "mode": "slow", "sizes": [1, 2],
        "weights": {"auc": 1, "logloss": -0.5}, "inner": {"n": 7}, "maybe": 4, "pair": [1, "z"],
    })
    assert cfg == Everything(count=3, rate=2.0, flag=True, label="b", mode="slow", sizes=[1, 2],
                             weights={"auc": 1.0, "logloss": -0.5}, inner=Inner(n=7, name="x"),
                             maybe=4, pair=(1, "z"))
    assert isinstance(cfg.rate, float) and isinstance(cfg.weights["auc"], float)
    assert from_dict(Everything, {"count": 1, "maybe": None}).maybe is None
    assert from_dict(Everything, {"count": 1}) == Everything(count=1)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"count": "3"}, "'count' expects int, got '3'"),
        ({"count": 2.0}, "'count' expects int, got 2.0"),
        ({"count": True}, "'count' expects int, got True"),
        ({"count": 1, "rate": "fast"}, "'rate' expects float, got 'fast'"),
        ({"count": 1, "rate": False}, "'rate' expects float, got False"),
        ({"count": 1, "flag": 1}, "'flag' expects bool (true/false), got 1"),
        ({"count": 1, "flag": "yes"}, "'flag' expects bool (true/false), got 'yes'"),
        ({"count": 1, "label": 5}, "'label' expects str, got 5"),
        ({"count": 1, "mode": "medium"}, "'mode' must be one of 'fast', 'slow', got 'medium'"),
        ({"count": 1, "sizes": 3}, "'sizes' expects a list, got 3"),
        ({"count": 1, "sizes": [1, "2"]}, "'sizes[1]' expects int, got '2'"),
        ({"count": 1, "weights": [1]}, "'weights' expects a mapping, got [1]"),
        ({"count": 1, "weights": {"auc": "high"}}, "'weights.auc' expects float, got 'high'"),
        ({"count": 1, "inner": 3}, "'inner' expects a mapping (Inner), got 3"),
        ({"count": 1, "inner": {"n": "many"}}, "'inner.n' expects int, got 'many'"),
        ({"count": 1, "maybe": "x"}, "'maybe' expects int | None, got 'x'"),
        ({"count": 1, "pair": [1]}, "'pair' expects 2 items, got 1"),
    ],
)
def test_from_dict_wrong_type_names_key_and_expected_type(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(Everything, data, where="exp.yaml")
    assert str(err.value) == f"exp.yaml: {message}"


def test_unknown_key_names_key_file_and_known_keys() -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(Everything, {"count": 1, "inner": {"m": 2}}, where="exp.yaml")
    assert str(err.value) == "exp.yaml: unknown key 'inner.m' (known keys of Inner: n, name)"


def test_missing_required_key() -> None:
    with pytest.raises(ConfigError, match=r"^exp\.yaml: missing required key 'count'$"):
        from_dict(Everything, {"rate": 1.0}, where="exp.yaml")


def test_post_init_value_error_becomes_config_error() -> None:
    with pytest.raises(ConfigError, match=r"embedding: embedding dim must be >= 1"):
        from_dict(ExperimentConfig, {"dataset_id": "x", "data_dir": "d", "embedding": {"dim": 0}})


def test_to_dict_round_trips_through_from_dict() -> None:
    cfg = Everything(count=2, sizes=[3], inner=Inner(n=4), pair=(5, "q"))
    plain = to_dict(cfg)
    assert plain["inner"] == {"n": 4, "name": "x"} and plain["pair"] == [5, "q"]
    assert from_dict(Everything, plain) == cfg


def test_deep_merge_merges_mappings_and_replaces_the_rest() -> None:
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    merged = deep_merge(base, {"a": {"y": [3]}, "c": 2})
    assert merged == {"a": {"x": 1, "y": [3]}, "b": 1, "c": 2}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 1}  # not modified


# ----------------------------------------------------------------------------- overrides


def test_parse_overrides_values_are_yaml_typed() -> None:
    parsed = parse_overrides([
        "a.b=1", "a.c=x", "x=[1,2]", "flag=true", "lr=1e-3", "eps=1.5e-8", "empty=", "m={k: 2}",
    ])
    assert parsed == {"a": {"b": 1, "c": "x"}, "x": [1, 2], "flag": True, "lr": 0.001, "eps": 1.5e-8,
                      "empty": "", "m": {"k": 2}}
    assert isinstance(parsed["lr"], float)


@pytest.mark.parametrize("item", ["noequals", "=5", "a..b=1", ".a=1", "a.=1"])
def test_bad_override_format(item: str) -> None:
    with pytest.raises(ConfigError, match=rf"command line: override '{item}' must look like key\.sub=value"):
        parse_overrides([item])


def test_override_conflicting_with_a_value() -> None:
    with pytest.raises(ConfigError, match="conflicts with another override"):
        parse_overrides(["a=1", "a.b=2"])


def test_overrides_are_typed_against_the_experiment() -> None:
    cfg = load_experiment(DEEPFM, ["train.epochs=3", "train.dense_lr=1e-4", "train.progress=false",
                                   "train.monitor={auc: 1, logloss: -1}", "data_dir=/somewhere"])
    assert cfg.train.epochs == 3
    assert cfg.train.dense_lr == pytest.approx(1e-4)
    assert cfg.train.progress is False
    assert cfg.train.monitor == {"auc": 1.0, "logloss": -1.0}
    assert cfg.data_dir == "/somewhere"
    assert cfg.expid == "deepfm_synthetic_ctr"


def test_wrong_type_override_names_key() -> None:
    with pytest.raises(ConfigError, match=r"'train\.epochs' expects int, got 'two'"):
        load_experiment(DEEPFM, ["train.epochs=two"])
    with pytest.raises(ConfigError, match=r"'embedding\.optimizer' must be one of .*got 'rmsprop'"):
        load_experiment(DEEPFM, ["embedding.optimizer=rmsprop"])


def test_unknown_override_key_lists_known_keys() -> None:
    with pytest.raises(ConfigError) as err:
        load_experiment(DEEPFM, ["train.epoch=2"])
    msg = str(err.value)
    assert msg.startswith(f"{DEEPFM}: unknown key 'train.epoch' (known keys of TrainConfig: ")
    assert "epochs" in msg and "batch_size" in msg


# ----------------------------------------------------------------------------- files


def _write(path: Path, data: dict[str, Any] | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


TOY_DATASET: dict[str, Any] = {
    "dataset_id": "toy", "format": "csv", "paths": ["toy.csv"],
    "features": [{"names": ["a", "b"], "kind": "sparse", "min_count": 2}, {"name": "x", "kind": "dense"}],
}


@pytest.fixture
def configs_dir(tmp_path: Path) -> Path:
    """A ``configs/`` tree with one dataset (``toy``) and a three-level ``base`` chain."""
    root = tmp_path / "configs"
    _write(root / "datasets" / "toy.yaml", TOY_DATASET)
    _write(root / "experiments" / "base.yaml",
           {"train": {"epochs": 3, "batch_size": 100, "patience": 5}, "embedding": {"dim": 4}})
    _write(root / "experiments" / "mid.yaml",
           {"base": "base.yaml", "train": {"batch_size": 200}, "embedding": {"lr": 0.5}})
    _write(root / "experiments" / "exp.yaml",
           {"base": "mid.yaml", "dataset_id": "toy", "train": {"epochs": 5}, "model": {"name": "fm"}})
    return root


def test_an_inherited_accumulator_is_ignored_for_sgd(configs_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """base.yaml's Adagrad accumulator means nothing for SGD: dropped with a note, not refused;
    set in the experiment's own file or on the command line, it is kept (preflight refuses it)."""
    from recemb.embeddings.sharding import check_initial_accumulator

    _write(configs_dir / "experiments" / "base.yaml", {"embedding": {"optimizer": "exact_rowwise_adagrad",
                                                                     "initial_accumulator": 1e-6}})
    _write(configs_dir / "experiments" / "sgd.yaml",
           {"base": "base.yaml", "dataset_id": "toy", "embedding": {"optimizer": "exact_sgd"}})
    with caplog.at_level("WARNING", logger="recemb.config"):
        cfg = load_experiment(configs_dir / "experiments" / "sgd.yaml")
    assert (cfg.embedding.optimizer, cfg.embedding.initial_accumulator) == ("exact_sgd", 0.0)
    check_initial_accumulator(cfg.embedding)
    assert [r.getMessage() for r in caplog.records] == [
        f"[config] {configs_dir / 'experiments' / 'sgd.yaml'}: embedding.initial_accumulator=1e-06 (inherited) "
        "means nothing for embedding.optimizer=exact_sgd: ignored"]
    # The same from the command line, with the base file's own optimizer.
    exp = configs_dir / "experiments" / "exp.yaml"
    _write(exp, {"base": "base.yaml", "dataset_id": "toy"})
    assert load_experiment(exp).embedding.initial_accumulator == 1e-6  # Adagrad: kept
    assert load_experiment(exp, ["embedding.optimizer=adam"]).embedding.initial_accumulator == 0.0
    # Asked for explicitly: kept, and refused before a run starts.
    for own, given in (({"embedding": {"optimizer": "exact_sgd", "initial_accumulator": 0.1}}, []),
                       ({}, ["embedding.optimizer=exact_sgd", "embedding.initial_accumulator=0.1"])):
        _write(exp, {"base": "base.yaml", "dataset_id": "toy", **own})
        cfg = load_experiment(exp, given)
        assert cfg.embedding.initial_accumulator == 0.1
        with pytest.raises(ConfigError, match="initial_accumulator=0.1 needs an Adagrad optimizer"):
            check_initial_accumulator(cfg.embedding)


def test_the_shipped_base_trains_sgd_without_edits() -> None:
    cfg = load_experiment(DEEPFM, ["embedding.optimizer=exact_sgd"])
    assert cfg.embedding.initial_accumulator == 0.0


def test_base_chain_merges_in_order(configs_dir: Path) -> None:
    cfg = load_experiment(configs_dir / "experiments" / "exp.yaml", ["train.patience=1"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.patience) == (5, 200, 1)
    assert (cfg.embedding.dim, cfg.embedding.lr) == (4, 0.5)
    assert cfg.model.name == "fm"
    assert cfg.expid == "fm_toy"


def test_dataset_id_resolves_the_dataset_file_and_inline_keys_override(configs_dir: Path) -> None:
    exp = _write(configs_dir / "experiments" / "inline.yaml",
                 {"dataset_id": "toy", "dataset": {"output": "elsewhere", "split": {"seed": 3}}})
    cfg = load_experiment(exp)
    assert cfg.dataset is not None
    assert [f.name for f in cfg.dataset.features] == ["a", "b", "x"]
    assert cfg.dataset.output == "elsewhere" and cfg.data_dir == "elsewhere"
    assert cfg.dataset.split.seed == 3 and cfg.dataset.split.train == 0.8
    assert load_experiment(configs_dir / "experiments" / "exp.yaml").data_dir == "data/toy"


def test_missing_dataset_and_data_dir(configs_dir: Path) -> None:
    exp = _write(configs_dir / "experiments" / "nodata.yaml", {"dataset_id": "nosuch"})
    with pytest.raises(ConfigError, match=r"no dataset file .*nosuch\.yaml and no 'data_dir' given"):
        load_experiment(exp)
    assert load_experiment(exp, ["data_dir=prepared"]).data_dir == "prepared"
    noid = _write(configs_dir / "experiments" / "noid.yaml", {"train": {"epochs": 1}})
    with pytest.raises(ConfigError, match="missing 'dataset_id'"):
        load_experiment(noid)


def test_base_loop_is_detected(configs_dir: Path) -> None:
    a = _write(configs_dir / "experiments" / "a.yaml", {"base": "b.yaml", "dataset_id": "toy"})
    _write(configs_dir / "experiments" / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match=r"'base' chain loops back to .*a\.yaml"):
        load_experiment(a)
    me = _write(configs_dir / "experiments" / "me.yaml", {"base": "me.yaml", "dataset_id": "toy"})
    with pytest.raises(ConfigError, match="loops back"):
        load_experiment(me)


def test_missing_base_file(configs_dir: Path) -> None:
    exp = _write(configs_dir / "experiments" / "orphan.yaml", {"base": "gone.yaml", "dataset_id": "toy"})
    with pytest.raises(ConfigError, match=r"gone\.yaml: config file not found"):
        load_experiment(exp)


def test_read_yaml_errors(tmp_path: Path) -> None:
    assert read_yaml(_write(tmp_path / "empty.yaml", "")) == {}
    assert read_yaml(_write(tmp_path / "sci.yaml", "lr: 1e-3\n")) == {"lr": 0.001}
    with pytest.raises(ConfigError, match="top level must be a mapping, got list"):
        read_yaml(_write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(_write(tmp_path / "bad.yaml", "a: [1, 2\n"))


# ----------------------------------------------------------------------------- datasets


def test_names_expand_to_one_feature_each() -> None:
    ds = dataset_from_dict(TOY_DATASET, where="toy.yaml")
    assert [(f.name, f.kind, f.min_count) for f in ds.features] == [
        ("a", "sparse", 2), ("b", "sparse", 2), ("x", "dense", 1)]
    assert ds.output == "data/toy"


def test_synthetic_dataset_config_has_every_criteo_feature() -> None:
    ds = load_dataset_config(CONFIGS / "datasets" / "synthetic_ctr.yaml")
    names = [f.name for f in ds.features]
    assert names == [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    assert all(f.log and f.standardize for f in ds.features[:13])
    assert all(f.kind == "sparse" and f.min_count == 2 for f in ds.features[13:])


def test_duplicate_feature_names() -> None:
    data = {**TOY_DATASET, "features": [*TOY_DATASET["features"], {"name": "b", "kind": "dense"}]}
    with pytest.raises(ConfigError, match=r"^toy\.yaml: .*duplicate feature name 'b'$"):
        dataset_from_dict(data, where="toy.yaml")


def test_name_and_names_together() -> None:
    data = {**TOY_DATASET, "features": [{"name": "a", "names": ["b"], "kind": "sparse"}]}
    with pytest.raises(ConfigError, match=r"features\[0\] has both 'name' and 'names'"):
        dataset_from_dict(data, where="toy.yaml")


@pytest.mark.parametrize("split", [{"train": 0.5, "valid": 0.1, "test": 0.1},
                                   {"train": 1.2, "valid": -0.1, "test": -0.1}])
def test_split_ratios_must_sum_to_one(split: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="split ratios must be >= 0 and sum to 1"):
        dataset_from_dict({**TOY_DATASET, "split": split}, where="toy.yaml")


def test_unknown_feature_key_names_the_feature_index() -> None:
    data = {**TOY_DATASET, "features": [{"name": "a", "kind": "sparse", "min_cnt": 2}]}
    with pytest.raises(ConfigError, match=r"toy\.yaml: unknown key 'features\[0\]\.min_cnt'"):
        dataset_from_dict(data, where="toy.yaml")


# ----------------------------------------------------------------------------- CLI


def test_config_show_round_trips(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--config", str(DEEPFM), "train.epochs=4", "embedding.dim=12"]) == 0
    out = capsys.readouterr().out
    shown = yaml.safe_load(out)
    assert shown == load_experiment(DEEPFM, ["train.epochs=4", "embedding.dim=12"]).to_dict()
    assert shown["train"]["epochs"] == 4 and shown["embedding"]["dim"] == 12
    assert shown["dataset"]["features"][0]["name"] == "I1"
    assert from_dict(ExperimentConfig, {**shown, "dataset": None}, where="shown").train.epochs == 4


def test_cli_user_error_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--config", str(DEEPFM), "train.epoch=2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("recemb: error: ") and "unknown key 'train.epoch'" in lines[0]
    assert "Traceback" not in captured.err
