"""Bad inputs and faults that used to pass silently or end in a traceback, each pinned:
non-finite dense values and event counts, compressed input, empty outputs, duplicate
headers, lines after quoted newlines, unsafe names, outputs over inputs, stale temporaries
of a killed prepare, unreadable/damaged/nested inputs (one line, exit 2), very long rows."""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from recemb.cli import main
from recemb.data import sources
from recemb.data.preprocess import FittedFeatures, prepare_dataset, save_vocabs
from recemb.data.schema import (
    DatasetConfig,
    FeatureMap,
    FeatureSpec,
    SplitSpec,
    dataset_from_dict,
    path_under,
)
from recemb.errors import ConfigError, DataError

ALL_TRAIN = SplitSpec(train=1.0, valid=0.0, test=0.0)


def csv_cfg(path: Path | list[Path], features: list[FeatureSpec], **kw: Any) -> DatasetConfig:
    paths = [str(p) for p in (path if isinstance(path, list) else [path])]
    kw.setdefault("split", ALL_TRAIN)
    return DatasetConfig(dataset_id="f", format="csv", paths=paths, features=features, **kw)


def rejects(out: Path) -> dict[int, str]:
    with open(out / "rejects" / "rejects.csv", newline="") as f:
        return {int(r["line"]): r["reason"] for r in csv.DictReader(f)}


def strict_json(path: Path) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def read_all(out: Path) -> pa.Table:
    fm = FeatureMap.load(out)
    return pa.concat_tables([pq.read_table(out / f) for s in ("train", "valid", "test") for f in fm.shards[s]])


def accounted(rep: Any) -> bool:
    return rep.rows_in == sum(rep.rows_out.values()) + rep.rows_rejected


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run ``recemb prepare``; it must exit 2 with one line on stderr, which is returned."""
    capsys.readouterr()
    assert main(["prepare", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("recemb: error: ") and "\n" not in err and "Traceback" not in err
    return err


# ----------------------------------------------------------------------------- 1. non-finite dense values


def test_nonfinite_dense_values_are_rejects_and_stats_stay_finite(tmp_path: Path) -> None:
    rows = [f"{i % 2},{i}.5,k{i % 3}" for i in range(40)]
    bad = {5: "inf", 9: "-inf", 12: "nan", 20: "-Infinity"}  # 1-based physical lines (header is line 1)
    for line, value in bad.items():
        rows[line - 2] = f"1,{value},k0"
    rows[30] = "1,,k0"  # missing: filled, not rejected
    p = tmp_path / "d.csv"
    p.write_text("label,x,c\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    cfg = csv_cfg(p, [FeatureSpec(name="x", kind="dense", standardize=True), FeatureSpec(name="c", kind="sparse")])
    rep = prepare_dataset(cfg, out, max_reject_fraction=0.2)
    assert accounted(rep) and rep.rows_rejected == len(bad)
    assert rejects(out) == dict.fromkeys(bad, "non-finite number in 'x'")
    x = read_all(out).column("x").to_numpy()
    assert len(x) == 36 and np.isfinite(x).all()
    info = strict_json(out / "feature_map.json")["features"][0]
    kept = np.array([float(r.split(",")[1] or 0.0) for i, r in enumerate(rows) if i + 2 not in bad])
    assert info["mean"] == pytest.approx(kept.mean()) and info["std"] == pytest.approx(kept.std())
    assert strict_json(out / "stats.json")["features"]["x"]["train_mean"] == pytest.approx(kept.mean())


def test_nonfinite_clip_uses_training_range(tmp_path: Path) -> None:
    values = [float(v) for v in range(1, 21)]
    rows = [f"{i % 2},{v}" for i, v in enumerate(values)] + ["1,inf", "0,-inf", "1,inf", "0,nan"]
    p = tmp_path / "d.csv"
    p.write_text("label,x\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    cfg = csv_cfg(p, [FeatureSpec(name="x", kind="dense", standardize=True, nonfinite="clip"),
                      FeatureSpec(name="xb", column="x", kind="dense", bucketize=4, nonfinite="clip")])
    rep = prepare_dataset(cfg, out, max_reject_fraction=0.1)
    assert accounted(rep) and rep.rejected == {"nan in 'x' (cannot be clipped)": 1}
    fm = FeatureMap.load(out)
    assert fm.feature("x").clip == [1.0, 20.0]
    clipped = np.array(values + [20.0, 1.0, 20.0])  # +inf -> train max, -inf -> train min
    assert fm.feature("x").mean == pytest.approx(clipped.mean())
    assert fm.feature("x").std == pytest.approx(clipped.std())
    x = read_all(out).column("x").to_numpy()
    assert x.tolist() == pytest.approx(((clipped - clipped.mean()) / clipped.std()).tolist(), rel=1e-6)
    strict_json(out / "feature_map.json")
    strict_json(out / "stats.json")


def test_nonfinite_option_is_checked(tmp_path: Path) -> None:
    base = {"dataset_id": "d", "format": "csv", "paths": ["x.csv"]}
    with pytest.raises(ConfigError, match=r"ds.yaml: features\[0\]: .*nonfinite applies to dense"):
        dataset_from_dict({**base, "features": [{"name": "a", "kind": "sparse", "nonfinite": "clip"}]}, "ds.yaml")
    with pytest.raises(ConfigError, match="nonfinite' must be one of 'reject', 'clip'"):
        dataset_from_dict({**base, "features": [{"name": "a", "kind": "dense", "nonfinite": "zero"}]}, "ds.yaml")


def test_dense_values_beyond_float32_are_an_error(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("label,x\n" + "".join(f"{i % 2},{i}\n" for i in range(20)) + "1,1e39\n")
    with pytest.raises(DataError, match="feature 'x': a value of 'x' is beyond the float32 range"):
        prepare_dataset(csv_cfg(p, [FeatureSpec(name="x", kind="dense")]), tmp_path / "out")
    with pytest.raises(DataError, match="feature 'x': the training mean/std of 'x' overflow"):
        p.write_text("label,x\n" + "".join(f"{i % 2},{(-1) ** i}e300\n" for i in range(20)))
        prepare_dataset(csv_cfg(p, [FeatureSpec(name="x", kind="dense", standardize=True)]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 2. event counts


def test_event_counts_must_be_positive_whole_numbers(tmp_path: Path) -> None:
    rows = [f"u{i % 4},1,{1 + i % 3}" for i in range(30)]
    bad = {3: ("-5", "not a positive whole number"), 6: ("0", "not a positive whole number"),
           9: ("1.5", "not a positive whole number"), 12: ("inf", "not a positive whole number"),
           15: ("nan", "not a positive whole number"), 18: ("", "missing count"),
           21: ("1e39", "too large for float32"), 24: ("x", "unparseable number in")}
    for line, (count, _) in bad.items():
        rows[line - 2] = f"u0,1,{count}"
    p = tmp_path / "e.csv"
    p.write_text("user,label,n\n" + "\n".join(rows) + "\n")
    cfg = DatasetConfig(dataset_id="ev", format="events", paths=[str(p)], count_column="n", split=ALL_TRAIN,
                        features=[FeatureSpec(name="user", kind="sparse")])
    out = tmp_path / "out"
    rep = prepare_dataset(cfg, out, max_reject_fraction=0.5)
    assert accounted(rep) and rep.rows_rejected == len(bad)
    got = rejects(out)
    assert sorted(got) == sorted(bad) and all(bad[line][1] in why and "'n'" in why for line, why in got.items())
    n = read_all(out).column("n").to_numpy()
    assert np.isfinite(n).all() and (n >= 1).all() and (n == np.round(n)).all()
    vocab = pq.read_table(out / "vocab" / "user.parquet")
    assert sum(vocab.column("count").to_pylist()) == int(n.sum())


def test_nonfinite_event_label_is_rejected(tmp_path: Path) -> None:
    p = tmp_path / "e.csv"
    p.write_text("user,label\n" + "".join(f"u{i},1\n" for i in range(20)) + "u1,inf\nu2,-1\n")
    cfg = DatasetConfig(dataset_id="ev", format="events", paths=[str(p)], split=ALL_TRAIN,
                        features=[FeatureSpec(name="user", kind="sparse")])
    rep = prepare_dataset(cfg, tmp_path / "out", max_reject_fraction=0.1)
    assert rejects(tmp_path / "out") == {22: "non-finite label 'label'"} and rep.rows_out["train"] == 21
    assert strict_json(tmp_path / "out" / "stats.json")["label_rate"]["train"] == pytest.approx(19 / 21)


# ----------------------------------------------------------------------------- 3. compressed input, empty outputs


def _compress(codec: str, data: bytes, path: Path) -> None:
    if codec == "gzip":
        path.write_bytes(gzip.compress(data))
    elif codec == "bz2":
        path.write_bytes(bz2.compress(data))
    else:
        with pa.CompressedOutputStream(str(path), "zstd") as f:
            f.write(data)


@pytest.mark.parametrize(("codec", "suffix"), [("gzip", ".gz"), ("bz2", ".bz2"), ("zstd", ".zst"), ("gzip", "")])
def test_compressed_input_equals_plain(tmp_path: Path, codec: str, suffix: str) -> None:
    lines = [b"label,x,c"] + [f"{i % 2},{i},\"k{i % 5}\"".encode() for i in range(3000)]
    lines[100] = b"1,2"  # line 101: wrong field count
    lines[2000] = b"1,3,ab\xffc"  # line 2001: invalid UTF-8
    lines[2500] = b'1,4,"two\nlines"'  # lines 2501-2502: a quoted newline
    lines[2800] = b"1,2"  # so this is line 2802
    data = b"\n".join(lines) + b"\n"
    plain = tmp_path / "plain.csv"
    plain.write_bytes(data)
    packed = tmp_path / f"packed.csv{suffix}"  # no suffix: recognised by its first bytes
    _compress(codec, data, packed)
    feats = [FeatureSpec(name="x", kind="dense"), FeatureSpec(name="c", kind="sparse")]
    reps = [prepare_dataset(csv_cfg(p, feats, split=SplitSpec(), block_bytes=4096), tmp_path / p.name.replace(".", "_"),
                            max_reject_fraction=0.01) for p in (plain, packed)]
    assert reps[0].rows_in == reps[1].rows_in == 3000 and accounted(reps[1])
    assert reps[0].rows_out == reps[1].rows_out and reps[0].rejected == reps[1].rejected
    want = {101: "wrong number of fields: expected 3, got 2", 2001: "invalid UTF-8 in 'c'",
            2802: "wrong number of fields: expected 3, got 2"}
    assert rejects(tmp_path / "plain_csv") == want
    assert rejects(tmp_path / packed.name.replace(".", "_")) == want
    assert read_all(tmp_path / "plain_csv").equals(read_all(tmp_path / packed.name.replace(".", "_")))


def test_truncated_gzip_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "t.csv.gz"
    p.write_bytes(gzip.compress(b"label,c\n" + b"".join(b"1,v%d\n" % i for i in range(200_000)))[:20_000])
    cfg = write_yaml(tmp_path / "ds.yaml", {"dataset_id": "t", "format": "csv", "paths": [str(p)],
                                            "features": [{"name": "c", "kind": "sparse"}]})
    err = cli_error(capsys, "--config", str(cfg), "--output", str(tmp_path / "out"))
    assert str(p) in err and "cannot decompress" in err
    assert not (tmp_path / "out").exists()


def test_no_training_rows_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "j.csv"
    p.write_text("label,c\n" + "".join(f"{2 + i},k\n" for i in range(10)))
    with pytest.raises(DataError) as e:
        prepare_dataset(csv_cfg(p, [FeatureSpec(name="c", kind="sparse")]), tmp_path / "out", max_reject_fraction=1.0)
    msg = str(e.value)
    assert "no rows for the train split" in msg and str(p) in msg and "label 'label' not 0 or 1: 10" in msg
    p.write_text("label,c\n" + "".join(f"{i % 2},k\n" for i in range(10)))
    empty_train = r"no rows for the train split: 10 rows read .* none rejected, \d+ valid and \d+ test"
    with pytest.raises(DataError, match=empty_train):
        prepare_dataset(csv_cfg(p, [FeatureSpec(name="c", kind="sparse")], split=SplitSpec(0.0, 0.5, 0.5)),
                        tmp_path / "out")
    assert not (tmp_path / "out").exists() and sorted(x.name for x in tmp_path.iterdir()) == ["j.csv"]


# ----------------------------------------------------------------------------- 4. headers and physical lines


def test_duplicate_header_name_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "h.csv"
    p.write_text("label,a,b,a\n1,x,y,z\n")
    with pytest.raises(DataError, match=rf"{p}: column 'a' appears 2 times in the header"):
        prepare_dataset(csv_cfg(p, [FeatureSpec(name="a", kind="sparse")]), tmp_path / "out")
    pq.write_table(pa.Table.from_arrays([pa.array([1]), pa.array(["x"]), pa.array(["y"])], ["label", "a", "a"]),
                   tmp_path / "h.parquet")
    cfg = DatasetConfig(dataset_id="h", format="parquet", paths=[str(tmp_path / "h.parquet")],
                        features=[FeatureSpec(name="a", kind="sparse")])
    with pytest.raises(DataError, match="column 'a' appears 2 times in the Parquet schema"):
        prepare_dataset(cfg, tmp_path / "out")
    with pytest.raises(ConfigError, match="column_names lists 'a' twice"):
        dataset_from_dict({"dataset_id": "d", "format": "csv", "paths": [str(p)], "header": False,
                           "column_names": ["label", "a", "a"], "features": [{"name": "a", "kind": "sparse"}]})


@pytest.mark.parametrize("block_bytes", [1024, 1 << 20])
def test_lines_after_quoted_newlines_are_physical(tmp_path: Path, block_bytes: int) -> None:
    rows = ["label,c,note"]
    want: dict[int, str] = {}
    for i in range(300):
        line = sum(r.count("\n") + 1 for r in rows) + 1  # physical line where this row starts
        if i % 50 == 7:
            rows.append(f'{i % 2},k{i},"a note\nover\nthree lines"')  # unread column spans lines
        elif i % 50 == 19:
            rows.append(f'{i % 2},"k\n{i}",x')  # read column spans lines
        elif i % 50 == 30:
            rows.append(f"7,k{i},x")
            want[line] = "label 'label' not 0 or 1"
        elif i % 50 == 40:
            rows.append("1,only-two")
            want[line] = "wrong number of fields: expected 3, got 2"
        else:
            rows.append(f"{i % 2},k{i},x")
    p = tmp_path / "q.csv"
    p.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    rep = prepare_dataset(csv_cfg(p, [FeatureSpec(name="c", kind="sparse")], block_bytes=block_bytes), out,
                          max_reject_fraction=0.1)
    assert accounted(rep) and rep.rows_in == 300
    assert rejects(out) == want


# ----------------------------------------------------------------------------- 5. names that become paths


@pytest.mark.parametrize("name", ["../../../x", "/abs/x", "a/b", "a\\b", ".hidden", "..", "a\0b", ""])
def test_unsafe_feature_name_is_a_config_error(tmp_path: Path, name: str) -> None:
    data = {"dataset_id": "d", "format": "csv", "paths": ["x.csv"],
            "features": [{"name": "ok", "kind": "dense"}, {"name": name, "kind": "sparse", "column": "c"}]}
    with pytest.raises(ConfigError, match=r"ds\.yaml: features\[1\]: feature name .* not a safe file name"):
        dataset_from_dict(data, "ds.yaml")
    with pytest.raises(ConfigError, match=r"ds\.yaml: .*dataset_id .* not a safe file name"):
        dataset_from_dict({**data, "dataset_id": name, "features": [{"name": "ok", "kind": "dense"}]}, "ds.yaml")


def test_unsafe_names_never_reach_the_disk(tmp_path: Path) -> None:
    p = tmp_path / "raw" / "c.csv"
    p.parent.mkdir()
    p.write_text("label,c\n" + "".join(f"{i % 2},k{i % 3}\n" for i in range(20)))
    cfg = csv_cfg(p, [FeatureSpec(name="c", kind="sparse")])
    cfg.features[0].name = "../../escaped"  # changed after the config was checked
    with pytest.raises(ConfigError, match="feature name '../../escaped' is not a safe file name"):
        prepare_dataset(cfg, tmp_path / "a" / "b" / "out")
    vocab = pa.table({"value": ["k"], "id": [1], "count": [3]})
    with pytest.raises(ConfigError, match="not a safe file name"):
        save_vocabs(FittedFeatures([], {"../escaped": vocab}), tmp_path / "a" / "vocab")
    assert not list(tmp_path.rglob("escaped*"))
    (tmp_path / "a" / "vocab" / "link").symlink_to(tmp_path)
    with pytest.raises(ConfigError, match="leads outside"):
        path_under(tmp_path / "a" / "vocab", "link/x.parquet")
    with pytest.raises(ConfigError, match="must be a relative path"):
        path_under(tmp_path / "a", "/etc/passwd")
    assert path_under(tmp_path / "a", "vocab/c.parquet") == (tmp_path / "a" / "vocab" / "c.parquet").resolve()
    fm_dir = tmp_path / "fm"
    fm_dir.mkdir()
    fm = {"dataset_id": "d", "label": None, "features": [{"name": "c", "kind": "sparse", "source": "c",
                                                        "num_embeddings": 2, "vocab_file": "../raw/c.csv"}]}
    (fm_dir / "feature_map.json").write_text(json.dumps(fm))
    with pytest.raises(DataError, match="leads outside"):
        FeatureMap.load(fm_dir).id_counts("c")


# ----------------------------------------------------------------------------- 6. output over input


def test_output_over_input_is_refused_before_anything_is_deleted(tmp_path: Path) -> None:
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    p = raw / "c.csv"
    p.write_text("label,c\n" + "".join(f"{i % 2},k{i % 3}\n" for i in range(20)))
    cfg = csv_cfg(p, [FeatureSpec(name="c", kind="sparse")])
    (tmp_path / "link").symlink_to(raw)
    for out, how in ((raw, "contains"), (tmp_path / "data", "contains"), (tmp_path, "contains"), (p, "is"),
                     (tmp_path / "link", "contains")):
        with pytest.raises(ConfigError, match=f"output {out} {how} the input file {p}"):
            prepare_dataset(cfg, out, overwrite=True)
    assert sorted(x.name for x in raw.iterdir()) == ["c.csv"] and p.stat().st_size > 0
    assert prepare_dataset(cfg, raw / "prepared").rows_in == 20  # beside the input is fine


# ----------------------------------------------------------------------------- 7. stale temporaries


def test_stale_temporaries_of_a_killed_prepare_are_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / "c.csv"
    p.write_text("label,c\n" + "".join(f"{i % 2},k{i % 3}\n" for i in range(20)))
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead, live = child.pid, os.getppid()
    stale = [tmp_path / f".out.tmp-{dead}-0123abcd", tmp_path / f".out.old-{dead}-89abcdef"]
    kept = [tmp_path / f".out.tmp-{live}-0123abcd", tmp_path / f".other.tmp-{dead}-0123abcd",
            tmp_path / f".out.tmp-{dead}-notahex0", tmp_path / f".out.tmp-{dead}-0123abcd.keep"]
    for d in stale + kept:
        (d / "train").mkdir(parents=True)
        (d / "train" / "part-00000.parquet").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="recemb.data"):
        prepare_dataset(csv_cfg(p, [FeatureSpec(name="c", kind="sparse")]), tmp_path / "out")
    assert not any(d.exists() for d in stale) and all(d.is_dir() for d in kept)
    logged = [r.getMessage() for r in caplog.records]
    for d in stale:
        assert f"removed stale temporary {d} from a prepare that was killed" in logged


# ----------------------------------------------------------------------------- 8. unreadable, damaged, nested


def _csv_yaml(tmp_path: Path, path: Path | str, **kw: Any) -> Path:
    data = {"dataset_id": "u", "format": "csv", "paths": [str(path)], "features": [{"name": "c", "kind": "sparse"}]}
    return write_yaml(tmp_path / "ds.yaml", {**data, **kw})


def test_folder_or_pipe_as_input_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "day_0.csv"
    folder.mkdir()
    err = cli_error(capsys, "--config", str(_csv_yaml(tmp_path, folder)), "--output", str(tmp_path / "out"))
    assert f"{folder}: is a folder, not a file" in err
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    err = cli_error(capsys, "--config", str(_csv_yaml(tmp_path, fifo)), "--output", str(tmp_path / "out"))
    assert f"{fifo}: not a regular file" in err


def test_permission_denied_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "secret.csv"
    p.write_text("label,c\n1,k\n")
    cfg = _csv_yaml(tmp_path, p)
    if os.geteuid() != 0:  # a real EACCES; root reads anything, so there it is simulated below
        p.chmod(0)
        err = cli_error(capsys, "--config", str(cfg), "--output", str(tmp_path / "out"))
        assert f"{p}: cannot read: Permission denied" in err
        p.chmod(0o644)
    real_open = open

    def denying_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file) == str(p):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", denying_open)
    err = cli_error(capsys, "--config", str(cfg), "--output", str(tmp_path / "out"))
    assert f"{p}: cannot read: Permission denied" in err


def _parquet_with_damaged_column(path: Path) -> None:
    n = 20_000
    rng = np.random.default_rng(0)
    table = pa.table({"y": np.arange(n) % 2, "item": [f"i{i % 37}" for i in range(n)], "price": rng.random(n)})
    pq.write_table(table, path, row_group_size=5000)
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(1)  # 'item' in the second row group
    data = bytearray(path.read_bytes())
    data[chunk.data_page_offset + 40: chunk.data_page_offset + 240] = b"\xff" * 200
    path.write_bytes(bytes(data))


def test_damaged_parquet_page_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "bad.parquet"
    _parquet_with_damaged_column(p)
    cfg = write_yaml(tmp_path / "ds.yaml", {"dataset_id": "p", "format": "parquet", "paths": [str(p)], "label": "y",
                                            "features": [{"name": "item", "kind": "sparse"},
                                                         {"name": "price", "kind": "dense"}]})
    err = cli_error(capsys, "--config", str(cfg), "--output", str(tmp_path / "out"))
    assert f"{p}: cannot read row group 1, column 'item'" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("column", "kind", "expect"), [
    ("meta", "sparse", "feature 'f' (sparse) reads column 'meta' of {p}, which is struct<"),
    ("tags", "sparse", "which is list<element: string>; it needs a number, string or boolean (a list column can be"),
    ("meta", "dense", "feature 'f' (dense) reads column 'meta'"),
    ("nested", "multihot", "feature 'f' (multihot) reads column 'nested'"),
])
def test_nested_column_as_feature_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    column: str, kind: str, expect: str) -> None:
    p = tmp_path / "n.parquet"
    pq.write_table(pa.table({"y": [0, 1], "meta": [{"a": 1}, {"a": 2}], "tags": [["x"], ["y", "z"]],
                             "nested": [[["x"]], [["y"]]]}), p)
    cfg = write_yaml(tmp_path / "ds.yaml", {"dataset_id": "p", "format": "parquet", "paths": [str(p)], "label": "y",
                                            "features": [{"name": "f", "kind": kind, "column": column}]})
    err = cli_error(capsys, "--config", str(cfg), "--output", str(tmp_path / "out"))
    assert expect.format(p=p) in err


def test_list_column_is_fine_as_multihot(tmp_path: Path) -> None:
    p = tmp_path / "n.parquet"
    pq.write_table(pa.table({"y": [0, 1] * 5, "tags": [["x"], ["y", "z"]] * 5}), p)
    cfg = DatasetConfig(dataset_id="p", format="parquet", paths=[str(p)], label="y", split=ALL_TRAIN,
                        features=[FeatureSpec(name="tags", kind="multihot")])
    assert prepare_dataset(cfg, tmp_path / "out").rows_out["train"] == 10


# ----------------------------------------------------------------------------- 9. very long rows


def test_ten_megabyte_row_grows_the_read_block(tmp_path: Path) -> None:
    big = "y" * (10 << 20)
    rows = ["label,c,note"] + [f"{i % 2},k{i % 3},n" for i in range(50)]
    rows[20] = f"1,k1,{big}"
    rows[30] = f"1,{big}"  # line 31: too few fields, and long
    rows[40] = "5,k1,n"  # line 41
    p = tmp_path / "long.csv"
    p.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    cfg = csv_cfg(p, [FeatureSpec(name="c", kind="sparse")], block_bytes=1 << 20)
    rep = prepare_dataset(cfg, out, max_reject_fraction=0.1)
    assert accounted(rep) and rep.rows_in == 50 and rep.rows_out["train"] == 48
    assert rejects(out) == {31: "wrong number of fields: expected 3, got 2", 41: "label 'label' not 0 or 1"}
    assert read_all(out).num_rows == 48


def test_row_longer_than_the_cap_names_block_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_MAX_BLOCK_BYTES", 64 << 10)  # the real cap is 256 MiB: too big for a test
    p = tmp_path / "long.csv"
    p.write_text("label,c\n1,k\n" + "1," + "y" * (1 << 20) + "\n0,k\n")
    cfg = csv_cfg(p, [FeatureSpec(name="c", kind="sparse")], block_bytes=16 << 10)
    with pytest.raises(DataError, match=rf"{p}: a row is longer than the read block of 65536 bytes; raise block_bytes"):
        prepare_dataset(cfg, tmp_path / "out")
