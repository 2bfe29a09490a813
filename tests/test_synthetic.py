"""Tests of the synthetic generators: exact Criteo TSV layout, determinism, and the planted answer.

Rows are kept small (20k) with ``vocab_scale`` shrinking the vocabularies, so each test runs in
a second or two.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from recemb.data.synthetic import (
    CtrSynthConfig,
    EventSynthConfig,
    SynthReport,
    _CtrSampler,
    _event_structure,
    _rng,
    build_planted_model,
    generate_ctr,
    generate_events,
    hex_ids,
    iter_ctr_chunks,
    observable_oracle_p,
    roc_auc,
)
from recemb.errors import ConfigError

SMALL = {"rows": 20_000, "vocab_scale": 0.01, "chunk_rows": 7_000}
HEX8 = re.compile(r"^[0-9a-f]{8}$")


@pytest.fixture(scope="module")
def small_tsv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthReport]:
    out = tmp_path_factory.mktemp("ctr") / "train.tsv"
    return out, generate_ctr(CtrSynthConfig(**SMALL), out)


def test_tsv_is_exact_criteo_layout(small_tsv: tuple[Path, SynthReport]) -> None:
    out, report = small_tsv
    lines = out.read_text().split("\n")
    assert lines[-1] == ""  # file ends with one newline, no header
    lines = lines[:-1]
    assert len(lines) == report.rows == 20_000
    missing_dense = missing_sparse = 0
    for line in lines:
        fields = line.split("\t")
        assert len(fields) == 40
        assert fields[0] in ("0", "1")
        for value in fields[1:14]:
            if value == "":
                missing_dense += 1
            else:
                assert value.isdigit() and int(value) >= 0
        for value in fields[14:]:
            if value == "":
                missing_sparse += 1
            else:
                assert HEX8.match(value), value
    dense_rate = missing_dense / (13 * len(lines))
    assert 0.04 < dense_rate < 0.11
    assert 0 < missing_sparse / (26 * len(lines)) < 0.05


def test_tsv_sidecars(small_tsv: tuple[Path, SynthReport]) -> None:
    out, report = small_tsv
    assert report.files == [str(out), f"{out}.oracle.parquet", f"{out}.json"]
    p = pq.read_table(f"{out}.oracle.parquet").column("p").to_numpy()
    labels = np.array([int(line[0]) for line in out.read_text().splitlines()])
    assert p.shape == labels.shape and p.dtype == np.float64
    assert report.oracle_auc == pytest.approx(roc_auc_score(labels, p), abs=1e-12)
    assert report.oracle_logloss == pytest.approx(log_loss(labels, p), rel=1e-9)
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["rows"] == 20_000 and meta["config"]["vocab_scale"] == 0.01
    assert meta["oracle_auc"] == report.oracle_auc
    assert meta["label_rate"] == pytest.approx(labels.mean())
    assert len(meta["details"]["noise_fields"]) == 4
    heads = meta["details"]["signal_head_ids"]
    assert all(heads[name] == 0 for name in meta["details"]["noise_fields"])
    assert sum(h > 0 for h in heads.values()) == 22
    assert not list(out.parent.glob(".*tmp*"))  # atomic writes leave no temp files


def test_default_config_is_learnable(small_tsv: tuple[Path, SynthReport]) -> None:
    _, report = small_tsv
    assert 0.2 < report.label_rate < 0.3
    assert report.oracle_auc is not None and report.oracle_auc > 0.75


def test_iter_ctr_chunks_are_the_written_rows(small_tsv: tuple[Path, SynthReport]) -> None:
    out, _ = small_tsv
    chunks = list(iter_ctr_chunks(CtrSynthConfig(**SMALL)))
    assert [len(c["label"]) for c in chunks] == [7_000, 7_000, 6_000]
    p = pq.read_table(f"{out}.oracle.parquet").column("p").to_numpy()
    labels = np.array([int(line[0]) for line in out.read_text().splitlines()])
    np.testing.assert_array_equal(np.concatenate([c["p"] for c in chunks]), p)
    np.testing.assert_array_equal(np.concatenate([c["label"] for c in chunks]), labels)
    first = out.read_text().splitlines()[0].split("\t")
    counts, missing = chunks[0]["counts"][0], chunks[0]["dense_missing"][0]
    assert first[1:14] == ["" if m else str(c) for c, m in zip(counts, missing, strict=True)]


def test_observable_oracle_is_the_oracle_given_what_is_seen() -> None:
    # Without dense signal every input of p is observed: the observable oracle is p itself.
    cfg = CtrSynthConfig(**{**SMALL, "num_dense_signal": 0, "num_dense_correlated": 0})
    chunk = next(iter_ctr_chunks(cfg))
    np.testing.assert_allclose(observable_oracle_p(build_planted_model(cfg), chunk), chunk["p"], rtol=1e-12)
    # With it, E[p | seen] averages p over the hidden latents: the same mean (tower rule), and
    # rows whose signal counts are missing (nothing seen) are pulled further toward the middle.
    cfg = CtrSynthConfig(**{**SMALL, "rows": 60_000, "chunk_rows": 60_000, "dense_effect": 1.0})
    model = build_planted_model(cfg)
    chunk = next(iter_ctr_chunks(cfg, model))
    q, p = observable_oracle_p(model, chunk), chunk["p"]
    assert ((q > 0) & (q < 1)).all()
    assert q.mean() == pytest.approx(p.mean(), abs=2e-3)
    hidden = chunk["dense_missing"][:, np.flatnonzero(model.dense_beta)].any(axis=1)
    shrink = np.abs(q - p)
    assert shrink[hidden].mean() > 2 * shrink[~hidden].mean()
    assert roc_auc(q, chunk["label"]) < roc_auc(p, chunk["label"])


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, small_tsv: tuple[Path, SynthReport]) -> None:
    out, _ = small_tsv
    again = tmp_path / "again.tsv"
    generate_ctr(CtrSynthConfig(**SMALL), again)
    assert again.read_bytes() == out.read_bytes()
    assert (
        Path(f"{again}.json").read_text().replace("again.tsv", "train.tsv") == Path(f"{out}.json").read_text()
    )
    other = tmp_path / "other.tsv"
    generate_ctr(CtrSynthConfig(**{**SMALL, "seed": 1}), other)
    assert other.read_bytes() != out.read_bytes()


def test_parquet_has_schema_and_true_p(tmp_path: Path, small_tsv: tuple[Path, SynthReport]) -> None:
    out, tsv_report = small_tsv
    path = tmp_path / "train.parquet"
    report = generate_ctr(CtrSynthConfig(**SMALL), path, fmt="parquet")
    table = pq.read_table(path)
    assert table.column_names == [
        "label",
        *[f"I{j}" for j in range(1, 14)],
        *[f"C{j}" for j in range(1, 27)],
        "_p",
    ]
    assert str(table.schema.field("I1").type) == "int64" and str(table.schema.field("C1").type) == "string"
    # The same seed gives the same rows whatever the format.
    assert report.oracle_auc == tsv_report.oracle_auc
    np.testing.assert_array_equal(
        table.column("_p").to_numpy(), pq.read_table(f"{out}.oracle.parquet").column("p").to_numpy()
    )
    assert table.column("I1").null_count > 0


def test_tsv_reads_back_like_parquet(tmp_path: Path, small_tsv: tuple[Path, SynthReport]) -> None:
    out, _ = small_tsv
    names = ["label", *[f"I{j}" for j in range(1, 14)], *[f"C{j}" for j in range(1, 27)]]
    tsv = pacsv.read_csv(
        out,
        read_options=pacsv.ReadOptions(column_names=names),
        parse_options=pacsv.ParseOptions(delimiter="\t"),
        convert_options=pacsv.ConvertOptions(
            column_types={f"C{j}": "string" for j in range(1, 27)}, strings_can_be_null=False
        ),
    )
    path = tmp_path / "train.parquet"
    generate_ctr(CtrSynthConfig(**SMALL), path, fmt="parquet")
    parquet = pq.read_table(path)
    for name in ("label", "I3", "C1", "C26"):
        assert tsv.column(name).to_pylist() == parquet.column(name).to_pylist()


def test_ids_are_zipf(tmp_path: Path) -> None:
    cfg = CtrSynthConfig(**SMALL)
    model = build_planted_model(cfg)
    sampler = _CtrSampler(cfg, model)
    ids, _, _ = sampler.sparse(_rng(0, 99), 20_000)
    big = int(np.argmax(model.vocab_sizes))
    vocab = model.vocab_sizes[big]
    counts = np.bincount(ids[:, big], minlength=vocab)
    assert counts[0] / 20_000 > 100 / vocab  # the top id is far above a uniform share
    assert counts[0] > counts[9] > counts[99]  # frequency falls with rank
    assert ids.min() >= 0 and (ids.max(axis=0) < np.asarray(model.vocab_sizes)).all()


def test_hex_tokens_are_distinct_per_field() -> None:
    ids = np.arange(100_000)
    tokens = hex_ids(ids, 3).view("S8").ravel()
    assert len(np.unique(tokens)) == ids.size
    assert not np.array_equal(tokens[:100], hex_ids(ids[:100], 4).view("S8").ravel())


def test_noise_fields_and_tail_ids_carry_no_signal() -> None:
    cfg = CtrSynthConfig(**SMALL)
    model = build_planted_model(cfg)
    assert len(model.noise_fields) == cfg.num_noise_fields
    for f in model.noise_fields:
        assert model.head_sizes[f] == 0 and model.effects[f].size == 0
        assert all(f not in pair for pair in model.pairs)
    # The logit does not move when a noise field's ids or a tail id change.
    sampler = _CtrSampler(cfg, model)
    ids, missing, logit = sampler.sparse(_rng(0, 98), 5_000)
    shuffled = ids.copy()
    rng = np.random.default_rng(0)
    for f in model.noise_fields:
        shuffled[:, f] = rng.permutation(shuffled[:, f])
    head = np.asarray(model.head_sizes)
    tail = ids >= head
    shuffled[tail] = np.minimum(ids[tail] + 1, np.asarray(model.vocab_sizes)[np.nonzero(tail)[1]] - 1)

    def logit_of(x: np.ndarray) -> np.ndarray:
        slot = np.where((x < head) & ~missing, x, head)
        out = sum(sampler.effects[f][slot[:, f]] for f in range(cfg.num_sparse) if head[f])
        for (a, b), u, v in zip(model.pairs, sampler.pair_u, sampler.pair_v, strict=True):
            out = out + np.einsum("ij,ij->i", u[slot[:, a]], v[slot[:, b]])
        return out

    np.testing.assert_allclose(logit_of(ids), logit, rtol=1e-12)
    np.testing.assert_allclose(logit_of(shuffled), logit, rtol=1e-12)


def test_config_errors_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="num_sparse"):
        CtrSynthConfig(vocab_sizes=(10, 20))
    with pytest.raises(ConfigError, match="tsv"):
        generate_ctr(CtrSynthConfig(rows=10), "x.csv", fmt="csv")
    with pytest.raises(ConfigError, match="anomaly_rate"):
        EventSynthConfig(anomaly_rate=1.5)
    assert len(CtrSynthConfig().resolved_vocab_sizes()) == 26
    assert max(CtrSynthConfig().resolved_vocab_sizes()) == 1_000_000


# ---------------------------------------------------------------------------------------------
# Events

EVENTS = {"train_events": 20_000, "test_events": 5_000, "anomaly_rate": 0.08}


@pytest.fixture(scope="module")
def events_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthReport]:
    out = tmp_path_factory.mktemp("events")
    return out, generate_events(EventSynthConfig(**EVENTS), out)


def test_events_files_and_labels(events_dir: tuple[Path, SynthReport]) -> None:
    out, report = events_dir
    train = pacsv.read_csv(out / "train.csv")
    test = pacsv.read_csv(out / "test.csv")
    assert train.column_names == ["user", "host", "process", "port", "action", "count"]
    assert test.column_names == [*train.column_names, "label"]
    labels = test.column("label").to_numpy()
    assert set(labels.tolist()) == {1, -1}
    assert np.mean(labels == -1) == pytest.approx(0.08, abs=0.01)
    assert train.column("count").to_numpy().sum() == 20_000
    assert train.num_rows < 20_000  # duplicates aggregated
    meta = json.loads((out / "synth.json").read_text())
    assert meta["anomaly_rate"] == report.anomaly_rate
    assert meta["details"]["train_rows"] == train.num_rows == report.rows


def test_events_deterministic(tmp_path: Path, events_dir: tuple[Path, SynthReport]) -> None:
    out, _ = events_dir
    generate_events(EventSynthConfig(**EVENTS), tmp_path / "a")
    generate_events(EventSynthConfig(**{**EVENTS, "seed": 3}), tmp_path / "b")
    for name in ("train.csv", "test.csv", "synth.json"):
        assert (tmp_path / "a" / name).read_bytes() == (out / name).read_bytes()
    assert (tmp_path / "b" / "train.csv").read_bytes() != (out / "train.csv").read_bytes()


def test_events_follow_groups_and_anomalies_break_them(events_dir: tuple[Path, SynthReport]) -> None:
    out, _ = events_dir
    cfg = EventSynthConfig(**EVENTS)
    structure = _event_structure(cfg)

    def in_group(table_path: Path) -> tuple[np.ndarray, np.ndarray]:
        table = pacsv.read_csv(table_path)
        ids = {
            name: np.array([int(v.split("_")[-1]) for v in table.column(name).to_pylist()])
            for name in cfg.entity_types
        }
        groups = structure.user_group[ids["user"]]
        ok = np.ones(table.num_rows, dtype=bool)
        for e, name in enumerate(cfg.entity_types[1:]):
            own = structure.group_values[e][groups]
            ok &= (own == ids[name][:, None]).any(axis=1)
        labels = (
            table.column("label").to_numpy() if "label" in table.column_names else np.ones(table.num_rows)
        )
        return ok, labels

    train_ok, _ = in_group(out / "train.csv")
    assert train_ok.all()
    test_ok, labels = in_group(out / "test.csv")
    assert test_ok[labels == 1].all()
    assert not test_ok[labels == -1].any()
    # The structure is sparse: a user's hosts are a small set, not the whole vocabulary.
    assert structure.group_values[0].shape[1] * 10 < cfg.cardinalities[1]


def test_roc_auc_ties_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=1_000).astype(float)
    labels = rng.integers(0, 2, size=1_000)
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
