"""Ray Data as the batch source of a Ray Train worker.

Each worker reads its equal split (``streaming_split(equal=True)`` through Ray
Train's dataset shards) of the prepared Parquet and converts Arrow batches with
the same ``arrow_to_batch`` as the local path. Equal splits mean every rank runs
the same number of steps, which sharded tables require. Every row of a worker's
split is used: a small last batch joins the one before, as in ``ParquetBatches``
(the equal split itself leaves out the ``< workers`` rows that do not divide).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train

from pipelines.ray_progress import ProgressPoster
from recemb.data.batch import Batch, arrow_to_batch, join_small_last
from recemb.data.schema import FeatureMap


@dataclass
class FailureInjection:
    """Kill ``rank`` with ``os._exit`` at its ``step``-th train batch, once (for tests).

    ``marker`` is a file created just before the kill; when it exists the run is a
    restart and nothing is injected again.
    """

    rank: int
    step: int
    marker: str


class RayDataSource:
    """``BatchSource`` over this worker's Ray Data shards (``ray.train.get_dataset_shard``)."""

    def __init__(self, feature_map: FeatureMap, shuffle_rows: int = 0, seed: int = 0,
                 fail: FailureInjection | None = None, progress: Any = None) -> None:
        self.feature_map = feature_map
        self.poster = ProgressPoster(progress) if progress is not None else None
        self.shuffle_rows = shuffle_rows
        self.seed = seed
        self.fail = fail
        self.rank = ray.train.get_context().get_world_rank()
        self._train_batches = 0

    def has_split(self, split: str) -> bool:
        return split in self.feature_map.shards

    def batches(self, split: str, batch_size: int, epoch: int) -> Iterable[Batch]:
        shard = ray.train.get_dataset_shard(split)
        train = split == "train"
        tables = shard.iter_batches(
            batch_size=batch_size,
            batch_format="pyarrow",
            drop_last=False,
            local_shuffle_buffer_size=self.shuffle_rows or None if train else None,
            local_shuffle_seed=(self.seed * 1000 + epoch) if train and self.shuffle_rows else None,
        )
        return self._convert(join_small_last(tables, batch_size), train, epoch)  # type: ignore[arg-type]

    def _convert(self, tables: Iterable[object], train: bool, epoch: int) -> Iterator[Batch]:
        rows = 0
        for table in tables:
            if train:
                self._maybe_fail()
            batch = arrow_to_batch(table, self.feature_map)  # type: ignore[arg-type]
            if train:
                rows += batch.batch_size
                self.train_rows_seen(epoch, rows, batch.batch_size)
            yield batch

    def train_rows_seen(self, epoch: int, rows_in_epoch: int, batch_rows: int) -> None:
        """Progress of this rank's training rows (posted to the driver's board from rank 0).

        Sources that draw the training rows themselves (``CountSampledSource``) call it too,
        with ``before_train_batch``, so progress and failure injection see their batches.
        """
        if self.poster is not None:
            self.poster.rows(epoch, rows_in_epoch, batch_rows)

    def before_train_batch(self) -> None:
        """The failure-injection hook, once per training batch (see ``FailureInjection``)."""
        self._maybe_fail()

    def _maybe_fail(self) -> None:
        self._train_batches += 1
        fail = self.fail
        if fail is None or fail.rank != self.rank or self._train_batches < fail.step:
            return
        marker = Path(fail.marker)
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"killed rank {self.rank} at train batch {self._train_batches}\n")
        os._exit(1)
