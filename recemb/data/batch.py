"""Arrow record batches to ``Batch``: dense floats, a ``KeyedJaggedTensor``, labels.

``Batch`` is the one batch type of the project and ``KeyedJaggedTensor`` the one
sparse input type (as in torchrec). ``ParquetBatches`` streams prepared Parquet
shards with a bounded shuffle buffer; Ray Data reuses ``arrow_to_batch``.

Example:
    >>> fm = FeatureMap.load("data/synthetic_ctr")                   # doctest: +SKIP
    >>> for batch in ParquetBatches(fm, "train", batch_size=4096):   # doctest: +SKIP
    ...     logits = model(batch)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from recemb.data.schema import FeatureMap
from recemb.errors import DataError


@dataclass
class Batch(Pipelineable):
    """One training batch.

    ``dense`` is ``[B, num_dense]`` float32, ``sparse`` a KJT keyed by the feature
    map's sparse features (ids, one bag per sample and key), ``labels`` ``[B]``
    float32; ``weights`` is an optional ``[B]`` per-sample weight (event counts).
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor
    weights: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        """Number of samples."""
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Copy to ``device`` (torchrec's train pipelines call this)."""
        return Batch(
            dense=self.dense.to(device, non_blocking=non_blocking),
            sparse=self.sparse.to(device=torch.device(device), non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            weights=None if self.weights is None else self.weights.to(device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        """Tell the CUDA caching allocator these tensors are used on ``stream``."""
        self.dense.record_stream(stream)
        self.sparse.record_stream(stream)
        self.labels.record_stream(stream)
        if self.weights is not None:
            self.weights.record_stream(stream)

    def pin_memory(self) -> Batch:
        """Pinned-memory copy, for fast (and, with ``to(..., non_blocking=True)``, overlapped)
        host-to-device transfer; needs a CUDA build of torch."""
        return Batch(
            dense=self.dense.pin_memory(),
            sparse=self.sparse.pin_memory(),
            labels=self.labels.pin_memory(),
            weights=None if self.weights is None else self.weights.pin_memory(),
        )


def _column_ids(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Return (values, lengths) of an int64 or list<int64> column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        offsets = column.offsets.to_numpy(zero_copy_only=False)
        lengths = np.diff(offsets)
        start, stop = int(offsets[0]), int(offsets[-1])
        values = column.values.slice(start, stop - start).to_numpy(zero_copy_only=False)
        return values.astype(np.int64, copy=False), lengths.astype(np.int64, copy=False)
    values = column.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    return values, np.ones(len(values), dtype=np.int64)


def arrow_to_batch(table: pa.Table | pa.RecordBatch, feature_map: FeatureMap) -> Batch:
    """Convert prepared rows into a ``Batch`` following ``feature_map``'s column order.

    Example:
        >>> batch = arrow_to_batch(pq.read_table(path), fm)  # doctest: +SKIP
        >>> batch.sparse.keys() == fm.sparse_features        # doctest: +SKIP
        True
    """
    n = table.num_rows
    dense_names = feature_map.dense_features
    if dense_names:
        dense = np.stack(
            [table.column(name).to_numpy(zero_copy_only=False) for name in dense_names], axis=1
        ).astype(np.float32, copy=False)
    else:
        dense = np.zeros((n, 0), dtype=np.float32)
    values_parts, length_parts = [], []
    for name in feature_map.sparse_features:
        values, lengths = _column_ids(table.column(name))
        values_parts.append(values)
        length_parts.append(lengths)
    keys = feature_map.sparse_features
    values = np.concatenate(values_parts) if values_parts else np.zeros(0, dtype=np.int64)
    lengths = np.concatenate(length_parts) if length_parts else np.zeros(0, dtype=np.int64)
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths)
    )
    label_col = feature_map.label
    if label_col and label_col in table.column_names:
        labels = torch.from_numpy(table.column(label_col).to_numpy(zero_copy_only=False).astype(np.float32))
    else:
        labels = torch.zeros(n, dtype=torch.float32)
    weights = None
    if feature_map.count_column and feature_map.count_column in table.column_names:
        raw = table.column(feature_map.count_column).to_numpy(zero_copy_only=False)
        weights = torch.from_numpy(raw.astype(np.float32))
    return Batch(dense=torch.from_numpy(np.ascontiguousarray(dense)), sparse=sparse, labels=labels,
                 weights=weights)


def joins_previous(share: int, batch_size: int) -> bool:
    """Whether a short last batch of ``share`` rows per rank joins the batch before it.

    It does when it is under half a batch or a single row: an Adam or Adagrad step on a
    handful of rows moves the weights about as far as a full step, on a noisy gradient,
    and batch norm cannot train on one row. Otherwise it is its own, shorter step.

    Example:
        >>> joins_previous(4065, 4096), joins_previous(100, 4096), joins_previous(1, 2)
        (False, True, True)
    """
    return 0 < share and (2 * share < batch_size or share < 2)


def join_small_last(tables: Iterable[pa.Table], batch_size: int, world_size: int = 1) -> Iterator[pa.Table]:
    """``tables`` (batches of equal size but the last) with a small last one joined to the one
    before (``joins_previous`` of its share per rank); holds one table back to know.

    Example:
        >>> parts = [pa.table({"x": list(range(n))}) for n in (8, 8, 3)]
        >>> [t.num_rows for t in join_small_last(parts, batch_size=8)]
        [8, 11]
    """
    held: pa.Table | None = None
    for table in tables:
        if held is not None and table.num_rows < held.num_rows and joins_previous(
                table.num_rows // world_size, batch_size):
            held, table = None, pa.concat_tables([held, table])
        if held is not None:
            yield held
        held = table
    if held is not None:
        yield held


class ParquetBatches:
    """Iterate ``Batch``es over one split's Parquet shards, with a bounded shuffle.

    Rows stream shard by shard; with ``shuffle_rows > 0`` a buffer of that many
    rows is permuted before batches are cut from it (seeded by ``seed`` and the
    epoch, so each epoch's order is reproducible). With ``world_size > 1`` every
    rank reads all rows in the same order and takes its equal slice of each
    global batch, so all ranks step together (Ray Data does the reading at scale).
    Every row is used: the last, short global batch is split evenly over the ranks
    (only its ``< world_size`` leftover rows are not) and, when it is small
    (``joins_previous``), it joins the batch before it; ``drop_last`` drops it instead.

    Example:
        >>> batches = ParquetBatches(fm, "train", batch_size=2048, shuffle_rows=1 << 18)
        >>> batches.set_epoch(1)                                    # doctest: +SKIP
        >>> next(iter(batches)).dense.shape                         # doctest: +SKIP
        torch.Size([2048, 13])
    """

    def __init__(
        self,
        feature_map: FeatureMap,
        split: str,
        batch_size: int,
        root: str | Path | None = None,
        shuffle_rows: int = 0,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if split not in feature_map.shards:
            raise DataError(f"split '{split}' not in feature map (have: {', '.join(feature_map.shards)})")
        self.feature_map = feature_map
        self.root = Path(root) if root is not None else Path(".")
        self.files = [self.root / f for f in feature_map.shards[split]]
        self.batch_size = batch_size
        self.shuffle_rows = shuffle_rows
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.columns = self._columns()

    def _columns(self) -> list[str]:
        fm = self.feature_map
        cols = fm.dense_features + fm.sparse_features
        if fm.label:
            cols.append(fm.label)
        if fm.count_column:
            cols.append(fm.count_column)
        return cols

    def set_epoch(self, epoch: int) -> None:
        """Change the shuffle order for the next iteration."""
        self.epoch = epoch

    def _tables(self, rng: np.random.Generator) -> Iterator[pa.Table]:
        order = rng.permutation(len(self.files)) if self.shuffle_rows else range(len(self.files))
        read_rows = max(self.batch_size * self.world_size, 8192)
        for idx in order:
            pf = pq.ParquetFile(self.files[idx])
            available = set(pf.schema_arrow.names)
            cols = [c for c in self.columns if c in available]
            for rb in pf.iter_batches(batch_size=read_rows, columns=cols):
                yield pa.Table.from_batches([rb])

    def __iter__(self) -> Iterator[Batch]:
        """This rank's slice of each global batch (see the class docstring for the last one).

        Every rank reads the same rows in the same order, so every rank yields the
        same number of equal-sized batches (sharded tables need all ranks to step together).
        """
        step = self.batch_size * self.world_size
        parts = self._global_batches()
        if self.drop_last:
            parts = (part for part in parts if part.num_rows == step)
        else:
            parts = join_small_last(parts, self.batch_size, self.world_size)
        for part in parts:
            if part.num_rows >= self.world_size:
                yield self._slice(part)

    def _global_batches(self) -> Iterator[pa.Table]:
        """Global batches of ``batch_size * world_size`` rows in this epoch's order; the last may be short."""
        rng = np.random.default_rng([self.seed, self.epoch])
        step = self.batch_size * self.world_size
        buffer: list[pa.Table] = []
        buffered = 0
        limit = max(self.shuffle_rows, step)
        for table in self._tables(rng):
            buffer.append(table)
            buffered += table.num_rows
            if buffered >= limit:
                merged = pa.concat_tables(buffer)
                if self.shuffle_rows:
                    merged = merged.take(rng.permutation(merged.num_rows))
                usable = (merged.num_rows // step) * step
                for start in range(0, usable, step):
                    yield merged.slice(start, step)
                buffer, buffered = [merged.slice(usable)], merged.num_rows - usable
        if buffered:
            merged = pa.concat_tables(buffer)
            if self.shuffle_rows:
                merged = merged.take(rng.permutation(merged.num_rows))
            for start in range(0, merged.num_rows, step):
                yield merged.slice(start, step)

    def _slice(self, part: pa.Table) -> Batch:
        """This rank's equal share of a global batch (its ``< world_size`` leftover rows go unused)."""
        per = part.num_rows // self.world_size
        return arrow_to_batch(part.slice(self.rank * per, per), self.feature_map)


def split_rows(feature_map: FeatureMap, root: str | Path, split: str) -> int:
    """Rows of ``split``: the feature map's count, else the Parquet footers' (older feature maps)."""
    if split in feature_map.rows:
        return int(feature_map.rows[split])
    return sum(pq.ParquetFile(Path(root) / f).metadata.num_rows for f in feature_map.shards.get(split, []))


def epoch_steps(rows: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps of one training epoch of ``rows`` rows at ``batch_size`` per rank.

    As ``ParquetBatches`` (and ``RayDataSource``) cut them: full global batches, then the
    short last one as its own step unless it joins the one before (``joins_previous``).

    Example:
        >>> epoch_steps(49_041, 4096), epoch_steps(49_041, 4096, world_size=2), epoch_steps(45_100, 4096)
        (12, 6, 11)
    """
    full, rest = divmod(rows, batch_size * world_size)
    share = rest // world_size
    if share == 0 or (full and joins_previous(share, batch_size)):
        return full
    return full + 1


def epoch_rows(rows: int, world_size: int = 1) -> int:
    """Rows an epoch trains over all ranks: all, but for the ``< world_size`` leftover of an even split.

    Example:
        >>> epoch_rows(49_041), epoch_rows(49_041, world_size=2)
        (49041, 49040)
    """
    return rows - rows % world_size


class BatchSource(Protocol):
    """Where a training loop gets its batches: local Parquet here, Ray Data in pipelines."""

    def batches(self, split: str, batch_size: int, epoch: int) -> Iterable[Batch]:
        """This rank's batches of ``split`` for ``epoch`` (train is shuffled, the rest not)."""
        ...

    def has_split(self, split: str) -> bool:
        """Whether ``split`` exists."""
        ...


@dataclass
class ParquetSource:
    """``BatchSource`` over a prepared folder, through ``ParquetBatches``.

    Example:
        >>> source = ParquetSource(fm, "data/synthetic_ctr", shuffle_rows=1 << 18)
        >>> next(iter(source.batches("valid", 4096, 0))).batch_size   # doctest: +SKIP
        4096
    """

    feature_map: FeatureMap
    root: str | Path
    shuffle_rows: int = 0
    seed: int = 0
    rank: int = 0
    world_size: int = 1

    def batches(self, split: str, batch_size: int, epoch: int) -> Iterable[Batch]:
        train = split == "train"
        it = ParquetBatches(
            self.feature_map, split, batch_size, root=self.root, shuffle_rows=self.shuffle_rows if train else 0,
            seed=self.seed, rank=self.rank, world_size=self.world_size,
        )
        it.set_epoch(epoch)
        return it

    def has_split(self, split: str) -> bool:
        return split in self.feature_map.shards
