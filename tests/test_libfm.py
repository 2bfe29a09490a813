"""libFM / libFFM input: fields become columns, bad lines go to the rejects with their line and reason."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from recemb.data.libfm import parse_lines
from recemb.data.preprocess import prepare_dataset
from recemb.data.schema import FeatureMap, dataset_from_dict


def rows_of(out: Path) -> dict[str, list[dict]]:
    fm = FeatureMap.load(out)
    return {s: [r for f in fm.shards[s] for r in pq.read_table(out / f).to_pylist()] for s in fm.shards}


def rejects(out: Path) -> dict[int, str]:
    with open(out / "rejects" / "rejects.csv", newline="") as f:
        return {int(r["line"]): r["reason"] for r in csv.DictReader(f)}


def test_parse_lines_fields_values_and_bad_tokens() -> None:
    t, bad, why = parse_lines(pa.array(["1 0:3:1 1:7:0.5", "0 1:2:1 1:9:1", "1 a:1:1", "0 0:1"]), "libffm",
                              ["label", "a", "b"])
    assert t.column("label").to_pylist()[:2] == ["1", "0"]
    assert t.column("a").to_pylist()[:2] == ["3", None] and t.column("b").to_pylist()[:2] == ["7", "2|9"]
    assert t.column("b_value").to_pylist()[0] == "0.5"
    assert bad.tolist() == [2, 3] and why == ["field index not a whole number", "token not field:idx:val"]
    t, bad, why = parse_lines(pa.array(["1 5:1 8:1", "0 6:1 8:1 9:1"]), "libfm", ["label", "u", "i"])
    assert t.column("u").to_pylist() == ["5", None] and bad.tolist() == [1]
    assert "more fields than the 2 named" in why[0]


def test_prepare_libfm_positional_fields(tmp_path: Path) -> None:
    """Frappe-style libFM (one idx:1 token per field, fixed order), fields named by column_names."""
    lines = [f"{i % 2} {100 + i % 5}:1 {200 + i % 3}:1 {300 + i % 7}:1" for i in range(60)] + ["1 5:1 6:1 7:1 8:1"]
    src = tmp_path / "train.libfm"
    src.write_text("\n".join(lines) + "\n")
    cfg = dataset_from_dict({"dataset_id": "frappe", "format": "libfm", "paths": [str(src)],
                             "column_names": ["label", "user", "item", "ctx"], "max_reject_fraction": 0.05,
                             "features": [{"names": ["user", "item", "ctx"], "kind": "sparse"}],
                             "split": {"train": 1.0, "valid": 0.0, "test": 0.0}}, where="t")
    report = prepare_dataset(cfg, tmp_path / "out")
    rows = rows_of(tmp_path / "out")
    assert len(rows["train"]) == 60 and report.rows_rejected == 1
    assert "more fields than the 3 named" in rejects(tmp_path / "out")[61]
    fm = FeatureMap.load(tmp_path / "out")
    assert [fm.feature(f).num_embeddings for f in ("user", "item", "ctx")] == [6, 4, 8]  # + the OOV id
    assert sum(r["label"] for r in rows["train"]) == 30


def test_prepare_libffm_with_default_names_and_given_splits(tmp_path: Path) -> None:
    tr = tmp_path / "tr.ffm"
    tr.write_text("".join(f"{i % 2} 0:{i % 4}:1 1:{i % 3}:1 2:{i % 2}:1 2:{9 + i % 2}:1\n" for i in range(40)))
    te = tmp_path / "te.ffm"
    te.write_text("1 0:1:1 1:2:1 2:0:1\n0 0:77:1 1:1:1\n")
    cfg = dataset_from_dict({"dataset_id": "ffm", "format": "libffm",
                             "features": [{"names": ["f0", "f1"], "kind": "sparse"},
                                          {"name": "f2", "kind": "multihot", "max_len": 4}],
                             "split": {"files": {"train": [str(tr)], "test": [str(te)]}, "valid": 0.0}}, where="t")
    prepare_dataset(cfg, tmp_path / "out")
    rows = rows_of(tmp_path / "out")
    assert [len(rows[s]) for s in ("train", "valid", "test")] == [40, 0, 2]
    fm = FeatureMap.load(tmp_path / "out")
    assert rows["test"][1]["f0"] == fm.feature("f0").oov_id  # 77 never seen in training
    assert all(len(r["f2"]) == 2 for r in rows["train"])  # the repeated field is a multi-valued one


def test_libfm_round_trips_to_the_csv_rows(tmp_path: Path) -> None:
    """The same table written as CSV and as libFM (global indices, fields by index_fields) prepares
    to the same rows, ids and vocabularies."""
    rng = __import__("numpy").random.default_rng(0)
    n = 300
    user, item = rng.integers(0, 20, n), rng.integers(0, 8, n)
    label = (rng.random(n) < 0.3).astype(int)
    (tmp_path / "t.csv").write_text("y,user,item\n" + "".join(f"{y},{u},{1000 + i}\n"
                                                               for y, u, i in zip(label, user, item, strict=True)))
    (tmp_path / "t.libfm").write_text("".join(f"{y} {1000 + i}:1 {u}:1\n"
                                              for y, u, i in zip(label, user, item, strict=True)))
    # one split: a row's seeded split depends on its line, and the CSV's header shifts every line by one
    common = {"features": [{"names": ["user", "item"], "kind": "sparse"}],
              "split": {"train": 1.0, "valid": 0.0, "test": 0.0}}
    a = dataset_from_dict({"dataset_id": "a", "format": "csv", "label": "y", "paths": [str(tmp_path / "t.csv")],
                           **common}, where="t")
    b = dataset_from_dict({"dataset_id": "b", "format": "libfm", "paths": [str(tmp_path / "t.libfm")],
                           "index_fields": {"user": [0, 999], "item": [1000, 1999]}, **common}, where="t")
    prepare_dataset(a, tmp_path / "a")
    prepare_dataset(b, tmp_path / "b")
    ra, rb = rows_of(tmp_path / "a"), rows_of(tmp_path / "b")
    assert [(r["label"], r["user"], r["item"]) for r in ra["train"]] == \
        [(r["label"], r["user"], r["item"]) for r in rb["train"]]
    assert len(rb["train"]) == n
    fa, fb = FeatureMap.load(tmp_path / "a"), FeatureMap.load(tmp_path / "b")
    assert [fa.feature(f).num_embeddings for f in ("user", "item")] == \
        [fb.feature(f).num_embeddings for f in ("user", "item")]
    bad = tmp_path / "bad.libfm"
    bad.write_text("1 5:1 1003:1\n0 5:1 3000:1\n")
    c = dataset_from_dict({"dataset_id": "c", "format": "libfm", "paths": [str(bad)], "max_reject_fraction": 0.5,
                           "index_fields": {"user": [0, 999], "item": [1000, 1999]}, **common}, where="t")
    prepare_dataset(c, tmp_path / "c")
    assert rejects(tmp_path / "c") == {2: "index in no field's range (index_fields)"}


def test_split_column_with_values_mapping(tmp_path: Path) -> None:
    src = tmp_path / "f.csv"
    src.write_text("y,a,fold\n" + "".join(f"{i % 2},a{i % 3},{i % 4}\n" for i in range(40)))
    cfg = dataset_from_dict({"dataset_id": "v", "format": "csv", "label": "y", "paths": [str(src)],
                             "features": [{"name": "a", "kind": "sparse"}], "max_reject_fraction": 0.3,
                             "split": {"column": "fold", "values": {"train": [0, 1], "test": ["2"]}}}, where="t")
    prepare_dataset(cfg, tmp_path / "out")
    rows = rows_of(tmp_path / "out")
    assert [len(rows[s]) for s in ("train", "valid", "test")] == [20, 0, 10]
    assert set(rejects(tmp_path / "out").values()) == {"split column 'fold' holds '3', not one of split.values "
                                                       "(0, 1, 2)"}
