"""A labelled event file as a split of prepared event data, ids from the training vocabularies.

Event data trains on normal events only; its test is another file with labels (IDS2017's
``test.csv``, ``recemb synth events``' ``test.csv``). ``recemb prepare`` assigns splits by
row, not by file, so this encodes such a file through the prepared ``feature_map.json``
exactly as preparation would (``recemb.data.encode``: the dataset's own reader and row
checks, values unseen in training -> each type's OOV id) and records it as a split
(default ``test``, replacing the held-out rows there). It belongs in ``recemb.data`` once
preparation can assign whole files to splits.

Example:
    $ python -m recemb.models.anomaly.labelled data/synthetic_events data/synthetic/events/test.csv
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from recemb.data.encode import encode_file, raw_config
from recemb.data.preprocess import LABEL_COLUMN
from recemb.data.schema import FeatureMap, name_problem, path_under
from recemb.errors import DataError
from recemb.io import replace_folder


@dataclass
class LabelledSplit:
    """What was attached: rows, label counts, per type the share of values unseen in training, and the
    rows the reader refused (by reason)."""

    split: str
    rows: int
    labels: dict[str, int]
    unseen: dict[str, float]
    file: str
    rejected: dict[str, int] = field(default_factory=dict)


def attach_labelled_split(data_dir: str | Path, path: str | Path, split: str = "test", label: str = "label",
                          count: str | None = "count") -> LabelledSplit:
    """Write ``path`` (in the dataset's own format, with a label column) as split ``split`` of ``data_dir``.

    ``label`` is the file's label column (kept as is: the task's convention reads it);
    ``count`` its occurrence column, if it has one (else every row counts once; ``None``: the
    feature map's count column). The shards go to ``<split>_labelled/`` (swapped in whole) and
    the feature map is rewritten (atomically) to list them.
    """
    problem = name_problem(split)
    if problem:
        raise DataError(f"split {problem}")
    data_dir = Path(data_dir)
    fm = FeatureMap.load(data_dir / "feature_map.json")
    if fm.dense_features:
        raise DataError(f"{data_dir}: event data has only entity types; this one has dense {fm.dense_features}")
    count_column = count or fm.count_column or "count"
    cfg = raw_config(fm, path, {"label": label, "count_column": count_column})
    folder = path_under(data_dir, f"{split}_labelled", DataError)
    tmp = data_dir / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        encoded = encode_file(fm, cfg, tmp)
        replace_folder(tmp, folder, overwrite=True, exists_message="")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shards = [f"{folder.name}/{p.name}" for p in encoded.shards]
    fm.label = fm.label or LABEL_COLUMN
    fm.count_column = count_column
    fm.shards[split] = shards
    fm.rows[split] = encoded.rows
    fm.save(data_dir / "feature_map.json")
    labels = np.concatenate([pq.read_table(data_dir / s, columns=[LABEL_COLUMN]).column(0).to_numpy()
                             for s in shards])
    values, counts = np.unique(labels, return_counts=True)
    return LabelledSplit(split=split, rows=encoded.rows, unseen=encoded.unseen, file=str(data_dir / shards[0]),
                         labels={f"{v:g}": int(c) for v, c in zip(values, counts, strict=True)},
                         rejected=encoded.rejected)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m recemb.models.anomaly.labelled <prepared data dir> <labelled events csv>")
    print(attach_labelled_split(sys.argv[1], sys.argv[2]))
