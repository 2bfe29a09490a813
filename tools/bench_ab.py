"""Speed of the paired bootstrap: every metric (AUC, log loss, NE, calibration) of 3 arms, 1,000 resamples.

Synthetic rows (30% positives, arms = signal + independent noise, one arm rounded so it has
ties) at several row counts; each size runs ``recemb.eval.stats.paired_bootstrap`` once and
prints the seconds and the cost per row-resample-arm, so growth with rows is visible. On
2 shared cores the figures move with the machine's load (printed).

Usage::

    python tools/bench_ab.py                          # 100k, 300k, 1M rows; 1,000 resamples; 3 arms
    python tools/bench_ab.py --rows 1000000 --resamples 1000 --threads 2
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--arms", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"[bench_ab] {args.arms} arms, {args.resamples} resamples, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    for n in args.rows:
        rng = np.random.default_rng(0)
        y = rng.random(n) < 0.3
        scores = np.stack([y * (1 + 0.1 * a) + rng.normal(size=n) for a in range(args.arms)])
        scores[-1] = np.round(scores[-1], 2)  # ties
        t0 = time.perf_counter()
        out = paired_bootstrap(y, scores, resamples=args.resamples)
        seconds = time.perf_counter() - t0
        per = seconds / (n * args.resamples * args.arms) * 1e9
        d = out.deltas[0]["auc"]
        print(f"[bench_ab] rows={n:>9,}  {seconds:6.2f} s  ({per:.2f} ns per row x resample x arm)  "
              f"delta auc arm1 {d:+.4f} ({out.low[0]['auc']:+.4f}..{out.high[0]['auc']:+.4f})  "
              f"load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
