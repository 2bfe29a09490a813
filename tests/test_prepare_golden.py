"""Prepared output pinned by content hash: shards, vocabularies, stats, feature map, rejects.

The digests were computed with the prepare of commit c4b113b (before the streaming
vocabulary accumulator and the overlapped reader), so a speed change that alters a
single prepared value, vocabulary id, split assignment, shard boundary or reject shows
up here. The fixtures are generated from ``mix64`` (no RNG whose stream could change)
and cover rejects of every kind, several read blocks and files, multiple shards,
hashed, multi-hot, bucketised, clipped and weighted features and a time split.

The criteo digest was re-pinned once since: rejects.csv is now in line order within each
file. Before, a row the CSV parser found malformed rode with whichever block the parser
had reached, so its place among the other rejects varied from run to run (1 in 8); the
outputs of both versions are equal with the rejects sorted.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from recemb.data.hashing import mix64
from recemb.data.preprocess import prepare_dataset
from recemb.data.schema import DatasetConfig, FeatureSpec, SplitSpec


def _draws(n: int, salt: int) -> np.ndarray:
    """``n`` deterministic uint64 draws for ``salt`` (splitmix64 of a counter)."""
    return mix64(np.arange(n, dtype=np.uint64) + np.uint64(salt << 32))


def _criteo_lines(n: int, salt: int) -> list[bytes]:
    """Criteo TSV lines with skewed ids, missing values and one bad row of each kind every ~100 rows."""
    d = _draws(n * 40, salt).reshape(n, 40)
    lines: list[bytes] = []
    for r in range(n):
        row = d[r]
        fields = [str(int(row[0] % 4 == 0))]
        fields += ["" if row[k] % 11 == 0 else str(int(row[k] >> np.uint64(58)) - 3) for k in range(1, 14)]
        fields += ["" if row[k] % 17 == 0 else f"{int(row[k] % np.uint64(3 + 7 * k)) ** 2:08x}" for k in range(14, 40)]
        kind = r % 97
        if kind == 5:
            fields[0] = "2"  # label not 0 or 1
        elif kind == 17:
            fields[3] = "abc"  # unparseable dense
        elif kind == 29:
            fields[4] = "inf"  # non-finite dense
        elif kind == 41:
            fields = fields[:-3]  # wrong number of fields
        elif kind == 53:
            fields[0] = ""  # missing label
        line = "\t".join(fields).encode()
        if kind == 67:
            line = line.replace(b"\t", b"\t\xff", 1)  # invalid UTF-8 in the first dense field
        lines.append(b"" if kind == 83 else line)
    return lines


def _criteo_cfg(paths: list[Path]) -> DatasetConfig:
    feats = [FeatureSpec(name=f"I{i}", kind="dense", log=True, standardize=True) for i in range(1, 12)]
    feats += [FeatureSpec(name="I12", kind="dense", bucketize=8), FeatureSpec(name="I13", kind="dense")]
    feats += [FeatureSpec(name=f"C{i}", kind="sparse", min_count=2) for i in range(1, 25)]
    feats += [FeatureSpec(name="C25", kind="sparse", hash_buckets=50), FeatureSpec(name="C26", kind="sparse")]
    return DatasetConfig(dataset_id="golden", format="criteo", paths=[str(p) for p in paths], features=feats,
                         block_bytes=16 << 10, shard_rows=700, max_reject_fraction=0.2)


def _events(path: Path, n: int) -> DatasetConfig:
    """Events CSV: counts, a time split, a clipped dense column and a multi-hot column."""
    d = _draws(n * 6, 99).reshape(n, 6)
    rows = ["ts,label,n,user,tags,x"]
    for r in range(n):
        row = d[r]
        tags = "|".join(f"t{int(row[2] >> np.uint64(8 * j)) % 13}" for j in range(int(row[2] % np.uint64(5))))
        x = ["inf", "-inf"][r % 2] if r % 31 == 0 else f"{(int(row[3] % np.uint64(1000)) - 500) / 7:.3f}"
        count = "0" if r % 89 == 3 else str(1 + int(row[4] % np.uint64(4)))
        rows.append(f"{int(row[0] % np.uint64(500))},{int(row[1] % np.uint64(3) == 0)},{count},"
                     f"u{int(row[5] % np.uint64(60))},{tags},{x}")
    path.write_text("\n".join(rows) + "\n")
    feats = [FeatureSpec(name="user", kind="sparse", min_count=2), FeatureSpec(name="tags", kind="multihot", max_len=3),
             FeatureSpec(name="x", kind="dense", nonfinite="clip", standardize=True)]
    return DatasetConfig(dataset_id="ev", format="events", paths=[str(path)], features=feats, count_column="n",
                         split=SplitSpec(train=0.7, valid=0.15, test=0.15, time_column="ts"),
                         block_bytes=4 << 10, shard_rows=500, max_reject_fraction=0.2)


def _digest(out: Path, inputs: list[Path]) -> str:
    """sha256 over every output file's content, parquet by schema, row groups and values."""
    h = hashlib.sha256()
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        h.update(rel.encode() + b"\0")
        if path.suffix == ".parquet":
            pf = pq.ParquetFile(path)
            sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
            table = pf.read()
            h.update(f"{table.schema}|{sizes}|".encode())
            h.update(json.dumps(table.to_pydict(), sort_keys=True).encode())
        elif rel == "stats.json":
            stats: dict[str, Any] = json.loads(path.read_text())
            stats.pop("seconds")
            stats.pop("output")
            h.update(json.dumps(stats, sort_keys=True).encode())
        elif rel == "dataset_config.yaml":
            continue  # holds the temporary paths
        else:
            text = path.read_text()
            for p in inputs:
                text = text.replace(str(p), p.name)
            h.update(text.encode())
    return h.hexdigest()


GOLDEN = {
    "criteo": "459ec7f305233109057ca7617fd5dc4f800e616400ec38eec27fd9e5810ca1b6",
    "events": "bbe9262ad64fbd1a2fa1c253852e0e4e9d2a1027245073f29707d8b124053789",
}


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_prepared_output_unchanged(case: str, tmp_path: Path) -> None:
    if case == "criteo":
        inputs = [tmp_path / "a.tsv", tmp_path / "b.tsv"]
        for k, p in enumerate(inputs):
            p.write_bytes(b"\n".join(_criteo_lines(3000 - 700 * k, k)) + b"\n")
        cfg = _criteo_cfg(inputs)
    else:
        inputs = [tmp_path / "e.csv"]
        cfg = _events(inputs[0], 2500)
    out = tmp_path / "out"
    rep = prepare_dataset(cfg, out)
    assert rep.rows_rejected > 0 and rep.rows_in == sum(rep.rows_out.values()) + rep.rows_rejected
    with open(out / "rejects" / "rejects.csv", newline="") as f:
        rejects = [(r[0], int(r[1])) for r in list(csv.reader(f))[1:]]
    assert rejects == sorted(rejects, key=lambda r: ([str(p) for p in inputs].index(r[0]), r[1]))  # file, then line
    assert _digest(out, inputs) == GOLDEN[case]
