"""``recemb score``: score raw logs (or a prepared split) with an export bundle or a training run.

Raw input is read with the project's own readers (``recemb.data.sources``) under the
dataset config the bundle carries (``data/dataset_config.yaml``, the one the model's data
was prepared with), so a Criteo TSV without header, an Avazu CSV or a CSV/Parquet with
named columns reads exactly as at prepare time; values become ids by the bundle's
vocabularies and hash rules. A folder is taken as a prepared split (its Parquet shards,
as ``recemb prepare`` wrote them). Rows the reader cannot parse are skipped and counted.
Writes ``line`` (raw) or ``shard``/``row`` (prepared), ``label`` when the input has one,
then per model family: CTR ``logit`` and ``prob``; anomaly models (APE) ``anomaly_score``
(higher = more anomalous) and the entity-type pair that added most to it
(``top_pair_a``, ``top_pair_b``, ``top_pair_term``: why the event was flagged). Prints the
share of unknown values per feature and, with labels, the family's metrics.

A training run (``--run``: run id, run folder or checkpoint) is scored through the same
runtime: it is exported to a temporary fp32 bundle first (removed afterwards), so a run
and its bundle score bit-for-bit alike and there is one scoring path to trust.

Example:
    $ recemb score --bundle bundles/deepfm --data data/synthetic/ctr.tsv --out scores.parquet
    $ recemb score --run runs/ape_ids2017 --data ../shared/data/ids2017/test.csv --out events.parquet
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
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
    """One block of scored rows: keys (``line``, or ``shard`` and ``row``), labels, the served
    score per row (``logits``: a CTR logit or an anomaly score) and the model's ``explain`` columns."""

    keys: dict[str, np.ndarray]
    labels: np.ndarray | None
    logits: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def _scored(bundle: Bundle, encoded: Any, keys: dict[str, np.ndarray], labels: np.ndarray | None) -> ScoredBlock:
    return ScoredBlock(keys, labels, bundle.logits_of(encoded), bundle.explain_of(encoded))


def _raw_config(bundle: Bundle, data: Path) -> Any:
    rel = bundle.manifest.get("dataset_config")
    if not rel:
        raise DataError(f"{bundle.folder}: the bundle carries no dataset config (its data was prepared without "
                        "one); score a prepared split folder instead")
    raw = read_yaml(bundle.folder / rel)
    raw["paths"] = [str(data)]
    raw["count_column"] = None
    raw["split"] = {"seed": (raw.get("split") or {}).get("seed", 0)}  # one file, no split rule
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
            yield _scored(bundle, bundle.encode(part), {"line": lines[start:start + batch_rows]}, labels)


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
            n = batch.num_rows
            yield _scored(bundle, bundle.encode_prepared(batch),
                          {"shard": np.full(n, path.name, dtype=object), "row": np.arange(row, row + n)}, labels)
            row += n


def _family(bundle: Bundle) -> str:
    from recemb.models.registry import model_family

    return model_family(bundle.manifest["model"]["config"]["model"]["name"])


def _columns(bundle: Bundle, family: str, logits: np.ndarray, extra: dict[str, np.ndarray]) -> dict[str, Any]:
    """The score columns of a family: CTR ``logit``/``prob``; anomaly ``anomaly_score`` + top pair."""
    if family != "anomaly":
        return {"logit": pa.array(logits), "prob": pa.array(bundle.scorer().probabilities(logits))}
    columns: dict[str, Any] = {"anomaly_score": pa.array(logits)}
    if extra:
        names = np.asarray(bundle.feature_map.sparse_features, dtype=object)
        columns["top_pair_a"] = pa.array(names[extra["top_pair_a"]].tolist(), pa.string())
        columns["top_pair_b"] = pa.array(names[extra["top_pair_b"]].tolist(), pa.string())
        columns["top_pair_term"] = pa.array(extra["top_pair_term"].astype(np.float32))
    return columns


def _metrics(bundle: Bundle, family: str, scores: np.ndarray, y: np.ndarray) -> dict[str, float] | None:
    """The family's metrics when the labels are its convention (CTR 0/1; anomaly normal/anomaly)."""
    import torch

    if not np.isfinite(y).all():
        return None
    values = set(np.unique(y).tolist())
    if family == "anomaly":
        from recemb.config.loader import from_dict
        from recemb.models.anomaly.ape import APEParams
        from recemb.models.registry import model_entry

        cfg = bundle.manifest["model"]["config"]["model"]
        params = from_dict(model_entry(cfg["name"]).params, cfg.get("params") or {}, where="bundle model params")
        labels = params.labels if isinstance(params, APEParams) else None
        if labels is None or not values <= {labels.normal, labels.anomaly, 0.0} or len(values - {0.0}) < 2:
            return None
        from recemb.eval.metrics import anomaly_metrics

        keep = y != 0.0  # 0 = unlabelled rows
        return anomaly_metrics(torch.from_numpy(scores[keep].astype(np.float64)), torch.from_numpy(y[keep]),
                               labels, k=params.top_k)
    if not values <= {0.0, 1.0}:
        return None
    from recemb.eval.metrics import compute_metrics

    return compute_metrics(torch.from_numpy(scores), torch.from_numpy(y.astype(np.float32)))


def run_score(bundle_dir: str | Path | None, data: str | Path, out: str | Path, batch_rows: int = 65_536,
              run: str | None = None, mlflow_uri: str | None = None) -> dict[str, Any]:
    """Score ``data`` (a raw file, or a prepared split folder) with a bundle or a run; write ``out`` (Parquet).

    Exactly one of ``bundle_dir`` and ``run`` (run id, run folder or checkpoint; exported to a
    temporary fp32 bundle). Returns rows, skipped rows, the unknown-value share per feature,
    metrics when the input has labels, and where the scores are.
    """
    if (bundle_dir is None) == (run is None):
        raise DataError("pass exactly one of --bundle and --run")
    if run is None:
        assert bundle_dir is not None
        return _score_with(Bundle.open(bundle_dir), data, out, batch_rows)
    import tempfile

    from recemb.export.writer import export_bundle

    with tempfile.TemporaryDirectory(prefix="recemb-score-", dir=Path(out).expanduser().resolve().parent) as tmp:
        path = export_bundle(run, Path(tmp) / "bundle", dtype="fp32", mlflow_uri=mlflow_uri, record=False)
        result = _score_with(Bundle.open(path), data, out, batch_rows)
        result["bundle"] = None
        result["run"] = str(run)
        return result


def _score_with(bundle: Bundle, data: str | Path, out: str | Path, batch_rows: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    if batch_rows < 1:
        raise DataError(f"--batch-size {batch_rows}: must be at least 1")
    data, out = Path(data), Path(out)
    if not data.exists():
        raise DataError(f"{data}: no such file or folder")
    family = _family(bundle)
    blocks: Iterator[Any] = score_prepared(bundle, data, batch_rows) if data.is_dir() \
        else score_raw(bundle, data, batch_rows)
    keys: dict[str, list[np.ndarray]] = {}
    labels: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    extra: dict[str, list[np.ndarray]] = {}
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
        for k, v in block.extra.items():
            extra.setdefault(k, []).append(v)
    if not logits:
        raise DataError(f"{data}: no rows to score")
    all_logits = np.concatenate(logits).astype(np.float32)
    columns: dict[str, Any] = {k: pa.array(np.concatenate(v)) for k, v in keys.items()}
    has_labels = len(labels) == len(logits)
    if has_labels:
        columns["label"] = pa.array(np.concatenate(labels).astype(np.float32))
    columns.update(_columns(bundle, family, all_logits, {k: np.concatenate(v) for k, v in extra.items()}))
    with atomic_path(out) as tmp:
        pq.write_table(pa.table(columns), tmp)
    result: dict[str, Any] = {"bundle": str(bundle.folder), "data": str(data), "out": str(out), "family": family,
                              "rows": int(len(all_logits)), "skipped_rows": skipped,
                              "unknown_share": {f: round(s, 6) for f, s in bundle.unknown_share().items()}}
    if has_labels:
        metrics = _metrics(bundle, family, all_logits, np.concatenate(labels).astype(np.float64))
        if metrics is not None:
            result["metrics"] = metrics
    result["seconds"] = round(time.perf_counter() - t0, 3)
    for feature, share in result["unknown_share"].items():
        print(f"[unknown] {feature}={share:.4f}", flush=True)
    if "metrics" in result:
        print("[metrics] " + json.dumps(result["metrics"], sort_keys=True), flush=True)
    return result


__all__ = ["ScoredBlock", "run_score", "score_prepared", "score_raw"]
