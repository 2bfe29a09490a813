"""Tests for recemb.data.batch: exact KJT layout of ``arrow_to_batch`` and ``ParquetBatches`` order.

``ParquetBatches`` is checked over small Parquet shards whose ``rid`` sparse column holds
each row's number, so every property (each row once per epoch, reproducible shuffles,
disjoint per-rank shares) is a statement about row ids.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recemb.data.batch import Batch, ParquetBatches, arrow_to_batch
from recemb.data.schema import FeatureInfo, FeatureMap
from recemb.errors import DataError

# ----------------------------------------------------------------------------- arrow_to_batch


def toy_map(count_column: str | None = "count") -> FeatureMap:
    """Features in a different order than the table's columns: the map decides the order."""
    return FeatureMap(
        dataset_id="toy",
        label="label",
        count_column=count_column,
        features=[
            FeatureInfo(name="d0", kind="dense", source="d0"),
            FeatureInfo(name="s0", kind="sparse", source="s0", num_embeddings=10),
            FeatureInfo(name="tags", kind="multihot", source="tags", num_embeddings=10),
            FeatureInfo(name="d1", kind="dense", source="d1"),
            FeatureInfo(name="s1", kind="sparse", source="s1", num_embeddings=10),
        ],
    )


def toy_table() -> pa.Table:
    return pa.table({
        "label": pa.array([1.0, 0.0, 1.0, 0.0], pa.float32()),
        "count": pa.array([1.0, 3.0, 2.0, 5.0], pa.float32()),
        "s1": pa.array([9, 8, 0, 4], pa.int64()),
        "tags": pa.array([[1, 2], [], [3], [4, 5, 6]], pa.list_(pa.int64())),
        "d1": pa.array([0.5, -1.0, 0.0, 2.0], pa.float32()),
        "s0": pa.array([5, 6, 7, 1], pa.int64()),
        "d0": pa.array([1.0, 2.0, 3.0, 4.0], pa.float64()),
    })


def test_arrow_to_batch_exact_layout() -> None:
    batch = arrow_to_batch(toy_table(), toy_map())
    assert batch.batch_size == 4
    kjt = batch.sparse
    assert kjt.keys() == ["s0", "tags", "s1"]
    assert kjt.stride() == 4
    assert torch.equal(kjt.lengths(), torch.tensor([1, 1, 1, 1, 2, 0, 1, 3, 1, 1, 1, 1]))
    assert torch.equal(kjt.offsets(), torch.tensor([0, 1, 2, 3, 4, 6, 6, 7, 10, 11, 12, 13, 14]))
    assert torch.equal(kjt.values(), torch.tensor([5, 6, 7, 1, 1, 2, 3, 4, 5, 6, 9, 8, 0, 4]))
    assert kjt.values().dtype == torch.int64
    assert torch.equal(kjt["tags"].values(), torch.tensor([1, 2, 3, 4, 5, 6]))
    assert torch.equal(kjt["tags"].lengths(), torch.tensor([2, 0, 1, 3]))
    assert batch.dense.dtype == torch.float32 and batch.dense.shape == (4, 2)
    assert torch.equal(batch.dense, torch.tensor([[1.0, 0.5], [2.0, -1.0], [3.0, 0.0], [4.0, 2.0]]))
    assert torch.equal(batch.labels, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert batch.weights is not None and torch.equal(batch.weights, torch.tensor([1.0, 3.0, 2.0, 5.0]))


def test_arrow_to_batch_on_a_slice_and_on_chunks() -> None:
    """A sliced list column has offsets that do not start at 0; chunked columns are combined."""
    fm = toy_map()
    part = arrow_to_batch(toy_table().slice(1, 2), fm)
    assert torch.equal(part.sparse.lengths(), torch.tensor([1, 1, 0, 1, 1, 1]))
    assert torch.equal(part.sparse.values(), torch.tensor([6, 7, 3, 8, 0]))
    assert torch.equal(part.dense, torch.tensor([[2.0, -1.0], [3.0, 0.0]]))
    table = toy_table()
    chunked = pa.concat_tables([table.slice(0, 1), table.slice(1, 3)])
    assert chunked.column("tags").num_chunks == 2
    whole, again = arrow_to_batch(table, fm), arrow_to_batch(chunked, fm)
    assert torch.equal(whole.sparse.offsets(), again.sparse.offsets())
    assert torch.equal(whole.sparse.values(), again.sparse.values())
    assert torch.equal(whole.dense, again.dense)


def test_arrow_to_batch_without_label_or_count() -> None:
    table = toy_table().drop_columns(["label", "count"])
    batch = arrow_to_batch(table, toy_map(count_column=None))
    assert batch.weights is None
    assert torch.equal(batch.labels, torch.zeros(4))


def test_batch_to_keeps_everything() -> None:
    batch = arrow_to_batch(toy_table(), toy_map()).to("cpu")
    assert isinstance(batch, Batch)
    assert batch.sparse.keys() == ["s0", "tags", "s1"]
    assert batch.weights is not None and batch.weights.tolist() == [1.0, 3.0, 2.0, 5.0]


# ----------------------------------------------------------------------------- ParquetBatches

SHARD_ROWS = (25, 30, 17, 28)
TOTAL = sum(SHARD_ROWS)


def write_shards(root: Path, sizes: tuple[int, ...] = SHARD_ROWS) -> FeatureMap:
    """Parquet shards of consecutive row ids, with a feature map listing them."""
    names, start = [], 0
    for i, n in enumerate(sizes):
        rid = np.arange(start, start + n, dtype=np.int64)
        table = pa.table({"label": (rid % 2).astype(np.float32), "x": rid.astype(np.float32), "rid": rid})
        name = f"train/part-{i:05d}.parquet"
        (root / "train").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / name, row_group_size=10)
        names.append(name)
        start += n
    return FeatureMap(
        dataset_id="rows", label="label",
        features=[FeatureInfo(name="x", kind="dense", source="x"),
                  FeatureInfo(name="rid", kind="sparse", source="rid", num_embeddings=start)],
        shards={"train": names}, rows={"train": start},
    )


def row_ids(batches: ParquetBatches) -> list[list[int]]:
    """Row ids of each batch, checking the dense column and labels travel with them."""
    out = []
    for batch in batches:
        ids = batch.sparse["rid"].values()
        assert torch.equal(batch.dense[:, 0], ids.float())
        assert torch.equal(batch.labels, (ids % 2).float())
        out.append(ids.tolist())
    return out


@pytest.mark.parametrize("shuffle_rows", [0, 16, 1000])
@pytest.mark.parametrize("batch_size", [8, 7, 200])
def test_every_row_once_per_epoch(tmp_path: Path, shuffle_rows: int, batch_size: int) -> None:
    fm = write_shards(tmp_path)
    batches = ParquetBatches(fm, "train", batch_size, root=tmp_path, shuffle_rows=shuffle_rows, seed=1)
    for epoch in range(2):
        batches.set_epoch(epoch)
        per_batch = row_ids(batches)
        assert sorted(i for b in per_batch for i in b) == list(range(TOTAL))
        sizes = [len(b) for b in per_batch]
        assert sizes[:-1] == [batch_size] * (len(sizes) - 1)
        assert sizes[-1] == TOTAL - batch_size * (len(sizes) - 1)


def test_without_shuffle_rows_come_in_file_order(tmp_path: Path) -> None:
    fm = write_shards(tmp_path)
    ids = [i for b in row_ids(ParquetBatches(fm, "train", 8, root=tmp_path)) for i in b]
    assert ids == list(range(TOTAL))


@pytest.mark.parametrize("shuffle_rows", [0, 16])
def test_drop_last(tmp_path: Path, shuffle_rows: int) -> None:
    fm = write_shards(tmp_path)
    batches = ParquetBatches(fm, "train", 8, root=tmp_path, shuffle_rows=shuffle_rows, drop_last=True)
    per_batch = row_ids(batches)
    assert [len(b) for b in per_batch] == [8] * (TOTAL // 8)
    ids = [i for b in per_batch for i in b]
    assert len(set(ids)) == len(ids) == TOTAL - TOTAL % 8


def test_shuffle_reproducible_by_seed_and_epoch(tmp_path: Path) -> None:
    fm = write_shards(tmp_path)

    def order(seed: int, epoch: int) -> list[int]:
        it = ParquetBatches(fm, "train", 8, root=tmp_path, shuffle_rows=32, seed=seed)
        it.set_epoch(epoch)
        return [i for b in row_ids(it) for i in b]

    first = order(0, 0)
    assert first == order(0, 0)
    assert first != list(range(TOTAL))
    assert order(0, 1) != first
    assert order(0, 1) == order(0, 1)
    assert order(1, 0) != first
    # Iterating the same object twice in one epoch repeats the order (resume relies on it).
    it = ParquetBatches(fm, "train", 8, root=tmp_path, shuffle_rows=32, seed=0)
    assert row_ids(it) == row_ids(it)


@pytest.mark.parametrize(
    ("sizes", "world_size"),
    [(SHARD_ROWS, 2), (SHARD_ROWS, 3), (SHARD_ROWS, 4), ((TOTAL,), 2), ((48, 52), 4)],
)
@pytest.mark.parametrize("shuffle_rows", [0, 32])
def test_ranks_step_together_on_disjoint_shares(
    tmp_path: Path, sizes: tuple[int, ...], world_size: int, shuffle_rows: int
) -> None:
    """Every rank gets the same number of equal-sized batches; shares are disjoint and
    cover all rows but the < world_size leftover of the last global batch."""
    fm = write_shards(tmp_path, sizes)
    per_rank = []
    for rank in range(world_size):
        it = ParquetBatches(fm, "train", 8, root=tmp_path, shuffle_rows=shuffle_rows, seed=0,
                            rank=rank, world_size=world_size)
        per_rank.append(row_ids(it))
    assert len({len(batches) for batches in per_rank}) == 1
    for step in range(len(per_rank[0])):
        assert len({len(batches[step]) for batches in per_rank}) == 1
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    assert set(seen.values()) == {1}
    last = TOTAL % (8 * world_size)
    assert len(seen) == TOTAL - last % world_size


def test_unknown_split(tmp_path: Path) -> None:
    fm = write_shards(tmp_path)
    with pytest.raises(DataError, match="split 'valid' not in feature map"):
        ParquetBatches(fm, "valid", 8, root=tmp_path)
