"""Given splits: whole files per split (``split.files``) and a split column (``split.column``).

Public benchmarks come with their own train/valid/test files, and many logs carry a fold
column; both must prepare without workarounds, every row ending in its split or in the
rejects file, vocabularies and counts from the train split only.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from recemb.data.preprocess import prepare_dataset
from recemb.data.schema import FeatureMap, dataset_from_dict
from recemb.errors import ConfigError, DataError


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def split_rows(out: Path) -> dict[str, list[dict[str, Any]]]:
    fm = FeatureMap.load(out)
    return {s: [r for f in fm.shards[s] for r in pq.read_table(out / f).to_pylist()] for s in fm.shards}


def cfg(tmp: Path, **kw: Any) -> Any:
    raw = {"dataset_id": "g", "format": "csv", "label": "y",
           "features": [{"name": "a", "kind": "sparse"}, {"name": "x", "kind": "dense"}], **kw}
    return dataset_from_dict(raw, where="test")


def test_given_split_files_keep_their_rows(tmp_path: Path) -> None:
    header = ["y", "a", "x"]
    tr = write_csv(tmp_path / "train.csv", header, [[i % 2, f"a{i % 3}", i] for i in range(30)])
    va = write_csv(tmp_path / "valid.csv", header, [[1, "a1", 1.0], [0, "zz", 2.0]])
    te = write_csv(tmp_path / "test.csv", header, [[0, "a2", 3.0], [1, "new", 4.0], [0, "a0", 5.0]])
    c = cfg(tmp_path, split={"files": {"train": [str(tr)], "valid": [str(va)], "test": [str(te)]}})
    report = prepare_dataset(c, tmp_path / "out")
    rows = split_rows(tmp_path / "out")
    assert [len(rows[s]) for s in ("train", "valid", "test")] == [30, 2, 3]
    assert report.rows_in == 35
    fm = FeatureMap.load(tmp_path / "out")
    # vocabularies come from the train file only: the valid/test-only values are OOV
    info = fm.feature("a")
    assert [r["a"] for r in rows["test"]][1] == info.oov_id and rows["valid"][1]["a"] == info.oov_id
    assert sum(r["label"] for r in rows["test"]) == 1


def test_given_train_files_hold_out_a_valid_share(tmp_path: Path) -> None:
    header = ["y", "a", "x"]
    tr = write_csv(tmp_path / "train.csv", header, [[i % 2, f"a{i % 3}", i] for i in range(2000)])
    te = write_csv(tmp_path / "test.csv", header, [[0, "a2", 3.0]])
    c = cfg(tmp_path, split={"files": {"train": [str(tr)], "test": [str(te)]}, "valid": 0.1, "seed": 3})
    prepare_dataset(c, tmp_path / "out")
    rows = split_rows(tmp_path / "out")
    assert len(rows["train"]) + len(rows["valid"]) == 2000 and len(rows["test"]) == 1
    assert 150 < len(rows["valid"]) < 250
    c0 = cfg(tmp_path, split={"files": {"train": [str(tr)], "test": [str(te)]}, "valid": 0.0})
    prepare_dataset(c0, tmp_path / "out0")
    assert {s: len(v) for s, v in split_rows(tmp_path / "out0").items()} == {"train": 2000, "valid": 0, "test": 1}


def test_split_column_names_each_rows_split_and_rejects_others(tmp_path: Path) -> None:
    header = ["y", "a", "x", "fold"]
    folds = ["train", "TRAIN", " valid ", "validation", "dev", "test", "Test", "holdout", ""]
    rows_in = [[i % 2, f"a{i % 2}", i, f] for i, f in enumerate(folds)]
    src = write_csv(tmp_path / "all.csv", header, rows_in)
    c = cfg(tmp_path, paths=[str(src)], split={"column": "fold"}, max_reject_fraction=0.5)
    report = prepare_dataset(c, tmp_path / "out")
    rows = split_rows(tmp_path / "out")
    assert [len(rows[s]) for s in ("train", "valid", "test")] == [2, 3, 2]
    with open(tmp_path / "out" / "rejects" / "rejects.csv", newline="") as f:
        reasons = {int(r["line"]): r["reason"] for r in csv.DictReader(f)}
    assert "'holdout'" in reasons[9] and "fold" in reasons[9]
    assert "missing split 'fold'" in reasons[10]
    assert report.rows_rejected == 2


def test_events_files_without_label_or_count(tmp_path: Path) -> None:
    """An unlabelled training log with counts and a labelled test file without counts prepare together."""
    tr = write_csv(tmp_path / "train.csv", ["u", "h", "count"], [["u1", "h1", 5], ["u2", "h1", 1], ["u1", "h2", 2]])
    te = write_csv(tmp_path / "test.csv", ["u", "h", "label"], [["u1", "h1", 1], ["u9", "h2", -1]])
    c = dataset_from_dict({"dataset_id": "ev", "format": "events", "label": "label", "count_column": "count",
                           "features": [{"names": ["u", "h"], "kind": "sparse"}],
                           "split": {"files": {"train": [str(tr)], "test": [str(te)]}, "valid": 0.0}}, where="t")
    prepare_dataset(c, tmp_path / "out")
    rows = split_rows(tmp_path / "out")
    assert [r["count"] for r in rows["train"]] == [5, 1, 2] and [r["label"] for r in rows["train"]] == [0, 0, 0]
    assert [r["count"] for r in rows["test"]] == [1, 1] and [r["label"] for r in rows["test"]] == [1, -1]
    counts = FeatureMap.load(tmp_path / "out").id_counts("u")
    assert counts is not None and sorted(np.asarray(counts).tolist())[-2:] == [1, 7]  # train counts only


def test_split_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="one rule"):
        cfg(tmp_path, paths=["x.csv"], split={"column": "f", "time_column": "t"})
    with pytest.raises(ConfigError, match="not both"):
        cfg(tmp_path, paths=["x.csv"], split={"files": {"train": ["a.csv"]}})
    with pytest.raises(ConfigError, match="at least one train file"):
        cfg(tmp_path, split={"files": {"test": ["a.csv"]}})
    with pytest.raises(ConfigError, match="splits are train, valid, test"):
        cfg(tmp_path, split={"files": {"train": ["a.csv"], "holdout": ["b.csv"]}})
    with pytest.raises(ConfigError, match="needs input files"):
        cfg(tmp_path)
    a = write_csv(tmp_path / "a.csv", ["y", "a", "x"], [[0, "a", 1]])
    with pytest.raises(DataError, match="twice"):
        prepare_dataset(cfg(tmp_path, split={"files": {"train": [str(a)], "test": [str(a)]}}), tmp_path / "o")
