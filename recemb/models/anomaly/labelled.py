"""A labelled event file as a split of prepared event data, ids from the training vocabularies.

Event data trains on normal events only; its test is another file with labels (IDS2017's
``test.csv``, ``recemb synth events``' ``test.csv``). ``recemb prepare`` assigns splits by
row, not by file, so this maps such a file through the prepared ``feature_map.json``'s
vocabularies (values unseen in training -> each type's OOV id, as preparation does) and
records it as a split (default ``test``, replacing the held-out rows there). It belongs in
``recemb.data`` once preparation can assign whole files to splits.

Example:
    $ python -m recemb.models.anomaly.labelled data/synthetic_events data/synthetic/events/test.csv
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from recemb.data.hashing import hash_buckets
from recemb.data.preprocess import LABEL_COLUMN, VocabIndex, as_string, load_vocab
from recemb.data.schema import FeatureMap, name_problem, path_under
from recemb.errors import DataError
from recemb.io import atomic_path


@dataclass
class LabelledSplit:
    """What was attached: rows, label counts, and per type the share of values unseen in training."""

    split: str
    rows: int
    labels: dict[str, int]
    unseen: dict[str, float]
    file: str


def encode_events(feature_map: FeatureMap, table: pa.Table) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Ids of every entity type of ``table`` (raw values) and the share of unseen values per type."""
    ids: dict[str, np.ndarray] = {}
    unseen: dict[str, float] = {}
    for name in feature_map.sparse_features:
        info = feature_map.feature(name)
        if info.source not in table.column_names:
            raise DataError(f"column '{info.source}' (entity type {name}) is missing; have {table.column_names}")
        values = as_string(table.column(info.source).combine_chunks())
        if info.hash_buckets:
            col = hash_buckets(values, info.hash_seed, info.hash_buckets).astype(np.int64)
        else:
            if not info.vocab_file:
                raise DataError(f"entity type {name} has neither a vocabulary nor hash buckets")
            vocab = load_vocab(path_under(feature_map.root, info.vocab_file, DataError))
            pos = VocabIndex(vocab.column("value").combine_chunks()).lookup(values)
            vocab_ids = vocab.column("id").to_numpy()
            col = np.where(pos > 0, vocab_ids[np.maximum(pos, 1) - 1], info.oov_id).astype(np.int64)
        ids[name] = col
        unseen[name] = float(np.mean(col == info.oov_id)) if len(col) else 0.0
    return ids, unseen


def attach_labelled_split(data_dir: str | Path, path: str | Path, split: str = "test", label: str = "label",
                          count: str | None = "count") -> LabelledSplit:
    """Write ``path`` (CSV with a header) as split ``split`` of the prepared ``data_dir``.

    ``label`` is the file's label column (kept as is: the task's convention reads it);
    ``count`` its occurrence column, if it has one (else every row counts once). The
    feature map is rewritten (atomically) to list the new shard.
    """
    problem = name_problem(split)
    if problem:
        raise DataError(f"split {problem}")
    data_dir = Path(data_dir)
    fm = FeatureMap.load(data_dir / "feature_map.json")
    if fm.dense_features:
        raise DataError(f"{data_dir}: event data has only entity types; this one has dense {fm.dense_features}")
    sources = {fm.feature(n).source for n in fm.sparse_features}
    table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(
        column_types=dict.fromkeys(sources, pa.string()), strings_can_be_null=False))
    if label not in table.column_names:
        raise DataError(f"{path}: no label column '{label}' (columns: {', '.join(table.column_names)})")
    ids, unseen = encode_events(fm, table)
    labels = table.column(label).to_numpy().astype(np.float32)
    columns: dict[str, np.ndarray] = {**ids, LABEL_COLUMN: labels}
    count_column = fm.count_column or "count"
    if count and count in table.column_names:
        columns[count_column] = table.column(count).to_numpy().astype(np.float32)
    else:
        columns[count_column] = np.ones(table.num_rows, np.float32)
    rel = f"{split}_labelled/part-00000.parquet"
    out = path_under(data_dir, rel, DataError)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        pq.write_table(pa.table(columns), str(tmp))
    fm.label = fm.label or LABEL_COLUMN
    fm.count_column = count_column
    fm.shards[split] = [rel]
    fm.rows[split] = table.num_rows
    fm.save(data_dir / "feature_map.json")
    values, counts = np.unique(labels, return_counts=True)
    return LabelledSplit(split=split, rows=table.num_rows, unseen=unseen, file=str(out),
                         labels={f"{v:g}": int(c) for v, c in zip(values, counts, strict=True)})


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m recemb.models.anomaly.labelled <prepared data dir> <labelled events csv>")
    print(attach_labelled_split(sys.argv[1], sys.argv[2]))
