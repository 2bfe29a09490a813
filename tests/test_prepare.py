"""prepare_dataset end to end: rejects with exact lines and the rows-accounted invariant,
reject fraction, overwrite refusal, feature-map round trip, split reproducibility,
train-only vocabularies, hashed ids, multi-hot/bucketised features, mergeable fits."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recemb.data.preprocess import (
    finalize_features,
    fit_file,
    merge_stats,
    plan_split,
    prepare_dataset,
)
from recemb.data.schema import DatasetConfig, FeatureMap, FeatureSpec, SplitSpec, load_dataset_config
from recemb.data.sources import resolve_paths
from recemb.errors import ConfigError, DataError, OutputExistsError

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared" / "data"


def criteo_rows(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        label = str(int(rng.random() < 0.3))
        ints = [str(int(v)) if rng.random() > 0.1 else "" for v in rng.integers(0, 50, 13)]
        cats = [f"{int(v):08x}" for v in rng.zipf(1.5, 26) % 40]
        out.append("\t".join([label, *ints, *cats]))
    return out


def criteo_cfg(path: Path | list[Path], **kw: object) -> DatasetConfig:
    paths = [str(p) for p in (path if isinstance(path, list) else [path])]
    feats = [FeatureSpec(name=f"I{i}", kind="dense", log=True, standardize=True) for i in range(1, 14)]
    feats += [FeatureSpec(name=f"C{i}", kind="sparse", min_count=2) for i in range(1, 27)]
    return DatasetConfig(dataset_id="t", format="criteo", paths=paths, features=feats, **kw)  # type: ignore[arg-type]


def read_split(out: Path, split: str) -> pa.Table:
    fm = FeatureMap.load(out)
    return pa.concat_tables([pq.read_table(out / s) for s in fm.shards[split]])


def test_prepare_criteo_tiny_schema_and_stats(tmp_path: Path) -> None:
    p = tmp_path / "c.tsv"
    p.write_text("\n".join(criteo_rows(500)) + "\n")
    out = tmp_path / "out"
    rep = prepare_dataset(criteo_cfg(p, shard_rows=100), out)
    assert rep.rows_in == 500 and sum(rep.rows_out.values()) == 500 and rep.rows_rejected == 0
    fm = FeatureMap.load(out)
    assert fm.dense_features == [f"I{i}" for i in range(1, 14)] and fm.sparse_features[0] == "C1"
    assert len(fm.shards["train"]) == -(-rep.rows_out["train"] // 100)
    assert fm.shards["train"][0] == "train/part-00000.parquet"
    t = read_split(out, "train")
    assert t.num_rows == rep.rows_out["train"] == fm.rows["train"]
    assert t.schema.field("label").type == pa.float32()
    assert t.schema.field("I1").type == pa.float32() and t.schema.field("C1").type == pa.int64()
    assert abs(float(np.mean(t.column("I3").to_numpy()))) < 1e-4  # standardised on train
    c1 = fm.feature("C1")
    assert t.column("C1").to_numpy().max() < c1.num_embeddings and t.column("C1").to_numpy().min() >= 0
    vocab = pq.read_table(out / c1.vocab_file)
    assert vocab.schema.names == ["value", "id", "count"] and vocab.column("id").to_pylist()[0] == 1
    counts = vocab.column("count").to_pylist()
    assert counts == sorted(counts, reverse=True) and min(counts) >= 2
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows_in"] == 500 and 0 < stats["label_rate"]["train"] < 1
    assert 0 <= stats["features"]["C1"]["oov_rate"]["valid"] <= 1
    assert stats["features"]["C1"]["cardinality"] >= stats["features"]["C1"]["vocab_size"]


def test_rejects_exact_lines_and_reasons(tmp_path: Path) -> None:
    rows = [r.encode() for r in criteo_rows(200)]
    good = rows[0]
    bad = {
        3: (b"1\t2\t3", "wrong number of fields: expected 40, got 3"),
        10: (b"", "empty row (all fields missing)"),
        20: (b"\t".join([b""] + good.split(b"\t")[1:]), "missing label 'label'"),
        30: (b"\t".join([b"2"] + good.split(b"\t")[1:]), "label 'label' not 0 or 1"),
        40: (b"\t".join(good.split(b"\t")[:14] + [b"ab\xff\xfe"] + good.split(b"\t")[15:]), "invalid UTF-8 in 'C1'"),
        50: (b"\t".join(good.split(b"\t")[:3] + [b"1.2.3"] + good.split(b"\t")[4:]), "unparseable number in 'I3'"),
        60: (b"\t".join([b"yes"] + good.split(b"\t")[1:]), "unparseable label 'label'"),
        70: (b"oops\t\xe9", "wrong number of fields: expected 40, got 2"),
    }
    lines = list(rows)
    for line, (content, _) in bad.items():
        lines[line - 1] = content
    p = tmp_path / "bad.tsv"
    p.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    rep = prepare_dataset(criteo_cfg(p, block_bytes=2048), out, max_reject_fraction=0.5)
    assert rep.rows_in == 200
    assert rep.rows_in == sum(rep.rows_out.values()) + rep.rows_rejected
    assert rep.rows_rejected == len(bad)
    with open(out / "rejects" / "rejects.csv", newline="") as f:
        got = {int(r["line"]): r["reason"] for r in csv.DictReader(f)}
    assert got == {line: why for line, (_, why) in bad.items()}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows_rejected"] == len(bad) and stats["rejected"]["wrong number of fields: expected 40, got 2"] == 1


def test_max_reject_fraction(tmp_path: Path) -> None:
    rows = criteo_rows(50)
    rows[4] = "2" + rows[4][1:]
    rows[9] = "1\t2"
    p = tmp_path / "c.tsv"
    p.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match="2 of 50 rows rejected") as e:
        prepare_dataset(criteo_cfg(p, max_reject_fraction=0.01), tmp_path / "o")
    assert "\n" not in str(e.value) and "max-reject-fraction" in str(e.value)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp*"))
    rep = prepare_dataset(criteo_cfg(p, max_reject_fraction=0.01), tmp_path / "o", max_reject_fraction=0.1)
    assert rep.rows_rejected == 2


def test_all_rows_invalid_are_accounted(tmp_path: Path) -> None:
    p = tmp_path / "c.tsv"
    p.write_text("1\t2\n1\t2\t3\n" + criteo_rows(1)[0] + "\n1\t2\n")
    rep = prepare_dataset(criteo_cfg(p), tmp_path / "o", max_reject_fraction=1.0)
    assert rep.rows_in == 4 and rep.rows_rejected == 3 and sum(rep.rows_out.values()) == 1
    with open(tmp_path / "o" / "rejects" / "rejects.csv", newline="") as f:
        assert [int(r["line"]) for r in csv.DictReader(f)] == [1, 2, 4]
    only_bad = tmp_path / "bad.tsv"
    only_bad.write_text("1\t2\n" * 3)
    with pytest.raises(DataError, match="3 of 3 rows rejected"):
        prepare_dataset(criteo_cfg(only_bad), tmp_path / "o2")


def test_overwrite_refused_then_allowed(tmp_path: Path) -> None:
    p = tmp_path / "c.tsv"
    p.write_text("\n".join(criteo_rows(40)) + "\n")
    out = tmp_path / "out"
    prepare_dataset(criteo_cfg(p), out)
    with pytest.raises(OutputExistsError):
        prepare_dataset(criteo_cfg(p), out)
    rep = prepare_dataset(criteo_cfg(p), out, overwrite=True)
    assert rep.rows_in == 40 and (out / "feature_map.json").is_file()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["c.tsv", "out"]


def test_feature_map_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "c.tsv"
    p.write_text("\n".join(criteo_rows(60)) + "\n")
    prepare_dataset(criteo_cfg(p), tmp_path / "out")
    fm = FeatureMap.load(tmp_path / "out")
    fm.save(tmp_path / "copy.json")
    assert FeatureMap.load(tmp_path / "copy.json") == fm


def test_split_reproducible_with_seed(tmp_path: Path) -> None:
    p = tmp_path / "c.tsv"
    p.write_text("\n".join(criteo_rows(300)) + "\n")
    reps = [prepare_dataset(criteo_cfg(p, split=SplitSpec(seed=s)), tmp_path / f"o{i}")
            for i, s in enumerate((5, 5, 6))]
    a, b = read_split(tmp_path / "o0", "valid"), read_split(tmp_path / "o1", "valid")
    assert a.equals(b) and reps[0].rows_out == reps[1].rows_out
    assert reps[0].rows_out != reps[2].rows_out or not a.equals(read_split(tmp_path / "o2", "valid"))


def test_vocab_fitted_on_train_only(tmp_path: Path) -> None:
    p = tmp_path / "e.csv"
    lines = ["ts,user,label"] + [f"{i},{'common' if i % 2 else 'other'},1" for i in range(80)]
    lines += [f"{80 + i},late_only,1" for i in range(20)]
    p.write_text("\n".join(lines) + "\n")
    cfg = DatasetConfig(dataset_id="ev", format="events", paths=[str(p)],
                        features=[FeatureSpec(name="user", kind="sparse")],
                        split=SplitSpec(train=0.8, valid=0.1, test=0.1, time_column="ts"))
    out = tmp_path / "out"
    rep = prepare_dataset(cfg, out)
    assert rep.rows_out == {"train": 80, "valid": 10, "test": 10}
    vocab = pq.read_table(out / "vocab" / "user.parquet").column("value").to_pylist()
    assert sorted(vocab) == ["common", "other"]
    assert set(read_split(out, "test").column("user").to_pylist()) == {0}
    assert set(read_split(out, "train").column("user").to_pylist()) == {1, 2}
    assert read_split(out, "valid").column("label").to_pylist() == [1.0] * 10


def test_hashed_multihot_bucketized_from_parquet(tmp_path: Path) -> None:
    n = 400
    rng = np.random.default_rng(1)
    tags = ["|".join(f"t{int(v)}" for v in rng.integers(0, 6, rng.integers(0, 4))) for _ in range(n)]
    table = pa.table({"y": (rng.random(n) < 0.5).astype(np.int64), "item": [f"i{i % 37}" for i in range(n)],
                      "tags": tags, "price": rng.exponential(10, n)})
    pq.write_table(table, tmp_path / "in.parquet")
    cfg = DatasetConfig(dataset_id="pq", format="parquet", paths=[str(tmp_path / "in.parquet")], label="y",
                        features=[FeatureSpec(name="item", kind="sparse", hash_buckets=16),
                                  FeatureSpec(name="tags", kind="multihot", max_len=2),
                                  FeatureSpec(name="price_bin", kind="dense", column="price", bucketize=4)])
    out = tmp_path / "out"
    rep = prepare_dataset(cfg, out)
    fm = FeatureMap.load(out)
    assert fm.feature("item").num_embeddings == 16 and fm.feature("item").vocab_file is None
    t = pa.concat_tables([read_split(out, s) for s in ("train", "valid", "test")])
    assert t.num_rows == rep.rows_in == n
    assert t.schema.field("tags").type == pa.list_(pa.int64()) and t.schema.field("price_bin").type == pa.int64()
    assert max(len(x) for x in t.column("tags").to_pylist()) == 2
    item = t.column("item").to_numpy()
    assert item.min() >= 1 and item.max() < 16
    bins = np.bincount(t.column("price_bin").to_numpy(), minlength=fm.feature("price_bin").num_embeddings)
    assert bins[0] == 0 and len(fm.feature("price_bin").boundaries or []) == 3 and (bins[1:] > 50).all()
    # the same value hashes to the same id in every split and run
    again = tmp_path / "again"
    prepare_dataset(cfg, again)
    assert read_split(again, "train").column("item").equals(read_split(out, "train").column("item"))


def test_fit_is_a_mergeable_reduce(tmp_path: Path) -> None:
    rows = criteo_rows(300, seed=3)
    (tmp_path / "a.tsv").write_text("\n".join(rows[:120]) + "\n")
    (tmp_path / "b.tsv").write_text("\n".join(rows[120:]) + "\n")
    (tmp_path / "all.tsv").write_text("\n".join(rows) + "\n")
    everything_train = SplitSpec(train=1.0, valid=0.0, test=0.0)
    cfg2 = criteo_cfg([tmp_path / "a.tsv", tmp_path / "b.tsv"], split=everything_train)
    cfg1 = criteo_cfg(tmp_path / "all.tsv", split=everything_train)
    fitted = []
    for cfg in (cfg1, cfg2):
        srcs = resolve_paths(cfg)
        plan = plan_split(cfg, srcs)
        fitted.append(finalize_features(cfg, merge_stats([fit_file(cfg, plan, s) for s in srcs])))
    for name in fitted[0].vocabs:
        assert fitted[0].vocabs[name].equals(fitted[1].vocabs[name])
    for a, b in zip(fitted[0].infos, fitted[1].infos, strict=True):
        assert a.num_embeddings == b.num_embeddings
        assert a.mean == pytest.approx(b.mean, rel=1e-12) and a.std == pytest.approx(b.std, rel=1e-12)


def test_config_errors(tmp_path: Path) -> None:
    p = tmp_path / "c.tsv"
    p.write_text("\n".join(criteo_rows(10)) + "\n")
    cfg = criteo_cfg(p)
    cfg.features[20].hash_buckets = 1
    with pytest.raises(ConfigError, match="hash_buckets must be >= 2"):
        prepare_dataset(cfg, tmp_path / "o")
    h = tmp_path / "h.csv"
    h.write_text("a,b\n")
    cfg = DatasetConfig(dataset_id="h", format="csv", paths=[str(h)], label="a",
                        features=[FeatureSpec(name="b", kind="sparse")])
    with pytest.raises(DataError, match="no data rows"):
        prepare_dataset(cfg, tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
@pytest.mark.parametrize("name", ["criteo", "avazu", "ids2017"])
def test_prepare_shared_samples(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    cfg = load_dataset_config(REPO / "configs" / "datasets" / f"{name}.yaml")
    if not all(Path(p).exists() for p in cfg.paths):
        pytest.skip("shared sample missing")
    rep = prepare_dataset(cfg, tmp_path / name)
    assert rep.rows_in == sum(rep.rows_out.values()) + rep.rows_rejected
    assert rep.rows_rejected <= cfg.max_reject_fraction * rep.rows_in
    fm = FeatureMap.load(tmp_path / name)
    t = read_split(tmp_path / name, "train")
    for f in fm.features:
        if f.is_categorical:
            ids = t.column(f.name).to_numpy()
            assert ids.min() >= 0 and ids.max() < f.num_embeddings
    if name == "ids2017":
        assert t.schema.field("count").type == pa.float32() and set(t.column("label").to_pylist()) == {1.0}
    if name == "avazu":
        assert fm.feature("hour_of_day").num_embeddings > 1
