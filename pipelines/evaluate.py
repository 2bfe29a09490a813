"""``recemb evaluate``: score one split of the prepared data with a trained model on Ray Data.

Ray Data reads the split's Parquet shards; a pool of actors (each loads the model
once, unsharded on CPU) turns Arrow batches into the model's served score per row
(``predict``: a CTR logit, APE's anomaly score). The driver gathers every row's score
and label and computes the model family's exact metrics (``ScoreTask``): CTR as
training does (AUC, log loss, NE, calibration); anomaly models ROC AUC, average
precision, precision/recall at k with the anomaly as positive, by the model's label
convention (rows labelled 0 are unlabelled and left out). Predictions can be written to
Parquet keyed by the row's place in the prepared data: ``shard`` (file path relative to
the data folder) and ``row`` (index within that file), plus ``label`` and ``logit`` and
``prob`` (CTR) or ``anomaly_score`` (anomaly).

Example:
    $ recemb evaluate --run runs/deepfm_synthetic_ctr --split test --predictions preds.parquet
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import pipelines.ray_runtime  # noqa: F401  (sets Ray's environment before anything imports ray)
from recemb.data.batch import arrow_to_batch
from recemb.data.schema import FeatureMap
from recemb.errors import DataError, RecembError
from recemb.eval.metrics import AnomalyLabels, MetricInputError, anomaly_metrics, compute_metrics
from recemb.io import atomic_path
from recemb.train.checkpoint import verify_checkpoint
from recemb.train.restore import load_trained_model, locate_checkpoint

PATH_COLUMN = "path"  # what ``read_parquet(include_paths=True)`` adds
CPUS_PER_SCORER = 0.5  # fractional, so Ray Data's read tasks keep a CPU on a 2-core machine


@dataclass(frozen=True)
class ScoreTask:
    """How a model's served scores are judged: its family (``ctr`` or ``anomaly``) and, for anomaly
    models, the label convention and the ``k`` of precision/recall at k (from the model's params).

    Example:
        >>> task = score_task({"name": "ape", "params": {"top_k": 1}})
        >>> task.family, task.labels
        ('anomaly', AnomalyLabels(normal=1.0, anomaly=-1.0))
        >>> m = task.metrics(torch.tensor([0.9, 0.1, 0.5]), torch.tensor([-1.0, 1.0, 0.0]))
        >>> m["auc"], m["count"], m["unlabelled"]
        (1.0, 2.0, 1.0)
    """

    family: str
    labels: AnomalyLabels | None = None
    top_k: int = 100

    def metrics(self, scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """The family's metrics of ``scores`` (CTR logits, or anomaly scores: higher = more anomalous)."""
        if self.family != "anomaly":
            return compute_metrics(scores, labels)
        labelled = labels != 0  # 0 marks unlabelled rows (events without a label)
        unlabelled = float((~labelled).sum())
        if not bool(labelled.any()):
            return {"auc": math.nan, "ap": math.nan, "count": 0.0, "unlabelled": unlabelled}
        convention = self.labels or AnomalyLabels()
        try:
            out = anomaly_metrics(scores[labelled], labels[labelled], convention, k=self.top_k)
        except MetricInputError as e:
            raise DataError(f"{e}: the split's labels do not follow the model's convention "
                            "(model.params normal_label/anomaly_label)") from None
        return {**out, "unlabelled": unlabelled}


def score_task(model: dict[str, Any]) -> ScoreTask:
    """The ``ScoreTask`` of a model config block (``{"name": ..., "params": {...}}``, as checkpoints and
    bundle manifests keep it)."""
    from recemb.config.loader import from_dict
    from recemb.models.registry import model_entry

    entry = model_entry(str(model.get("name", "")))
    if entry.family != "anomaly":
        return ScoreTask(entry.family)
    params = from_dict(entry.params, model.get("params") or {}, where="model.params")
    return ScoreTask(entry.family, getattr(params, "labels", AnomalyLabels()), int(getattr(params, "top_k", 100)))


class Scorer:
    """Ray Data callable class: Arrow rows in, ``path``/``label``/``logit`` out.

    Each actor loads the model once (``load_trained_model``) and scores every batch it
    is given without gradients. The feature map travels as plain data, so actors do
    not need to see the driver's files other than the checkpoint.

    Example:
        >>> scorer = Scorer("runs/x/checkpoints/best", fm.to_dict())   # doctest: +SKIP
        >>> scorer(pq.read_table(shard).append_column("path", ...))     # doctest: +SKIP
    """

    def __init__(self, checkpoint: str, feature_map: dict[str, Any], threads: int = 1) -> None:
        logging.getLogger().setLevel(logging.WARNING)  # torchrec/fbgemm log at INFO
        from recemb.config.loader import from_dict

        torch.set_num_threads(threads)
        self.feature_map = from_dict(FeatureMap, feature_map, where="evaluate feature map")
        self.model, _ = load_trained_model(checkpoint, self.feature_map)

    def __call__(self, table: pa.Table) -> pa.Table:
        batch = arrow_to_batch(table, self.feature_map)
        with torch.no_grad():
            logits = self.model.predict(batch).float().reshape(-1)
        return pa.table({
            PATH_COLUMN: table.column(PATH_COLUMN),
            "label": pa.array(batch.labels.numpy()),
            "logit": pa.array(logits.numpy()),
        })


class RowKeys:
    """Turns the ``path`` of each scored row into ``(shard, row)`` keys.

    Rows must arrive in file order within each file (the dataset preserves order);
    ``row`` counts them per file. A shard is given as its index into ``names``, the
    split's files as the feature map lists them (relative to the data folder).

    Example:
        >>> keys = RowKeys({"/d/test/a.parquet": "test/a.parquet"})
        >>> codes, rows = keys.assign(pa.array(["/d/test/a.parquet"] * 2))
        >>> [keys.names[c] for c in codes], rows.tolist()
        (['test/a.parquet', 'test/a.parquet'], [0, 1])
    """

    def __init__(self, files: dict[str, str]) -> None:
        self.names = list(files.values())
        self._index = {path: i for i, path in enumerate(files)}
        self._counts = np.zeros(len(self.names), dtype=np.int64)

    def index_of(self, path: str) -> int:
        """Index in ``names`` of ``path`` as Ray reports it (possibly relative or with a scheme)."""
        if path not in self._index:
            resolved = str(Path(path.removeprefix("file://")).resolve())
            if resolved not in self._index:
                raise RecembError(f"Ray Data read {path}, which is not a shard of this split (bug?)")
            self._index[path] = self._index[resolved]
        return self._index[path]

    def assign(self, paths: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        """Shard indices (int32) and row indices (int64) for one batch of paths, in order."""
        encoded = _dictionary(paths)
        local = encoded.indices.to_numpy(zero_copy_only=False)
        lookup = np.array([self.index_of(p) for p in encoded.dictionary.to_pylist()], dtype=np.int32)
        codes = lookup[local]
        rows = np.empty(len(codes), dtype=np.int64)
        for code in np.unique(codes):
            mask = codes == code
            n = int(mask.sum())
            rows[mask] = self._counts[code] + np.arange(n, dtype=np.int64)
            self._counts[code] += n
        return codes, rows


def _dictionary(values: pa.Array | pa.ChunkedArray) -> pa.DictionaryArray:
    """``values`` as one dictionary-encoded array (Ray may hand back chunked or encoded)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    return values.dictionary_encode()


def split_files(fm: FeatureMap, data_dir: Path, split: str) -> dict[str, str]:
    """Absolute path -> feature-map name of each Parquet shard of ``split``."""
    if split not in fm.shards:
        raise DataError(f"split '{split}' not in the feature map of {data_dir} (have: {', '.join(fm.shards)})")
    if not fm.shards[split]:
        raise DataError(f"split '{split}' of {data_dir} has no shards")
    files: dict[str, str] = {}
    for name in fm.shards[split]:
        path = (data_dir / name).resolve()
        if not path.is_file():
            raise DataError(f"{path}: shard of split '{split}' is missing (data folder moved or re-prepared?)")
        files[str(path)] = name
    return files


def _columns(fm: FeatureMap, path: str) -> list[str]:
    """The columns the model reads, of those the shard has (the label may be absent)."""
    available = set(pq.read_schema(path).names)
    wanted = fm.dense_features + fm.sparse_features + ([fm.label] if fm.label else [])
    missing = [c for c in fm.dense_features + fm.sparse_features if c not in available]
    if missing:
        raise DataError(f"{path}: lacks feature column '{missing[0]}' of the feature map")
    return [c for c in wanted if c in available]


def _check_sizes(workers: int, batch_size: int) -> None:
    if workers < 1:
        raise RecembError(f"--workers {workers}: evaluation needs at least one scoring actor")
    if batch_size < 1:
        raise RecembError(f"--batch-size {batch_size}: must be at least 1")


def score_split(
    checkpoint: Path, fm: FeatureMap, files: dict[str, str], workers: int = 2, batch_size: int = 16384,
) -> pa.Table:
    """Score every row of ``files`` with Ray Data; a table of ``shard``, ``row``, ``label``, ``logit``.

    Rows come back in file order (``preserve_order``) so the per-file counter of
    ``RowKeys`` gives each row its index in its shard; the table is sorted by
    ``(shard, row)`` with ``shard`` dictionary-encoded (the split's file names).

    Example:
        >>> table = score_split(path, fm, {"/d/test/part-00000.parquet": "test/part-00000.parquet"})  # doctest: +SKIP
        >>> table.column_names                                                                          # doctest: +SKIP
        ['shard', 'row', 'label', 'logit']
    """
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # set after import: ray.data configures it
    _check_sizes(workers, batch_size)
    paths = list(files)
    columns = _columns(fm, paths[0])
    ds = ray.data.read_parquet(paths, columns=columns, include_paths=True, partitioning=None, shuffle=None)
    ds = ds.map_batches(
        Scorer,
        fn_constructor_args=(str(checkpoint), fm.to_dict()),
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=CPUS_PER_SCORER,
        batch_size=batch_size,
        batch_format="pyarrow",
        udf_modifying_row_count=False,
    )
    ds.context.execution_options.preserve_order = True
    keys = RowKeys(files)
    codes, rows, labels, logits = [], [], [], []
    for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        c, r = keys.assign(out.column(PATH_COLUMN))
        codes.append(c)
        rows.append(r)
        labels.append(out.column("label").to_numpy())
        logits.append(out.column("logit").to_numpy())
    if not codes:
        raise DataError(f"no rows in {', '.join(files.values())}")
    all_codes, all_rows = np.concatenate(codes), np.concatenate(rows)
    order = np.lexsort((all_rows, all_codes))  # already in order when Ray kept it; cheap to make sure
    return pa.table({
        "shard": pa.DictionaryArray.from_arrays(pa.array(all_codes[order]), pa.array(keys.names, pa.string())),
        "row": pa.array(all_rows[order]),
        "label": pa.array(np.concatenate(labels)[order].astype(np.float32, copy=False)),
        "logit": pa.array(np.concatenate(logits)[order].astype(np.float32, copy=False)),
    })


def write_predictions(table: pa.Table, path: str | Path, family: str = "ctr") -> Path:
    """Write ``shard``, ``row``, ``label`` and the scores to Parquet at ``path`` (atomically).

    CTR: ``logit`` and ``prob`` (``sigmoid(logit)``); anomaly models: ``anomaly_score``.
    ``shard`` is written as a plain string column.

    Example:
        >>> write_predictions(score_split(path, fm, files), "preds.parquet")   # doctest: +SKIP
    """
    path = Path(path)
    columns = {"shard": table.column("shard").cast(pa.string()), "row": table.column("row"),
               "label": table.column("label")}
    if family == "anomaly":
        columns["anomaly_score"] = table.column("logit")
    else:
        logits = torch.from_numpy(table.column("logit").to_numpy().astype(np.float32))
        columns.update(logit=table.column("logit"), prob=pa.array(torch.sigmoid(logits).numpy()))
    out = pa.table(columns)
    with atomic_path(path) as tmp:
        pq.write_table(out, tmp)
    return path


def _log_to_mlflow(uri: str, run_id: str, step: int, split: str, metrics: dict[str, float]) -> None:
    """Add ``eval_<split>_<metric>`` to the training run (its status and tags stay as they are)."""
    from recemb.tracking import Tracker

    tracker = Tracker(uri, rank=0)
    tracker.run_id = run_id  # log into the finished run without reopening it
    tracker.log_metrics(step, metrics, split=f"eval_{split}")


def run_evaluate(
    run: str | Path,
    split: str = "test",
    mlflow_uri: str | None = None,
    predictions: Path | None = None,
    workers: int = 2,
    batch_size: int = 16384,
    address: str = "",
) -> dict[str, Any]:
    """Evaluate the trained model ``run`` on ``split``; returns metrics and where things are.

    ``run`` is a checkpoint folder, a run folder (its best, else last, checkpoint) or an
    MLflow run id (looked up in ``mlflow_uri``; the metrics are then logged to that run as
    ``eval_<split>_<metric>``). With ``predictions`` every row's keys, label, logit and
    probability go to that Parquet file. Ray is joined at ``address`` (else started
    locally, and stopped again at the end). A split without a label column gives only
    ``count`` (and labels of 0 in the predictions).

    Example:
        >>> out = run_evaluate("runs/deepfm_synthetic_ctr", "test", predictions=Path("p.parquet"))  # doctest: +SKIP
        >>> out["metrics"]["auc"]                                                                    # doctest: +SKIP
        0.7412
    """
    from pipelines.ray_runtime import check_train_resources, init_ray, is_local
    from pipelines.train import quiet_logs

    quiet_logs()
    _check_sizes(workers, batch_size)
    t0 = time.perf_counter()
    ref = locate_checkpoint(run, mlflow_uri)
    checkpoint = ref.path.resolve()
    meta = verify_checkpoint(checkpoint)  # sizes and sha256 of every file, before any actor starts
    task = score_task(meta.get("config", {}).get("model", {}))
    cfg_data = meta.get("config", {}).get("data_dir", "")
    if not cfg_data:
        raise DataError(f"{checkpoint}/meta.json: config has no data_dir; cannot find split '{split}'")
    data_dir = Path(cfg_data).expanduser().resolve()
    fm = FeatureMap.load(data_dir / "feature_map.json")
    files = split_files(fm, data_dir, split)

    import ray

    started = init_ray(address) == "local"
    try:
        check_train_resources(workers, CPUS_PER_SCORER, gpus=False, local=is_local(address),
                              what="scoring actors", knob="")
        table = score_split(checkpoint, fm, files, workers=workers, batch_size=batch_size)
    finally:
        if started:
            ray.shutdown()
    logits = torch.from_numpy(table.column("logit").to_numpy().astype(np.float32))
    labels = torch.from_numpy(table.column("label").to_numpy().astype(np.float32))
    has_labels = bool(fm.label) and fm.label in pq.read_schema(next(iter(files))).names
    metrics = task.metrics(logits, labels) if has_labels else {"count": float(logits.numel())}
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "family": task.family,
        "split": split,
        "step": meta.get("step", 0),
        "rows": table.num_rows,
        "metrics": metrics,
        "predictions": None,
        "seconds": 0.0,
    }
    if predictions is not None:
        result["predictions"] = str(write_predictions(table, predictions, task.family))
    if ref.run_id is not None and ref.mlflow_uri is not None and has_labels:
        _log_to_mlflow(ref.mlflow_uri, ref.run_id, int(meta.get("step", 0)), split, metrics)
        result["mlflow_run_id"] = ref.run_id
    result["seconds"] = round(time.perf_counter() - t0, 3)
    print(f"[metrics] split={split} " + json.dumps(metrics, sort_keys=True), flush=True)
    return result


__all__ = ["RowKeys", "ScoreTask", "Scorer", "run_evaluate", "score_split", "score_task", "write_predictions"]
