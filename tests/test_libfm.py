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
