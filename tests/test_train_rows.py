"""Every training row, every epoch: the last short batch is used (not dropped), on one rank and on two.

The issue's case: 49,041 rows at batch size 4096 used 45,056 rows an epoch (11 full batches);
now 12 steps train all 49,041. ``epoch_steps``/``epoch_rows`` (which the learning-rate schedule
and the small-data warning count with) agree with what ``ParquetBatches`` yields.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from dist_utils import in_process_run, run_ranks

from recemb.config.experiment import ExperimentConfig
from recemb.config.loader import from_dict
from recemb.data.batch import ParquetBatches, ParquetSource, epoch_rows, epoch_steps, joins_previous
from recemb.data.schema import FeatureInfo, FeatureMap
from recemb.train.loop import train

MakeExperiment = Callable[..., ExperimentConfig]  # the conftest fixture
TRAIN_ROWS = 16_030  # the session dataset's


def id_shards(root: Path, sizes: tuple[int, ...]) -> FeatureMap:
    """Parquet shards whose one sparse column is the row's number."""
    names, start = [], 0
    for i, n in enumerate(sizes):
        rid = np.arange(start, start + n, dtype=np.int64)
        (root / "train").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"label": np.zeros(n, np.float32), "rid": rid}), root / f"train/{i}.parquet")
        names.append(f"train/{i}.parquet")
        start += n
    return FeatureMap(dataset_id="rows", label="label",
                      features=[FeatureInfo(name="rid", kind="sparse", source="rid", num_embeddings=start)],
                      shards={"train": names}, rows={"train": start})


def epoch_ids(fm: FeatureMap, root: Path, batch_size: int, world: int, shuffle_rows: int) -> list[list[list[int]]]:
    """Row numbers of each batch of each rank, for one epoch."""
    return [[b.sparse["rid"].values().tolist() for b in ParquetBatches(
        fm, "train", batch_size, root=root, shuffle_rows=shuffle_rows, seed=3, rank=r, world_size=world)]
        for r in range(world)]


@pytest.mark.parametrize(("rows", "batch_size", "world"), [
    (49_041, 4096, 1), (49_041, 4096, 2), (45_100, 4096, 1), (100, 8, 3), (100, 7, 1), (5, 8, 2), (1, 8, 2),
    (4096 * 3 + 1, 4096, 1), (4096 * 3 + 2048, 4096, 1),
])
@pytest.mark.parametrize("shuffle_rows", [0, 1000])
def test_an_epoch_sees_every_row_once(tmp_path: Path, rows: int, batch_size: int, world: int,
                                      shuffle_rows: int) -> None:
    fm = id_shards(tmp_path, (rows // 3, rows - rows // 3))
    per_rank = epoch_ids(fm, tmp_path, batch_size, world, shuffle_rows)
    steps = {len(batches) for batches in per_rank}
    assert steps == {epoch_steps(rows, batch_size, world)}  # every rank steps together
    for i in range(steps.pop()):
        assert len({len(batches[i]) for batches in per_rank}) == 1  # equal shares of each global batch
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    assert set(seen.values()) <= {1}
    assert sum(seen.values()) == epoch_rows(rows, world) if rows >= world else not seen
    sizes = [len(b) for b in per_rank[0]]
    if len(sizes) > 1:  # only the last batch differs; a small last one has joined the one before
        assert sizes[:-1] == [batch_size] * (len(sizes) - 1)
        last = sizes[-1]
        assert joins_previous(last - batch_size, batch_size) if last > batch_size else not joins_previous(
            last, batch_size) or last == batch_size


def test_the_issues_epoch(tmp_path: Path) -> None:
    """49,041 rows at 4096: 12 steps, the last of 3,985 rows (its own step: over half a batch);
    on two ranks, 6 global batches of 8,192, the last 8,081 rows split 4,040 + 4,040 (1 left over)."""
    fm = id_shards(tmp_path, (49_041,))
    sizes = [len(b) for b in epoch_ids(fm, tmp_path, 4096, 1, 0)[0]]
    assert sizes == [4096] * 11 + [3985]
    two = epoch_ids(fm, tmp_path, 4096, 2, 0)
    assert [len(b) for b in two[0]] == [len(b) for b in two[1]] == [4096] * 5 + [4040]


def test_valid_and_test_splits_lose_nothing_either(tmp_path: Path) -> None:
    fm = id_shards(tmp_path, (1000,))
    fm.shards["valid"] = fm.shards["train"]
    source = ParquetSource(fm, tmp_path)
    assert sum(b.batch_size for b in source.batches("valid", 384, 0)) == 1000


def test_one_rank_run_trains_every_row_each_epoch(make_experiment: MakeExperiment,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Batch 1024: 15 full batches and a 16th of the last 670 rows, in each of two epochs."""
    rows: list[int] = []
    with in_process_run():
        result = train(make_experiment("lr", "train.epochs=2", "train.batch_size=1024"),
                       on_epoch_end=lambda epoch, step, path, metrics: rows.append(metrics["train_rows"]))
    assert result.steps == 2 * 16
    assert rows == result.trained_rows == [TRAIN_ROWS, TRAIN_ROWS]
    out = capsys.readouterr().out
    assert "[epoch] 0: trained 16,030 rows (the train split has 16,030)" in out


def rows_worker(rank: int, world_size: int, cfg_data: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    cfg = from_dict(ExperimentConfig, cfg_data)
    rows: list[int] = []
    result = train(cfg, on_epoch_end=lambda epoch, step, path, metrics: rows.append(metrics["train_rows"]))
    return {"steps": result.steps, "rows": rows, "trained_rows": result.trained_rows}


@pytest.mark.usefixtures("no_process_group")
def test_two_rank_run_trains_every_row(make_experiment: MakeExperiment) -> None:
    """512 x 2 = 1024-row global batches: 15 and the last 670 rows split 335 + 335."""
    results = run_ranks(rows_worker, 2, make_experiment("lr", "train.epochs=1").to_dict())
    for result in results:
        assert result["steps"] == epoch_steps(TRAIN_ROWS, 512, 2) == 16
        assert result["rows"] == result["trained_rows"] == [TRAIN_ROWS]
