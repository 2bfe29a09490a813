"""Rows drawn by count (``train.counts: sample``): the draw follows the counts, ranks split each
global batch evenly, epochs differ and repeat, and other splits come from the wrapped source."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import chisquare

from recemb.data.batch import ParquetSource
from recemb.data.preprocess import prepare_dataset
from recemb.data.resample import CountSampledSource, count_probabilities, sample_rows
from recemb.data.schema import FeatureMap, dataset_from_dict
from recemb.errors import DataError


def test_sample_rows_follow_the_counts() -> None:
    counts = np.array([1.0, 0.0, 5.0, 20.0, 74.0])
    p = count_probabilities(counts, "t")
    idx = sample_rows(p, 20_000, seed=1, epoch=0)
    observed = np.bincount(idx, minlength=len(counts))
    assert observed[1] == 0
    keep = counts > 0
    assert chisquare(observed[keep], p[keep] * len(idx)).pvalue > 1e-3
    assert not np.array_equal(idx, sample_rows(p, 20_000, seed=1, epoch=1))
    assert np.array_equal(idx, sample_rows(p, 20_000, seed=1, epoch=0))
    with pytest.raises(DataError, match="counts"):
        count_probabilities(np.zeros(3), "t")


def _events(tmp: Path) -> tuple[FeatureMap, Path]:
    src = tmp / "ev.csv"
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["u", "h", "count"])
        for i in range(40):
            w.writerow([f"u{i}", f"h{i % 4}", 1 if i else 1000])
    cfg = dataset_from_dict({"dataset_id": "ev", "format": "events", "label": None, "count_column": "count",
                             "features": [{"names": ["u", "h"], "kind": "sparse"}], "paths": [str(src)],
                             "split": {"train": 0.9, "valid": 0.1, "test": 0.0, "seed": 0}}, where="t")
    out = tmp / "out"
    prepare_dataset(cfg, out)
    return FeatureMap.load(out), out


def test_source_draws_heavy_rows_often_and_splits_ranks(tmp_path: Path) -> None:
    fm, root = _events(tmp_path)
    inner = ParquetSource(fm, root)
    one = CountSampledSource(inner, fm, root, epoch_rows=512, seed=0)
    batches = list(one.batches("train", 64, epoch=0))
    assert len(batches) == 8 and all(b.batch_size == 64 and b.weights is None for b in batches)
    first_user = int(np.asarray(batches[0].sparse["u"].values())[0])
    heavy = max(set(np.concatenate([np.asarray(b.sparse["u"].values()) for b in batches]).tolist()),
                key=lambda v: sum(int((np.asarray(b.sparse["u"].values()) == v).sum()) for b in batches))
    share = sum(int((np.asarray(b.sparse["u"].values()) == heavy).sum()) for b in batches) / 512
    assert share > 0.9 and first_user >= 0  # the row of count 1000 among 35 rows of count 1
    ranks = [list(CountSampledSource(inner, fm, root, epoch_rows=512, seed=0, rank=r, world_size=2)
                  .batches("train", 32, epoch=0)) for r in range(2)]
    assert [len(r) for r in ranks] == [8, 8]
    both = np.concatenate([np.concatenate([np.asarray(ranks[0][i].sparse["u"].values()),
                                           np.asarray(ranks[1][i].sparse["u"].values())]) for i in range(8)])
    assert np.array_equal(both, np.concatenate([np.asarray(b.sparse["u"].values()) for b in batches]))
    valid = list(one.batches("valid", 1024, epoch=0))
    assert sum(b.batch_size for b in valid) == sum(b.batch_size for b in inner.batches("valid", 1024, 0))
    assert sum(b.batch_size for b in CountSampledSource(inner, fm, root).batches("train", 1000, 0)) == \
        sum(pq_rows for pq_rows in [fm_rows(fm, root)])


def fm_rows(fm: FeatureMap, root: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(root / f).num_rows for f in fm.shards["train"])


def test_sampled_epoch_cuts_batches_as_epoch_steps(tmp_path: Path) -> None:
    from recemb.data.batch import epoch_steps

    fm, root = _events(tmp_path)
    for rows, batch, world in ((1000, 64, 1), (1001, 64, 2), (700, 256, 1), (130, 64, 2)):
        got = [list(CountSampledSource(ParquetSource(fm, root), fm, root, epoch_rows=rows, rank=r, world_size=world)
                    .batches("train", batch, 0)) for r in range(world)]
        assert len(got[0]) == epoch_steps(rows, batch, world)
        assert min(b.batch_size for b in got[0]) > 1  # no 1-row batch (batch norm)

