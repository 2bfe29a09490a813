"""Speed of the paired bootstrap: every metric (AUC, log loss, NE, calibration) of 3 arms, 1,000 resamples.

Synthetic rows (30% positives, arms = signal + independent noise, one arm rounded so it has
ties) at several row counts; each size runs ``recemb.eval.stats.paired_bootstrap``
``--repeat`` times and prints the fastest run's wall seconds, its CPU seconds (all threads;
less sensitive to other work on the machine than wall time), the cost per
row-resample-arm and the time per row relative to the smallest size, so growth with rows is
visible (linear in rows plus the per-arm sorts). On 2 shared cores the wall figures move
with the machine's load (printed).

Usage::

    python tools/bench_ab.py                          # 100k, 300k, 1M rows; 1,000 resamples; 3 arms
    python tools/bench_ab.py --rows 1000000 --resamples 1000 --threads 2
    python tools/bench_ab.py --synthetic-ab bench-out/ab   # full vs unified@1/100 vs hashed@1/100 vs int8 of full

``--synthetic-ab DIR`` instead generates and prepares synthetic CTR data (``--synth-rows``), trains a
DeepFM with full tables, unified and hashed at 1/100 of their bytes (one epoch each, in this
process), exports the full run as an int8 bundle and runs ``pipelines.ab.run_ab`` on the test split
(report and MLflow store under DIR; data, runs and bundle are reused when DIR has them). It prints
the Markdown summary, each arm's metrics and bytes, and per treatment and id class (head, torso,
tail) the delta AUC over the features: row-weighted mean, median, the worst feature with its
interval, and the verdicts of the slices' Holm family.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from recemb.eval.stats import paired_bootstrap


def synthetic_ab(out: Path, rows: int, vocab_scale: float) -> None:
    """Full vs unified@1/100 vs hashed@1/100 vs the int8 bundle of full, on fresh synthetic data."""
    import torch.distributed as dist

    from pipelines.ab import run_ab
    from recemb.config.experiment import load_experiment
    from recemb.data.preprocess import prepare_dataset
    from recemb.data.schema import load_dataset_config
    from recemb.data.synthetic import CtrSynthConfig, generate_ctr
    from recemb.export import export_bundle
    from recemb.train.loop import train

    repo = Path(__file__).resolve().parents[1]
    out = out.resolve()
    raw, data = out / "ctr.tsv", out / "prepared"
    if not (data / "feature_map.json").is_file():
        generate_ctr(CtrSynthConfig(rows=rows, vocab_scale=vocab_scale, seed=0), raw)
        prepare_dataset(load_dataset_config(repo / "configs/datasets/synthetic_ctr.yaml",
                                            {"paths": [str(raw)], "output": str(data)}))
    runs = {}
    for name, extra in (("full", ["embedding.kind=full"]),
                        ("unified", ["embedding.kind=unified", "embedding.budget=0.01"]),
                        ("hashed", ["embedding.kind=hashed", "embedding.budget=0.01"])):
        folder = out / "runs" / f"deepfm_{name}"
        if not (folder / "result.json").is_file():
            cfg = load_experiment(repo / "configs/experiments/deepfm_synthetic_ctr.yaml",
                                  [f"data_dir={data}", f"train.output_dir={out / 'runs'}", f"expid=deepfm_{name}",
                                   "train.progress=false", "train.batch_size=1024", "embedding.dim=16",
                                   "embedding.sharding=row_wise", "model.params={mlp: [64, 32]}", *extra])
            t0 = time.perf_counter()
            train(cfg)
            if dist.is_initialized():
                dist.destroy_process_group()
            print(f"[bench_ab] trained {name} in {time.perf_counter() - t0:.0f} s", flush=True)
        runs[name] = folder
    bundle = out / "bundles" / "full_int8"
    if not (bundle / "manifest.json").is_file():
        export_bundle(runs["full"], bundle, dtype="int8")
    t0 = time.perf_counter()
    run = run_ab(str(runs["full"]), [str(runs["unified"]), str(runs["hashed"]), str(bundle)], data,
                 out=out / "report", mlflow_uri=f"sqlite:///{out / 'mlflow.db'}", workers=1)
    print(run.files.markdown.read_text(), flush=True)
    result = run.result
    print(f"[bench_ab] recemb ab in {time.perf_counter() - t0:.0f} s ({result.rows:,} rows, bootstrap "
          f"{result.bootstrap_seconds:.1f} s); report {run.files.html}", flush=True)
    for a in result.arms:
        print(f"[bench_ab] {a.name}: {a.embedding_bytes:,} embedding bytes, " +
              ", ".join(f"{k} {v:.4f}" for k, v in a.metrics.items() if k in ("auc", "logloss", "ne", "calibration")),
              flush=True)
    for t in (a.name for a in result.arms if a.name != result.control):
        for cls in ("head", "torso", "tail"):
            found = [(s.slice[5:], s.rows, s.deltas[t]["auc"]) for s in result.slices
                     if s.slice.startswith("freq:") and s.value == cls and "auc" in s.deltas.get(t, {})]
            if not found:
                continue
            deltas = np.array([d.delta for _, _, d in found])
            rows = np.array([r for _, r, _ in found])
            worst = min(found, key=lambda x: x[2].delta)
            verdicts = {v: sum(d.verdict == v for _, _, d in found) for v in ("better", "worse", "indistinguishable")}
            print(f"[bench_ab] {t} {cls} ids over {len(found)} features: delta AUC row-weighted mean "
                  f"{np.average(deltas, weights=rows):+.4f}, median {np.median(deltas):+.4f}, worst {worst[0]} "
                  f"{worst[2].delta:+.4f} ({worst[2].low:+.4f}..{worst[2].high:+.4f}, {worst[1]:,} rows); "
                  f"Holm over slices: {verdicts}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--arms", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="runs per size; the fastest is reported (shared machine)")
    p.add_argument("--synthetic-ab", type=Path, default=None, metavar="DIR")
    p.add_argument("--synth-rows", type=int, default=200_000)
    p.add_argument("--vocab-scale", type=float, default=0.01)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.synthetic_ab is not None:
        synthetic_ab(args.synthetic_ab, args.synth_rows, args.vocab_scale)
        return
    print(f"[bench_ab] {args.arms} arms, {args.resamples} resamples, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    first: tuple[int, float] | None = None
    for n in args.rows:
        rng = np.random.default_rng(0)
        y = rng.random(n) < 0.3
        scores = np.stack([y * (1 + 0.1 * a) + rng.normal(size=n) for a in range(args.arms)])
        scores[-1] = np.round(scores[-1], 2)  # ties
        best, cpu = float("inf"), 0.0
        for _ in range(args.repeat):
            load = os.getloadavg()[0]
            t0, c0 = time.perf_counter(), time.process_time()
            out = paired_bootstrap(y, scores, resamples=args.resamples)
            seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
            if seconds < best:
                best, cpu = seconds, cpu_s
        per = best / (n * args.resamples * args.arms) * 1e9
        first = first or (n, best)
        growth = (best / first[1]) / (n / first[0])
        d = out.deltas[0]["auc"]
        print(f"[bench_ab] rows={n:>9,}  {best:6.2f} s wall, {cpu:6.2f} s CPU  ({per:.2f} ns per row x resample x "
              f"arm; time/rows vs {first[0]:,} rows x{growth:.2f})  delta auc arm1 {d:+.4f} "
              f"({out.low[0]['auc']:+.4f}..{out.high[0]['auc']:+.4f})  load {load:.2f}", flush=True)

if __name__ == "__main__":
    main()
