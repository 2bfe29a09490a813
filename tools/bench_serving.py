"""Serving speed, side by side in one run: the numpy bundle runtime, the trained torchrec model, HTTP.

A DeepFM is trained per variant on synthetic Criteo-like data (``recemb train`` in a
subprocess; reused on the next call unless ``--fresh``) and exported to an fp32 bundle.
Then, in this one process with one torch thread:

1. **lookups**: the bundle's numpy runtime (``Bundle.layer().lookup_ids`` per feature, ids
   already prepared) against the trained model's embedding layer (torchrec, unsharded, eval,
   ``no_grad``) on the same test ids, batch ``--lookup-batch``: lookups/s (ids per second)
   and the ratio runtime/torch, with the largest difference between their vectors;
2. **score**: ``Bundle.score`` on raw log rows (encoding the raw values included) at batch 1
   and 512, p50/p99, next to the trained model's forward on prepared ids;
3. **HTTP**: ``recemb serve`` (``pipelines.serve.run_serve``) on 127.0.0.1 with
   ``--replicas``, hit by ``--concurrency`` client threads of this process posting
   ``--requests`` ``/score`` requests of ``--http-rows`` rows each: requests/s, p50, p99, the
   mean requests per batch and the share of the wall time the replica spent on its batches.

On 2 cores every figure shares the CPUs with whatever else runs (the load average is printed);
the client threads, Serve's proxy and the replica share them too.

Usage::

    python tools/bench_serving.py                                    # 200k rows; full, hashed, unified
    python tools/bench_serving.py --variants full hashed unified qr --concurrency 16 --requests 2000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

OUT = REPO / "bench-out" / "serving"
MODEL = "deepfm"
# name -> overrides of the experiment (the budgeted variants at 1/10 of the full tables' bytes)
VARIANTS: dict[str, list[str]] = {
    "full": ["embedding.kind=full"],
    "hashed": ["embedding.kind=hashed", "embedding.budget=0.1"],
    "unified": ["embedding.kind=unified", "embedding.budget=0.1"],
    "qr": ["embedding.kind=qr", "embedding.budget=0.1", "embedding.params={op: mult}"],
    "robe": ["embedding.kind=robe", "embedding.budget=0.1"],
}


# ----------------------------------------------------------------------------- data, runs, bundles


def prepared(rows: int, seed: int) -> tuple[Path, Path]:
    """``(raw TSV, prepared folder)`` of ``rows`` synthetic rows (generated and prepared once)."""
    from recemb.data.preprocess import prepare_dataset
    from recemb.data.schema import load_dataset_config
    from recemb.data.synthetic import CtrSynthConfig, generate_ctr

    tsv, out = OUT / "data" / f"ctr_{rows}_{seed}.tsv", OUT / "data" / f"prepared_{rows}_{seed}"
    if not Path(f"{tsv}.json").exists():
        generate_ctr(CtrSynthConfig(rows=rows, seed=seed), tsv)
    if not (out / "feature_map.json").exists():
        cfg = load_dataset_config(REPO / "configs/datasets/synthetic_ctr.yaml", {"paths": [str(tsv)]})
        prepare_dataset(cfg, out, overwrite=True)
    return tsv, out


def trained_bundle(variant: str, data_dir: Path, fresh: bool) -> tuple[Path, Path]:
    """``(checkpoint, bundle)`` of ``variant`` on ``data_dir``: ``recemb train`` in a subprocess, then
    ``export_bundle``; both kept under ``OUT/<data folder name>/``."""
    from recemb.export import export_bundle

    work = OUT / data_dir.name
    expid = f"{MODEL}_serving_{variant}"
    checkpoint = work / "runs" / expid / "checkpoints" / "best"
    if fresh or not (checkpoint / "meta.json").exists():
        cmd = [sys.executable, "-m", "recemb.cli", "train",
               "--config", str(REPO / "configs/experiments" / f"{MODEL}_synthetic_ctr.yaml"),
               "--mlflow-uri", f"sqlite:///{OUT / 'mlruns.db'}", f"data_dir={data_dir}", f"expid={expid}",
               f"train.output_dir={work / 'runs'}", "train.progress=false", *VARIANTS[variant]]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode:
            raise SystemExit(f"training {variant} failed:\n{proc.stderr[-3000:]}")
        print(f"[train] {variant}: {time.perf_counter() - t0:.0f} s", flush=True)
    bundle = work / "bundles" / variant
    if fresh or not (bundle / "manifest.json").exists():
        export_bundle(checkpoint, bundle, dtype="fp32", overwrite=True)
    return checkpoint, bundle


def raw_rows(tsv: Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` rows of the Criteo-format TSV as dicts of raw values (empty fields left out)."""
    names = [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    out = []
    with tsv.open(encoding="utf-8") as f:
        for line, _ in zip(f, range(n), strict=False):
            fields = line.rstrip("\n").split("\t")[1:]
            out.append({c: v for c, v in zip(names, fields, strict=True) if v != ""})
    return out


# ----------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> np.ndarray:
    """Seconds of each of ``repeats`` calls of ``fn`` (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    out = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t0
    return out


def pct(times: np.ndarray, q: float) -> float:
    return float(np.percentile(times, q))


def lookups(variant: str, checkpoint: Path, bundle_dir: Path, data_dir: Path, batch: int,
            repeats: int) -> dict[str, Any]:
    """Ids/s of the numpy runtime and of the trained torchrec layer on the same test ids, and their max diff."""
    import pyarrow.parquet as pq
    import torch

    from recemb.data.batch import arrow_to_batch
    from recemb.data.schema import FeatureMap
    from recemb.models.registry import embedding_layers
    from recemb.serving.bundle import Bundle
    from recemb.train.restore import load_trained_model

    fm = FeatureMap.load(data_dir / "feature_map.json")
    model, _ = load_trained_model(checkpoint)
    layer = embedding_layers(model)["embedding"]
    bundle = Bundle.open(bundle_dir)
    runtime = bundle.layer("embedding")
    # Both sides get the same rows (ParquetBatches would join a short last batch onto this one).
    table = pq.read_table(data_dir / fm.shards["test"][0]).slice(0, batch)
    kjt = arrow_to_batch(table, fm).sparse
    encoded = bundle.encode_prepared(table)
    if encoded.n != batch:
        raise SystemExit(f"the first test shard has {encoded.n} rows; lower --lookup-batch")

    def numpy_lookup() -> dict[str, np.ndarray]:
        return {f: runtime.lookup_ids(f, *encoded.ids[f]) for f in runtime.features}

    def torch_lookup() -> Any:
        with torch.no_grad():
            return layer(kjt)

    ours, theirs = numpy_lookup(), torch_lookup().to_dict()
    diff = max(float(np.abs(ours[f] - theirs[f].numpy()).max()) for f in runtime.features)
    ids = batch * len(runtime.features)
    t_np, t_torch = timed(numpy_lookup, repeats), timed(torch_lookup, repeats)
    return {"variant": variant, "ids_per_batch": ids, "numpy_ids_per_s": ids / float(np.median(t_np)),
            "torch_ids_per_s": ids / float(np.median(t_torch)), "max_abs_diff": diff,
            "embedding_bytes": bundle.embedding_bytes()}


def score_latency(checkpoint: Path, bundle_dir: Path, data_dir: Path, rows: list[dict[str, Any]],
                  sizes: list[int], repeats: dict[int, int]) -> list[dict[str, Any]]:
    """p50/p99 seconds of ``Bundle.score`` on raw rows and of the trained model's forward on prepared ids."""
    import torch

    from recemb.data.batch import ParquetBatches
    from recemb.data.schema import FeatureMap
    from recemb.serving.bundle import Bundle
    from recemb.train.restore import load_trained_model

    bundle = Bundle.open(bundle_dir)
    model, _ = load_trained_model(checkpoint)
    fm = FeatureMap.load(data_dir / "feature_map.json")
    out = []
    for n in sizes:
        batch = next(iter(ParquetBatches(fm, "test", n, root=data_dir)))
        sent = rows[:n]

        def forward(b: Any = batch) -> Any:
            with torch.no_grad():
                return model(b)

        t_bundle = timed(lambda s=sent: bundle.score(s), repeats[n])
        t_model = timed(forward, repeats[n])
        out.append({"batch": n, "repeats": repeats[n],
                    "bundle_p50_ms": 1e3 * pct(t_bundle, 50), "bundle_p99_ms": 1e3 * pct(t_bundle, 99),
                    "model_p50_ms": 1e3 * pct(t_model, 50), "model_p99_ms": 1e3 * pct(t_model, 99)})
    return out


def http(bundle_dir: Path, rows: list[dict[str, Any]], replicas: int, concurrency: int, requests: int,
         per_request: int, warmup: int) -> dict[str, Any]:
    """Requests/s and latency of ``/score`` over HTTP at ``concurrency`` client threads (127.0.0.1)."""
    from pipelines.serve import run_serve

    t0 = time.perf_counter()
    endpoint = run_serve(bundle_dir, port=0, replicas=replicas, blocking=False)
    started = time.perf_counter() - t0
    try:
        url = f"{endpoint.url}/score"
        bodies = [json.dumps({"rows": rows[(i * per_request) % (len(rows) - per_request):][:per_request]}).encode()
                  for i in range(requests + warmup)]

        def post(body: bytes) -> float:
            t = time.perf_counter()
            req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                resp.read()
            return time.perf_counter() - t

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(post, bodies[:warmup]))
            with urllib.request.urlopen(f"{endpoint.url}/healthz", timeout=10) as resp:
                before = json.loads(resp.read())["stats"]
            t1 = time.perf_counter()
            latencies = np.array(list(pool.map(post, bodies[warmup:])))
            wall = time.perf_counter() - t1
        with urllib.request.urlopen(f"{endpoint.url}/healthz", timeout=10) as resp:
            after = json.loads(resp.read())["stats"]
    finally:
        endpoint.shutdown()
    scored = after["score_requests"] - before["score_requests"]
    batches = after["batches"] - before["batches"]
    return {"replicas": replicas, "concurrency": concurrency, "requests": requests, "rows_per_request": per_request,
            "start_s": started, "requests_per_s": requests / wall, "p50_ms": 1e3 * pct(latencies, 50),
            "p99_ms": 1e3 * pct(latencies, 99),
            # Stats come from the replica that answered /healthz (all of them when replicas == 1).
            "requests_per_batch": scored / batches if batches and replicas == 1 else None,
            "replica_busy_share": (after["busy_s"] - before["busy_s"]) / wall if replicas == 1 else None}


# ----------------------------------------------------------------------------- report


def report(results: dict[str, Any]) -> None:
    print(f"\nload average {results['load_before']} -> {results['load_after']}; torch threads 1; "
          f"{results['rows']:,} synthetic rows, {MODEL}, fp32 bundles")
    print(f"\nlookups: ids/s at batch {results['lookup_batch']} x 26 features (median of {results['repeats']})")
    print(f"{'variant':<9} {'bundle bytes':>13} {'numpy ids/s':>13} {'torch ids/s':>13} {'numpy/torch':>11} "
          f"{'max |diff|':>11}")
    for r in results["lookups"]:
        print(f"{r['variant']:<9} {r['embedding_bytes']:>13,} {r['numpy_ids_per_s']:>13,.0f} "
              f"{r['torch_ids_per_s']:>13,.0f} {r['numpy_ids_per_s'] / r['torch_ids_per_s']:>11.2f} "
              f"{r['max_abs_diff']:>11.1e}")
    print(f"\nscore latency ({results['score_variant']}): Bundle.score on raw rows vs the trained model's forward "
          "on prepared ids, ms")
    print(f"{'batch':>6} {'repeats':>8} {'bundle p50':>11} {'bundle p99':>11} {'model p50':>10} {'model p99':>10} "
          f"{'p50 ratio':>10}")
    for r in results["score"]:
        print(f"{r['batch']:>6} {r['repeats']:>8} {r['bundle_p50_ms']:>11.2f} {r['bundle_p99_ms']:>11.2f} "
              f"{r['model_p50_ms']:>10.2f} {r['model_p99_ms']:>10.2f} {r['bundle_p50_ms'] / r['model_p50_ms']:>10.2f}")
    h = results.get("http")
    if h:
        per_batch = f"{h['requests_per_batch']:.2f}" if h["requests_per_batch"] else "-"
        busy = f"{h['replica_busy_share']:.2f}" if h["replica_busy_share"] is not None else "-"
        print(f"\nHTTP /score on 127.0.0.1 ({results['score_variant']}): {h['replicas']} replica(s), "
              f"{h['concurrency']} client threads, {h['requests']} requests of {h['rows_per_request']} row(s) "
              f"(endpoint up in {h['start_s']:.1f} s)")
        print(f"{'req/s':>8} {'rows/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'req/batch':>10} {'replica busy':>13}")
        print(f"{h['requests_per_s']:>8.1f} {h['requests_per_s'] * h['rows_per_request']:>8.1f} "
              f"{h['p50_ms']:>8.2f} {h['p99_ms']:>8.2f} {per_batch:>10} {busy:>13}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000, help="synthetic rows (generated, prepared, trained once)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=["full", "hashed", "unified"], choices=list(VARIANTS))
    ap.add_argument("--fresh", action="store_true", help="train and export again even when a run exists")
    ap.add_argument("--lookup-batch", type=int, default=4096, help="rows per lookup batch")
    ap.add_argument("--repeats", type=int, default=30, help="timed lookup batches per side")
    ap.add_argument("--replicas", type=int, default=1, help="Serve replicas")
    ap.add_argument("--concurrency", type=int, default=8, help="HTTP client threads")
    ap.add_argument("--requests", type=int, default=1000, help="timed HTTP requests (after --warmup more)")
    ap.add_argument("--warmup", type=int, default=50, help="untimed HTTP requests first")
    ap.add_argument("--http-rows", type=int, default=1, help="rows per HTTP request")
    ap.add_argument("--no-http", action="store_true", help="skip the HTTP endpoint")
    ap.add_argument("--out", type=Path, default=OUT / "results.json")
    args = ap.parse_args()

    import logging

    import torch

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)  # serving-style latency; also steadier on a busy 2-core machine
    load_before = [round(x, 2) for x in os.getloadavg()]
    tsv, data_dir = prepared(args.rows, args.seed)
    runs = {v: trained_bundle(v, data_dir, args.fresh) for v in args.variants}
    results: dict[str, Any] = {"rows": args.rows, "lookup_batch": args.lookup_batch, "repeats": args.repeats,
                               "load_before": load_before, "lookups": []}
    for v, (checkpoint, bundle) in runs.items():
        results["lookups"].append(lookups(v, checkpoint, bundle, data_dir, args.lookup_batch, args.repeats))
        print(f"[lookups] {v}: done", flush=True)
    rows = raw_rows(tsv, max(512, args.http_rows) * 4)
    first = args.variants[0]
    results["score_variant"] = first
    results["score"] = score_latency(*runs[first], data_dir, rows, [1, 512], {1: 300, 512: 40})
    print("[score] done", flush=True)
    if not args.no_http:
        results["http"] = http(runs[first][1], rows, args.replicas, args.concurrency, args.requests,
                               args.http_rows, args.warmup)
    results["load_after"] = [round(x, 2) for x in os.getloadavg()]
    report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
