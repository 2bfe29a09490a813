"""``recemb demo``: the whole life of an embedding table on the embedded default, in one command.

Six stages, one ``[demo]`` line each with its time:

1. data: synthetic CTR logs (Criteo layout, with the generator's oracle AUC) and categorical
   events, each with a few malformed rows injected on purpose; both prepared, the bad rows
   quarantined in ``rejects/`` and counted;
2. train: DeepFM with ``full`` tables and with ``unified`` tables at 1/100 of the bytes, on
   local Ray (2 Train workers, row-wise sharded tables) or in this process (``workers=0``),
   each tracked in MLflow;
3. A/B: both runs score the same test rows (``recemb ab``): paired bootstrap, DeLong, Holm,
   an HTML report;
4. export: the arm with the higher test AUC becomes a serving bundle; the test split is
   scored through the numpy serving runtime and compared with the trained model itself;
5. anomaly: APE on the events, against the per-entity frequency baseline;
6. summary: where the report, the bundle and the MLflow store are, and the headline figures.

Every run gets its own folder ``<workdir>/run-<n>`` (nothing from an earlier run is reused)
and says where the previous one is; the MLflow store ``<workdir>/mlruns.db`` collects all.

Example:
    >>> summary = run_demo(Path("demo-out"), rows=20_000, events=5_000, workers=0)  # doctest: +SKIP
    >>> summary["ab"]["verdicts"]                                                  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.train import quiet_logs, run_train
from recemb.config.experiment import load_experiment
from recemb.data.preprocess import PrepareReport, prepare_dataset
from recemb.data.schema import FeatureMap, load_dataset_config
from recemb.data.synthetic import CtrSynthConfig, EventSynthConfig, generate_ctr, generate_events
from recemb.io import write_json_atomic
from recemb.tracking import resolve_tracking_uri

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGES = 6

# Malformed rows appended on purpose: prepare must quarantine each with its reason.
_BAD_CTR_ROWS = ["1\tonly-two-fields", "7" + "\t1" * 13 + "\tx" * 26, "0\tnot-a-number" + "\t1" * 12 + "\tx" * 26]
_BAD_EVENT_ROWS = ["u1,h1,p1,80", "u1,h1,p1,80,login,-3"]


@contextmanager
def _stage(n: int, name: str, log: dict[str, float]) -> Iterator[None]:
    print(f"[demo] {n}/{STAGES} {name} ...", flush=True)
    t0 = time.perf_counter()
    yield
    log[name] = round(time.perf_counter() - t0, 1)
    print(f"[demo] {n}/{STAGES} {name} done in {log[name]:.1f}s", flush=True)


def _next_folder(workdir: Path) -> tuple[Path, Path | None]:
    """``workdir/run-<n>`` for this run (n one more than any there) and the previous one."""
    runs = sorted((int(p.name.split("-", 1)[1]), p) for p in workdir.glob("run-*")
                  if p.is_dir() and p.name.split("-", 1)[1].isdigit())
    previous = runs[-1][1] if runs else None
    number = runs[-1][0] + 1 if runs else 1
    return workdir / f"run-{number}", previous


def _append(path: Path, lines: list[str]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def _prepared(report: PrepareReport) -> str:
    rows = ", ".join(f"{k} {v:,}" for k, v in report.rows_out.items())
    reasons = "; ".join(f"{why}: {n}" for why, n in sorted(report.rejected.items()))
    return f"{rows}; {report.rows_rejected} rejected ({reasons or 'none'}) -> {report.output}/rejects/"


def _data(folder: Path, rows: int, events: int, seed: int) -> dict[str, Any]:
    raw = folder / "raw"
    synth = generate_ctr(CtrSynthConfig(rows=rows, seed=seed, vocab_scale=0.1), raw / "ctr.tsv")
    _append(raw / "ctr.tsv", _BAD_CTR_ROWS)
    ctr = prepare_dataset(load_dataset_config(CONFIGS / "datasets" / "synthetic_ctr.yaml",
                                              {"paths": [str(raw / "ctr.tsv")], "output": str(folder / "ctr")}))
    print(f"[demo]   CTR: {synth.rows:,} rows + {len(_BAD_CTR_ROWS)} bad ones (oracle AUC {synth.oracle_auc:.4f}); "
          f"prepared {_prepared(ctr)}", flush=True)
    generate_events(EventSynthConfig(train_events=events, test_events=max(events // 5, 500), seed=seed), raw / "events")
    _append(raw / "events" / "train.csv", _BAD_EVENT_ROWS)
    files = {"train": [str(raw / "events" / "train.csv")], "test": [str(raw / "events" / "test.csv")]}
    ev = prepare_dataset(load_dataset_config(CONFIGS / "datasets" / "synthetic_events.yaml",
                                             {"split": {"files": files}, "output": str(folder / "events")}))
    print(f"[demo]   events: prepared {_prepared(ev)}", flush=True)
    return {"oracle_auc": synth.oracle_auc, "ctr": folder / "ctr", "events": folder / "events",
            "rejected": {"ctr": ctr.rows_rejected, "events": ev.rows_rejected}}


def _train_ctr(folder: Path, data: Path, uri: str, workers: int, address: str, seed: int) -> dict[str, Any]:
    runs = {}
    for name, extra in (("full", []), ("unified", ["embedding.kind=unified", "embedding.budget=0.01"])):
        cfg = load_experiment(CONFIGS / "experiments" / "deepfm_synthetic_ctr.yaml", [
            f"data_dir={data}", f"train.output_dir={folder / 'runs'}", f"train.seed={seed}",
            f"expid=demo_deepfm_{name}", "embedding.sharding=row_wise", f"train.progress={workers == 0}",
            # One epoch at today's batch: base.yaml's recipe (early stopping over up to 20 epochs,
            # batch from the rows) would take several times the demo's ~5 minutes on 2 cores.
            "train.epochs=1", "train.batch_size=4096", *extra])
        result = run_train(cfg, workers=workers, address=address, mlflow_uri=uri)
        runs[name] = result
        print(f"[demo]   {name}: test AUC {result.test.get('auc', float('nan')):.4f}, "
              f"{result.embedding_bytes:,} embedding bytes, {result.samples_per_s:,.0f} samples/s, "
              f"MLflow run {result.run_id}", flush=True)
    return runs


def _ab(folder: Path, runs: dict[str, Any], data: Path, uri: str, address: str) -> Any:
    from pipelines.ab import run_ab

    return run_ab(runs["full"].output_dir, [runs["unified"].output_dir], data, out=folder / "ab", mlflow_uri=uri,
                  workers=1, address=address)


def _export(folder: Path, runs: dict[str, Any], data: Path) -> dict[str, Any]:
    """Export the better arm, score the test split through the bundle, compare with the model."""
    import torch

    from pipelines.export import run_export
    from pipelines.score import run_score
    from recemb.data.batch import arrow_to_batch
    from recemb.serving.bundle import Bundle
    from recemb.train.restore import load_trained_model, locate_checkpoint

    best = max(runs, key=lambda k: runs[k].test.get("auc", float("-inf")))
    bundle_dir = folder / "bundle"
    run_export(runs[best].output_dir, bundle_dir)
    scored = run_score(bundle_dir, data / "test", folder / "test_scores.parquet")
    fm = FeatureMap.load(data)
    table = pa.concat_tables([pq.read_table(data / f) for f in fm.shards["test"]])
    model, _ = load_trained_model(locate_checkpoint(runs[best].output_dir).path, fm)
    with torch.no_grad():
        reference = model.predict(arrow_to_batch(table, fm)).float().numpy()
    bundle = Bundle.open(bundle_dir)
    served = bundle.logits_of(bundle.encode_prepared(table))
    gap = float(np.max(np.abs(served - reference))) if len(reference) else 0.0
    auc = scored.get("metrics", {}).get("auc", float("nan"))
    print(f"[demo]   exported '{best}' to {bundle_dir}; served test AUC {auc:.4f} (trained run: "
          f"{runs[best].test.get('auc', float('nan')):.4f}); max |served - trained logit| = {gap:.2e}", flush=True)
    return {"arm": best, "bundle": str(bundle_dir), "served_auc": auc, "max_logit_gap": gap,
            "scores": str(folder / "test_scores.parquet")}


def _anomaly(folder: Path, data: Path, uri: str, seed: int, epochs: int) -> dict[str, Any]:
    from recemb.eval.metrics import anomaly_metrics
    from recemb.models.anomaly.frequency import frequency_scores

    cfg = load_experiment(CONFIGS / "experiments" / "ape_synthetic_events.yaml", [
        f"data_dir={data}", f"train.output_dir={folder / 'runs'}", f"train.seed={seed}", "expid=demo_ape",
        f"train.epochs={epochs}", "train.progress=true"])
    result = run_train(cfg, workers=0, mlflow_uri=uri)
    fm = FeatureMap.load(data)

    def split(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t = pa.concat_tables([pq.read_table(data / f) for f in fm.shards[name]], promote_options="default")
        ids = np.stack([t.column(n).to_numpy() for n in fm.sparse_features], 1).astype(np.int64)
        count = t.column("count").to_numpy().astype(np.float64)
        return ids, count, t.column("label").to_numpy().astype(np.float64)

    import torch

    train_ids, counts, _ = split("train")
    test_ids, _, labels = split("test")
    sizes = [fm.feature(n).num_embeddings for n in fm.sparse_features]
    freq = anomaly_metrics(torch.from_numpy(frequency_scores(train_ids, counts, sizes, test_ids)),
                           torch.from_numpy(labels))
    out = {"auc": result.test["auc"], "ap": result.test["ap"], "frequency_auc": freq["auc"],
           "frequency_ap": freq["ap"], "mlflow_run_id": result.run_id, "run_dir": result.output_dir}
    print(f"[demo]   APE: test ROC AUC {out['auc']:.4f}, AP {out['ap']:.4f}; frequency baseline "
          f"{freq['auc']:.4f} / {freq['ap']:.4f}", flush=True)
    return out


def run_demo(
    workdir: Path, rows: int = 200_000, seed: int = 0, model: str = "deepfm", workers: int = 2,
    address: str = "", mlflow_uri: str | None = None, events: int = 40_000, ape_epochs: int = 10,
) -> dict[str, Any]:
    """Run the six stages in a new ``workdir/run-<n>``; returns the summary (also printed and saved).

    ``model`` is kept for the command line; the comparison trains DeepFM. ``events``: training
    events of the anomaly stage.
    """
    quiet_logs()
    if model != "deepfm":
        raise ValueError(f"the demo trains DeepFM (got model={model!r}); train other models with recemb train")
    t0 = time.perf_counter()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    folder, previous = _next_folder(workdir)
    folder.mkdir()
    if previous is not None:
        print(f"[demo] this run: {folder}; the previous run's results are in {previous} "
              f"({previous / 'summary.json'})", flush=True)
    uri = resolve_tracking_uri(mlflow_uri or f"sqlite:///{workdir / 'mlruns.db'}")
    times: dict[str, float] = {}
    with _stage(1, "data: generate and prepare CTR logs and events (bad rows injected)", times):
        data = _data(folder, rows, events, seed)
    with _stage(2, f"train: DeepFM full vs unified@1/100 ({workers or 'no'} Ray workers)", times):
        runs = _train_ctr(folder, data["ctr"], uri, workers, address, seed)
    with _stage(3, "A/B: paired comparison on the test rows", times):
        ab = _ab(folder, runs, data["ctr"], uri, address)
    with _stage(4, "export the better arm and score through the serving runtime", times):
        exported = _export(folder, runs, data["ctr"])
    with _stage(5, "anomaly: APE on the events vs the frequency baseline", times):
        anomaly = _anomaly(folder, data["events"], uri, seed, ape_epochs)
    result = ab.result
    arms = {a.name: {"auc": a.metrics.get("auc"), "embedding_bytes": a.embedding_bytes} for a in result.arms}
    verdicts = [v.text for v in result.verdicts]
    auc_deltas = {v.treatment: {"delta": v.delta, "low": v.low, "high": v.high, "verdict": v.verdict}
                  for v in result.verdicts if v.metric == "auc"}
    summary = {
        "folder": str(folder), "previous": str(previous) if previous else None, "mlflow_uri": uri,
        "oracle_auc": data["oracle_auc"], "rejected_rows": data["rejected"],
        "runs": {k: {"test": r.test, "embedding_bytes": r.embedding_bytes, "samples_per_s": r.samples_per_s,
                     "mlflow_run_id": r.run_id, "run_dir": r.output_dir} for k, r in runs.items()},
        "ab": {"report": str(ab.files.html), "markdown": str(ab.files.markdown), "arms": arms,
               "auc_delta": auc_deltas, "verdicts": verdicts, "mlflow_parent": ab.parent_run_id},
        "export": exported, "anomaly": anomaly, "seconds": times,
    }
    with _stage(6, "summary", times):
        summary["seconds"]["total"] = round(time.perf_counter() - t0, 1)
        write_json_atomic(folder / "summary.json", summary)
        speed = {f"demo_deepfm_{k}": r.samples_per_s for k, r in runs.items()}
        for name, arm in arms.items():
            delta = auc_deltas.get(name)
            ci = (f" (vs control {delta['delta']:+.4f}, CI {delta['low']:+.4f}..{delta['high']:+.4f}, "
                  f"{delta['verdict']})") if delta else " (control)"
            print(f"[demo]   {name}: test AUC {arm['auc']:.4f}{ci}, {arm['embedding_bytes']:,} embedding bytes, "
                  f"trained at {speed.get(name, float('nan')):,.0f} samples/s", flush=True)
        print(f"[demo]   APE anomaly AUC {anomaly['auc']:.4f} / AP {anomaly['ap']:.4f} (frequency baseline "
              f"{anomaly['frequency_auc']:.4f} / {anomaly['frequency_ap']:.4f})", flush=True)
        print(f"[demo]   report: {ab.files.html}\n[demo]   bundle: {exported['bundle']} (served = trained within "
              f"{exported['max_logit_gap']:.1e})\n[demo]   MLflow: {uri} (recemb runs list --mlflow-uri {uri})\n"
              f"[demo]   everything: {folder} (summary.json); {summary['seconds']['total']:.0f}s in all", flush=True)
    print(json.dumps(summary, indent=1, default=float), flush=True)
    return summary


__all__ = ["run_demo"]
