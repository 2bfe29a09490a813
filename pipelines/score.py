"""``recemb score``: score raw logs (or a prepared split) with an export bundle.

Raw input is read with the project's own readers (``recemb.data.sources``) under the
dataset config the bundle carries (``data/dataset_config.yaml``, the one the model's data
was prepared with), so a Criteo TSV without header, an Avazu CSV or a CSV/Parquet with
named columns reads exactly as at prepare time; values become ids by the bundle's
vocabularies and hash rules. A folder is taken as a prepared split (its Parquet shards,
as ``recemb prepare`` wrote them). Rows the reader cannot parse are skipped and counted.
Writes ``line`` (raw) or ``shard``/``row`` (prepared), ``label`` when the input has one,
``logit`` and ``prob`` to Parquet, and prints the share of unknown values per feature.

Example:
    $ recemb score --bundle bundles/deepfm --data data/synthetic/ctr.tsv --out scores.parquet
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recemb.config.loader import read_yaml
from recemb.data.preprocess import parse_float
from recemb.data.schema import dataset_from_dict
from recemb.data.sources import file_columns, iter_blocks, resolve_paths
from recemb.errors import DataError
from recemb.io import atomic_path
from recemb.serving.bundle import Bundle


@dataclass
class ScoredBlock:
    """One block of scored rows: its keys (``line``, or ``shard`` and ``row``), labels, logits."""

    keys: dict[str, np.ndarray]
    labels: np.ndarray | None
    logits: np.ndarray


def _raw_config(bundle: Bundle, data: Path) -> Any:
    rel = bundle.manifest.get("dataset_config")
    if not rel:
        raise DataError(f"{bundle.folder}: the bundle carries no dataset config (its data was prepared without "
                        "one); score a prepared split folder instead")
    raw = read_yaml(bundle.folder / rel)
    raw["paths"] = [str(data)]
    raw["count_column"] = None
    raw.setdefault("split", {})["time_column"] = None
    cfg = dataset_from_dict(raw, where=str(bundle.folder / rel))
    if cfg.label and cfg.label not in file_columns(cfg, resolve_paths(cfg)[0]):
        cfg.label = None  # unlabelled logs score as well
    return cfg


def score_raw(bundle: Bundle, data: Path, batch_rows: int) -> Iterator[ScoredBlock | int]:
    """Scored blocks of a raw file; an ``int`` for each block's rows the reader could not parse."""
    cfg = _raw_config(bundle, data)
    src = resolve_paths(cfg)[0]
    for block in iter_blocks(cfg, src):
        table, lines = block.table, block.lines
        skipped = len(block.invalid)
        if len(block.bad_rows):
            keep = np.ones(table.num_rows, bool)
            keep[block.bad_rows] = False
            table, lines = table.filter(pa.array(keep)), lines[keep]
            skipped += int((~keep).sum())
        if skipped:
            yield skipped
        for start in range(0, table.num_rows, batch_rows):
            part = table.slice(start, batch_rows)
            labels = None
            if cfg.label:
                labels, _ = parse_float(part.column(cfg.label))
            logits = bundle.logits_of(bundle.encode(part))
            yield ScoredBlock({"line": lines[start:start + batch_rows]}, labels, logits)


def score_prepared(bundle: Bundle, folder: Path, batch_rows: int) -> Iterator[ScoredBlock]:
    """Scored blocks of a prepared split folder's Parquet shards (in name order)."""
    if (folder / "feature_map.json").is_file():
        raise DataError(f"{folder}: is a prepared data folder; pass one split of it, e.g. {folder / 'test'}")
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise DataError(f"{folder}: no Parquet shards; pass a raw file or a prepared split folder")
    label = bundle.feature_map.label
    for path in files:
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file: {e}") from None
        row = 0
        for batch in pf.iter_batches(batch_size=batch_rows):
            labels = None
            if label and label in batch.schema.names:
                labels = batch.column(label).to_numpy(zero_copy_only=False).astype(np.float64)
            logits = bundle.logits_of(bundle.encode_prepared(batch))
            n = batch.num_rows
            yield ScoredBlock({"shard": np.full(n, path.name, dtype=object), "row": np.arange(row, row + n)},
                              labels, logits)
            row += n


def run_score(bundle_dir: str | Path, data: str | Path, out: str | Path, batch_rows: int = 65_536) -> dict[str, Any]:
    """Score ``data`` (a raw file, or a prepared split folder) with the bundle; write ``out`` (Parquet).

    Returns rows, skipped rows, the unknown-value share per feature, metrics when the
    input has labels, and where the scores are.
    """
    t0 = time.perf_counter()
    if batch_rows < 1:
        raise DataError(f"--batch-size {batch_rows}: must be at least 1")
    bundle = Bundle.open(bundle_dir)
    data, out = Path(data), Path(out)
    if not data.exists():
        raise DataError(f"{data}: no such file or folder")
    blocks: Iterator[Any] = score_prepared(bundle, data, batch_rows) if data.is_dir() \
        else score_raw(bundle, data, batch_rows)
    keys: dict[str, list[np.ndarray]] = {}
    labels: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    skipped = 0
    for block in blocks:
        if isinstance(block, int):
            skipped += block
            continue
        for k, v in block.keys.items():
            keys.setdefault(k, []).append(v)
        if block.labels is not None:
            labels.append(block.labels)
        logits.append(block.logits)
    if not logits:
        raise DataError(f"{data}: no rows to score")
    all_logits = np.concatenate(logits).astype(np.float32)
    probs = bundle.scorer().probabilities(all_logits)
    columns: dict[str, Any] = {k: pa.array(np.concatenate(v)) for k, v in keys.items()}
    has_labels = len(labels) == len(logits)
    if has_labels:
        columns["label"] = pa.array(np.concatenate(labels).astype(np.float32))
    columns["logit"] = pa.array(all_logits)
    columns["prob"] = pa.array(probs)
    with atomic_path(out) as tmp:
        pq.write_table(pa.table(columns), tmp)
    result: dict[str, Any] = {"bundle": str(bundle.folder), "data": str(data), "out": str(out),
                              "rows": int(len(all_logits)), "skipped_rows": skipped,
                              "unknown_share": {f: round(s, 6) for f, s in bundle.unknown_share().items()}}
    if has_labels:
        y = np.concatenate(labels)
        if np.isfinite(y).all() and set(np.unique(y).tolist()) <= {0.0, 1.0}:
            import torch

            from recemb.eval.metrics import compute_metrics

            result["metrics"] = compute_metrics(torch.from_numpy(all_logits), torch.from_numpy(y.astype(np.float32)))
    result["seconds"] = round(time.perf_counter() - t0, 3)
    for feature, share in result["unknown_share"].items():
        print(f"[unknown] {feature}={share:.4f}", flush=True)
    if "metrics" in result:
        print("[metrics] " + json.dumps(result["metrics"], sort_keys=True), flush=True)
    return result


__all__ = ["ScoredBlock", "run_score", "score_prepared", "score_raw"]
