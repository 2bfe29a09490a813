"""``recemb ab``: compare a control with treatments offline on the same held-out rows.

An arm is a training run (a run id, run folder or checkpoint: scored by the evaluate
pipeline's Ray Data actors) or an export bundle folder (scored by the numpy serving
runtime, ``Bundle``), of one model family: CTR models (metrics of logits, labels 0/1) or
anomaly models (APE: ROC AUC and average precision of anomaly scores with the anomaly as
positive, by the model's label convention, e.g. 1 normal / -1 anomaly). Every arm must
encode rows as the data does (feature-map fingerprints, ``recemb.eval.ab.fit_problem`` says
what differs) and scores every row of the split, keyed by ``(shard, row)``.

The data is a prepared folder (its ``split``) or a raw file in the format the arms' data was
prepared from: that file is encoded through the control's feature map by preparation's own
readers and transforms (``recemb.data.encode``) into a temporary prepared split, and the
rows the reader rejects are counted by reason in the report. Speed is measured here, in this
one process with one torch thread, on the same batches for every arm, arms taking turns
batch by batch. ``recemb.eval.ab.compare`` does the statistics and ``recemb.eval.report``
writes the report; MLflow gets a parent run with one child run per arm and the report as
artifacts.

Example:
    >>> run_ab("runs/deepfm_full", ["runs/deepfm_unified", "bundles/full_int8"], "data/synthetic_ctr",
    ...        out="ab-out")                                                            # doctest: +SKIP
    >>> run_ab("runs/ape_a", ["runs/ape_b"], "data/synthetic/events/test.csv")       # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import pipelines.ray_runtime  # noqa: F401  (sets Ray's environment before anything imports ray)
from pipelines.evaluate import CPUS_PER_SCORER, ScoreTask, score_split, score_task, split_files
from recemb.data.batch import arrow_to_batch
from recemb.data.encode import encode_file, raw_config
from recemb.data.schema import FeatureMap
from recemb.errors import DataError
from recemb.eval.ab import (
    ABResult,
    ArmScores,
    DataSummary,
    EvalRows,
    Speed,
    compare,
    feature_map_fingerprint,
    fit_problem,
    frequency_classes,
    row_classes,
    row_key,
)
from recemb.eval.report import ReportFiles, write_report
from recemb.export.format import MANIFEST
from recemb.models.registry import embedding_layers
from recemb.serving.bundle import Bundle
from recemb.train.checkpoint import verify_checkpoint
from recemb.train.restore import load_trained_model, locate_checkpoint

AB_EXPERIMENT = "ab"  # MLflow experiment of the comparisons
TAG_AB_ROLE, TAG_AB_SOURCE = "recemb.ab.role", "recemb.ab.source"


@dataclass
class Arm:
    """A resolved arm: what it is, where it lives, its feature map, its model family and how to score."""

    name: str
    kind: str  # "run" | "bundle"
    source: str
    feature_map: FeatureMap
    task: ScoreTask
    checkpoint: Path | None = None
    bundle: Bundle | None = None
    model: Any = None
    embedding_bytes: int = 0

    def scores(self, table: pa.Table) -> np.ndarray:
        """Served scores of prepared rows (a CTR logit or an anomaly score), in this process (speed
        checks; bundles score all rows this way)."""
        if self.bundle is not None:
            return self.bundle.logits_of(self.bundle.encode_prepared(table))
        with torch.no_grad():
            return self.model.predict(arrow_to_batch(table, self.feature_map)).float().reshape(-1).numpy()


@dataclass
class ABRun:
    result: ABResult
    files: ReportFiles
    parent_run_id: str | None = None
    child_run_ids: dict[str, str] = field(default_factory=dict)


def _open_arm(spec: str, mlflow_uri: str | None) -> Arm:
    path = Path(spec).expanduser()
    if (path / MANIFEST).is_file():
        bundle = Bundle.open(path)
        name = f"{bundle.manifest['source'].get('expid') or path.name}@{bundle.dtype}"
        task = score_task(bundle.manifest["model"]["config"]["model"])
        return Arm(name, "bundle", str(path.resolve()), bundle.feature_map, task, bundle=bundle,
                   embedding_bytes=bundle.embedding_bytes())
    ref = locate_checkpoint(spec, mlflow_uri)
    checkpoint = ref.path.resolve()
    meta = verify_checkpoint(checkpoint)
    cfg = meta.get("config", {})
    task = score_task(cfg.get("model", {}))
    fm = FeatureMap.load(Path(cfg.get("data_dir", "")).expanduser() / "feature_map.json")
    model, exp = load_trained_model(checkpoint, fm)
    emb = sum(layer.parameter_bytes() for layer in embedding_layers(model).values())
    return Arm(exp.expid, "run", str(checkpoint), fm, task, checkpoint=checkpoint, model=model,
               embedding_bytes=int(emb))


def _check_families(arms: list[Arm]) -> ScoreTask:
    """The arms' common ``ScoreTask``; arms of different model families (or label conventions) are refused."""
    families = {a.task.family for a in arms}
    if len(families) > 1:
        which = ", ".join(f"{a.name} ({a.task.family})" for a in arms)
        raise DataError(f"arms of different model families cannot be compared: {which}. Compare CTR models with "
                        "CTR models and anomaly models with anomaly models")
    conventions = {a.task.labels for a in arms}
    if len(conventions) > 1:
        which = ", ".join(f"{a.name} (normal {a.task.labels.normal:g}, anomaly {a.task.labels.anomaly:g})"
                          for a in arms if a.task.labels is not None)
        raise DataError(f"the arms read labels differently: {which}; they cannot score the same labelled rows")
    return arms[0].task


def _unique_names(arms: list[Arm]) -> None:
    seen: dict[str, int] = {}
    for arm in arms:
        seen[arm.name] = seen.get(arm.name, 0) + 1
        if seen[arm.name] > 1:
            arm.name = f"{arm.name}#{seen[arm.name]}"


def _read_rows(fm: FeatureMap, files: dict[str, str], slices: Sequence[str], group: str | None,
               ) -> tuple[pa.Table, np.ndarray]:
    """The split's rows in file order and their keys."""
    names = list(files.values())
    tables, keys = [], []
    for i, (path, _) in enumerate(files.items()):
        t = pq.read_table(path)
        tables.append(t)
        keys.append(row_key(np.full(t.num_rows, i), np.arange(t.num_rows)))
    table = pa.concat_tables(tables, promote_options="default")
    for column in [*slices, *([group] if group else [])]:
        if column not in table.column_names:
            raise DataError(f"column '{column}' is not in the prepared split ({', '.join(names[:2])}...); "
                            f"columns: {', '.join(table.column_names)}")
    if not fm.label or fm.label not in table.column_names:
        raise DataError(f"the split has no label column '{fm.label}'; an A/B comparison needs labels")
    return table, np.concatenate(keys)


def _frequency(fm: FeatureMap, table: pa.Table, features: Sequence[str] | None) -> dict[str, np.ndarray]:
    """Head/torso/tail class per row for each chosen feature that has training counts (vocabulary features)."""
    out = {}
    for f in features if features is not None else fm.sparse_features:
        counts = fm.id_counts(f)
        if counts is None:
            continue  # hashed: no per-id training counts
        column = table.column(f).combine_chunks()
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            offsets = column.offsets.to_numpy(zero_copy_only=False)
            values = column.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
            out[f] = row_classes(frequency_classes(counts), values, np.diff(offsets))
        else:
            out[f] = row_classes(frequency_classes(counts), column.to_numpy(zero_copy_only=False))
    return out


def _positive(labels: np.ndarray, task: ScoreTask) -> tuple[np.ndarray, np.ndarray]:
    """0/1 labels (1 = click, or anomaly) and which rows are labelled at all (anomaly data: not 0)."""
    labels = np.asarray(labels, np.float64)
    if task.family != "anomaly":
        bad = ~np.isin(labels, (0.0, 1.0))
        if bad.any():
            raise DataError(f"CTR labels must be 0 or 1; the data holds {labels[bad][0]!r} "
                            f"({int(bad.sum())} rows)")
        return labels == 1.0, np.ones(len(labels), bool)
    convention = task.labels
    assert convention is not None
    labelled = labels != 0.0  # 0 marks unlabelled events
    bad = labelled & ~np.isin(labels, (convention.normal, convention.anomaly))
    if bad.any():
        raise DataError(f"anomaly labels must be {convention.normal:g} (normal) or {convention.anomaly:g} (anomaly) "
                        f"by the arms' convention; the data holds {labels[bad][0]!r} ({int(bad.sum())} rows)")
    return labels == convention.anomaly, labelled


@contextmanager
def _data_split(data: Path, split: str, control: Arm, out: Path) -> Iterator[tuple[FeatureMap, dict[str, str],
                                                                                   DataSummary]]:
    """The data's feature map and the split's shards (absolute path -> name): a prepared folder's split, or a
    raw file encoded through the control's feature map into a temporary split beside the report."""
    if data.is_dir():
        fm = FeatureMap.load(data / "feature_map.json")
        files = split_files(fm, data, split)
        yield fm, files, DataSummary(str(data), "prepared", split, fm.rows.get(split, 0), fm.rows.get(split, 0))
        return
    if not data.is_file():
        raise DataError(f"{data}: no such file or prepared data folder")
    fm = control.feature_map
    cfg = raw_config(fm, data)
    if not cfg.label:  # event data trained without labels: its labelled files name the column "label"
        cfg = raw_config(fm, data, {"label": "label"})
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".data-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        encoded = encode_file(fm, cfg, tmp / "test")
        files = {str(p.resolve()): f"test/{p.name}" for p in encoded.shards}
        summary = DataSummary(str(data), "raw", "test", encoded.rows_in, encoded.rows, encoded.rejected,
                              encoded.examples, {k: round(v, 6) for k, v in encoded.unseen.items()})
        print(json.dumps({"encoded": str(data), "rows_in": encoded.rows_in, "rows": encoded.rows,
                          "rejected": encoded.rejected}), flush=True)
        yield fm, files, summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _speed(arms: list[Arm], table: pa.Table, batch_rows: int, batches: int) -> dict[str, Speed]:
    """Per-batch latency and throughput of every arm on the same batches, arms taking turns."""
    n = min(table.num_rows, batch_rows * batches)
    chunks = [table.slice(i, batch_rows) for i in range(0, n, batch_rows)]
    times: dict[str, list[float]] = {a.name: [] for a in arms}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for a in arms:
            a.scores(chunks[0])  # warm-up: first-call costs are not latency
        for chunk in chunks:
            for a in arms:
                t0 = time.perf_counter()
                a.scores(chunk)
                times[a.name].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    out = {}
    for name, ts in times.items():
        arr = np.asarray(ts)
        out[name] = Speed(rows_per_s=float(n / arr.sum()), p50_ms=float(np.percentile(arr, 50) * 1e3),
                          p99_ms=float(np.percentile(arr, 99) * 1e3), batch_rows=batch_rows, batches=len(ts))
    return out


def _score_runs(arms: list[Arm], fm: FeatureMap, files: dict[str, str], workers: int, batch_size: int,
                address: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Keys and scores of every run arm, through the evaluate pipeline's Ray Data actors (one Ray for all)."""
    runs = [a for a in arms if a.kind == "run"]
    if not runs:
        return {}
    import ray

    from pipelines.ray_runtime import check_train_resources, init_ray, is_local

    started = init_ray(address) == "local"
    out = {}
    try:
        check_train_resources(workers, CPUS_PER_SCORER, gpus=False, local=is_local(address),
                              what="scoring actors", knob="")
        index = {name: i for i, name in enumerate(files.values())}
        for arm in runs:
            t = score_split(arm.checkpoint, fm, files, workers=workers, batch_size=batch_size)
            shard = t.column("shard").combine_chunks()
            names = np.array([index[s] for s in shard.dictionary.to_pylist()], np.int64)
            codes = names[shard.indices.to_numpy(zero_copy_only=False)]
            out[arm.name] = (row_key(codes, t.column("row").to_numpy()), t.column("logit").to_numpy())
    finally:
        if started:
            ray.shutdown()
    return out


def _score_bundle(arm: Arm, table: pa.Table, batch_rows: int = 16384) -> np.ndarray:
    return np.concatenate([arm.scores(table.slice(i, batch_rows)) for i in range(0, table.num_rows, batch_rows)])


def _log_mlflow(uri: str | None, run: ABRun, arms: list[Arm], data: Path, split: str) -> None:
    """Parent run (params, verdicts, report artifacts) and one child run per arm (metrics, bytes, speed)."""
    from recemb.tracking import TAG_EMBEDDING_BYTES, Tracker

    parent = Tracker(uri, rank=0, experiment_name=AB_EXPERIMENT)
    client = parent.client
    experiment = parent.experiment_id(AB_EXPERIMENT)  # the tracker's own: artifacts next to a sqlite store
    result = run.result
    treatments = [a.name for a in result.arms if a.name != result.control]
    parent.run_id = client.create_run(experiment, run_name=f"ab_{result.control}_vs_{'_'.join(treatments)}",
                                      tags={TAG_AB_ROLE: "parent"}).info.run_id
    with parent:
        for k, v in {"control": result.control, "treatments": ",".join(treatments), "data": str(data),
                     "split": split, "level": result.level, "resamples": result.resamples, "rows": result.rows,
                     "group": result.group or ""}.items():
            client.log_param(parent.run_id, k, str(v))
        parent.log_metrics(0, {f"{v.treatment}.{v.metric}.delta": v.delta for v in result.verdicts})
        parent.set_tags({f"recemb.ab.verdict.{v.treatment}.{v.metric}": v.verdict for v in result.verdicts})
        for path in (run.files.html, run.files.markdown, run.files.json):
            parent.log_artifact(path, "ab")
        run.parent_run_id = parent.run_id
        for summary, arm in zip(result.arms, arms, strict=True):
            child = Tracker(uri, rank=0, experiment_name=AB_EXPERIMENT)
            tags = {"mlflow.parentRunId": parent.run_id, TAG_AB_ROLE: "control" if arm.name == result.control
                    else "treatment", TAG_AB_SOURCE: arm.source, TAG_EMBEDDING_BYTES: arm.embedding_bytes,
                    "recemb.ab.kind": arm.kind}
            child.run_id = client.create_run(experiment, run_name=arm.name,
                                             tags={k: str(v) for k, v in tags.items()}).info.run_id
            with child:
                metrics = dict(summary.metrics)
                if summary.speed is not None:
                    metrics.update(rows_per_s=summary.speed.rows_per_s, p50_ms=summary.speed.p50_ms,
                                   p99_ms=summary.speed.p99_ms)
                child.log_metrics(0, {**metrics, "embedding_bytes": arm.embedding_bytes})
            run.child_run_ids[arm.name] = child.run_id


def run_ab(
    control: str, treatments: Sequence[str], data: str | Path, level: float = 0.95, slices: Sequence[str] = (),
    group: str | None = None, out: str | Path = "ab-out", split: str = "test", mlflow_uri: str | None = None,
    resamples: int = 1000, frequency_features: Sequence[str] | None = None, workers: int = 2,
    batch_size: int = 16384, speed_batch_rows: int = 1024, speed_batches: int = 20, address: str = "",
    seed: int = 0, track: bool = True,
) -> ABRun:
    """Score ``control`` and ``treatments`` on the same rows of ``data`` and compare them (module docstring).

    ``data``: a prepared data folder (rows of ``split``) or a raw file (encoded through the
    control's feature map; ``split`` does not apply). ``frequency_features``: the features
    whose head/torso/tail id slices are reported (default: every vocabulary feature).
    ``track=False`` skips MLflow.
    """
    from pipelines.train import quiet_logs

    quiet_logs()
    if not treatments:
        raise DataError("no treatment: pass at least one --treatment")
    data_path = Path(data).expanduser().resolve()
    arms = [_open_arm(spec, mlflow_uri) for spec in (control, *treatments)]
    task = _check_families(arms)
    with _data_split(data_path, split, arms[0], Path(out)) as (fm, files, summary):
        fingerprint = feature_map_fingerprint(fm)
        for arm in arms:
            problem = fit_problem(arm.feature_map, fm)
            if problem is not None:
                raise DataError(f"arm '{arm.name}' ({arm.source}) does not fit the data {data_path}: {problem}")
        _unique_names(arms)
        table, keys = _read_rows(fm, files, slices, group)
        scored = _score_runs(arms, fm, files, workers, batch_size, address)
        speeds = _speed(arms, table, speed_batch_rows, speed_batches)
        bundle_scores = {a.name: _score_bundle(a, table) for a in arms if a.kind == "bundle"}
    positive, labelled = _positive(table.column(fm.label).to_numpy(zero_copy_only=False), task)
    summary.dropped = int((~labelled).sum())
    scores = []
    for arm in arms:
        k, s = scored[arm.name] if arm.kind == "run" else (keys, bundle_scores[arm.name])
        if summary.dropped:
            order = np.minimum(np.searchsorted(keys, k), len(keys) - 1)  # a stray key fails in compare
            k, s = k[labelled[order]], s[labelled[order]]
        scores.append(ArmScores(arm.name, arm.kind, arm.source, k, s, feature_map_fingerprint(arm.feature_map),
                                arm.embedding_bytes, speeds[arm.name], task=task.family))

    def column(name: str) -> np.ndarray:
        return table.column(name).to_numpy(zero_copy_only=False)[labelled]

    rows = EvalRows(keys[labelled], positive[labelled].astype(np.int8), fingerprint,
                    columns={c: column(c) for c in slices},
                    frequency={f: c[labelled] for f, c in _frequency(fm, table, frequency_features).items()},
                    group=column(group) if group else None)
    result = compare(scores, arms[0].name, rows, level=level, slices=slices, group=group, resamples=resamples,
                     seed=seed, data=summary)
    run = ABRun(result, write_report(result, out))
    if track:
        _log_mlflow(mlflow_uri, run, arms, data_path, split)
    print(json.dumps({"report": str(run.files.html), "verdicts": [v.text for v in result.verdicts],
                      "mlflow_parent": run.parent_run_id}, indent=1), flush=True)
    return run


__all__ = ["ABRun", "Arm", "run_ab"]
