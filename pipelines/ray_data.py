"""Ray Data as the batch source of a Ray Train worker.

Each worker reads its equal split (``streaming_split(equal=True)`` through Ray
Train's dataset shards) of the prepared Parquet and converts Arrow batches with
the same ``arrow_to_batch`` as the local path. Equal splits mean every rank runs
the same number of steps, which sharded tables require. Every row of a worker's
split is used: a small last batch joins the one before, as in ``ParquetBatches``
(the equal split itself leaves out the ``< workers`` rows that do not divide).
"""

from __future__ import annotations

import itertools
import os
import threading
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
        self._startup_marked = False
        self._opened: tuple[int, int, _FirstTable] | None = None

    def has_split(self, split: str) -> bool:
        return split in self.feature_map.shards

    def open_train(self, batch_size: int, epoch: int = 0) -> None:
        """Start reading ``epoch``'s training rows now, in a thread, for ``batches`` to take over.

        Ray Data's first batch of a run waits on actors and read tasks starting (seconds, the
        longest stage before the first step on a loaded 2-core machine); started before the
        model is built, that wait runs beside the build. Every rank must call it (or none):
        ranks share one streaming split. ``batches('train', batch_size, epoch)`` uses it.
        """
        self._opened = (batch_size, epoch, _FirstTable(self._train_tables(batch_size, epoch)))

    def batches(self, split: str, batch_size: int, epoch: int) -> Iterable[Batch]:
        train = split == "train"
        if train:
            opened, self._opened = self._opened, None
            tables: Iterable[object] = opened[2] if opened is not None and opened[:2] == (batch_size, epoch) \
                else self._train_tables(batch_size, epoch)
        else:
            tables = ray.train.get_dataset_shard(split).iter_batches(
                batch_size=batch_size, batch_format="pyarrow", drop_last=False)
        return self._convert(join_small_last(tables, batch_size), train, epoch)  # type: ignore[arg-type]

    def _train_tables(self, batch_size: int, epoch: int) -> Iterable[object]:
        shard = ray.train.get_dataset_shard("train")
        return shard.iter_batches(
            batch_size=batch_size,
            batch_format="pyarrow",
            drop_last=False,
            local_shuffle_buffer_size=self.shuffle_rows or None,
            local_shuffle_seed=(self.seed * 1000 + epoch) if self.shuffle_rows else None,
        )

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

    def _mark_startup(self) -> None:
        """Rank 0's start-up marks for the driver's line: the first training batch is read (called
        before its first batch) and the first step is done (before the second: the loop asks for a
        batch only after stepping on the one before)."""
        if self.poster is None or self._startup_marked:
            return
        if self._train_batches == 1:
            self.poster.mark("batch")
        elif self._train_batches == 2:
            self.poster.mark("step")
            self._startup_marked = True

    def _maybe_fail(self) -> None:
        self._train_batches += 1
        self._mark_startup()
        fail = self.fail
        if fail is None or fail.rank != self.rank or self._train_batches < fail.step:
            return
        marker = Path(fail.marker)
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"killed rank {self.rank} at train batch {self._train_batches}\n")
        os._exit(1)


class _FirstTable(Iterator[object]):
    """``tables`` with its first item read in a background thread from construction on; the
    iterator is then used from the caller's thread only (never from two at once)."""

    def __init__(self, tables: Iterable[object]) -> None:
        self._tables = iter(tables)
        self._first: list[object] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._read_first, name="recemb-first-batch", daemon=True)
        self._thread.start()
        self._rest: Iterator[object] | None = None

    def _read_first(self) -> None:
        try:
            self._first.extend(itertools.islice(self._tables, 1))
        except BaseException as exc:  # raised again in the caller's thread
            self._error = exc

    def __next__(self) -> object:
        if self._rest is None:
            self._thread.join()
            if self._error is not None:
                raise self._error
            self._rest = itertools.chain(self._first, self._tables)
        return next(self._rest)
