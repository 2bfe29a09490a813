"""APE side by side with three baselines on the same split: test ROC AUC / AP and training speed.

On ``recemb synth events`` data (generated and prepared under ``--out``) and on
``../shared/data/ids2017`` (train.csv with its counts; test.csv, label -1 = attack; skipped with
a message when absent), each seed runs:

- ``ape``: ``recemb.train.loop.train`` with the existing config (``ape_synthetic_events.yaml``,
  ``ape_ids2017.yaml``) on our embedding layer;
- ``frequency``: per-entity frequency baseline, score = sum over types of ``-log`` the add-one
  smoothed unigram probability from the count-weighted training split (deterministic);
- ``iforest``: scikit-learn's Isolation Forest on one-hot features (training rows weighted by count;
  scikit-learn is a benchmark-only dependency);
- ``plain``: a plain-PyTorch APE (``nn.Embedding`` per type + Adam, the same maths:
  ``S(e) = sum_{i<j} softplus(r_ij) <v_i, v_j>`` (+ unary terms when the config has them),
  context-dependent noise with ``k`` unigram draws per event, logistic loss on ``S - log(k P_noise)``,
  every noise event scored in full) as the speed baseline.

All four score the same prepared training split and the same labelled test split; ROC AUC and AP
(anomaly positive) come from ``recemb.eval.metrics``. Events/s is training rows per second
(``TrainResult.samples_per_s`` for ours; epoch time only for the plain one).

Usage::

    python tools/bench_anomaly.py                                  # 2 seeds, the configs' epochs, 100k synthetic events
    python tools/bench_anomaly.py --seeds 1 --epochs 2 --threads 2
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.nn import functional as F

from recemb.eval.metrics import anomaly_metrics
from recemb.models.anomaly.frequency import frequency_scores, type_counts

REPO = Path(__file__).resolve().parents[1]
IDS2017 = REPO.parent / "shared" / "data" / "ids2017"
UNSEEN_COUNT = 0.5  # as recemb.models.anomaly.noise: an id without training count in log P


def prepare(name: str, train_csv: Path, test_csv: Path, out: Path) -> Path:
    """Prepare ``configs/datasets/{name}.yaml``'s given splits (``train_csv``, labelled ``test_csv``) into ``out``."""
    from recemb.data.preprocess import prepare_dataset
    from recemb.data.schema import load_dataset_config

    if not (out / "feature_map.json").is_file():
        cfg = load_dataset_config(REPO / "configs" / "datasets" / f"{name}.yaml",
                                  {"split": {"files": {"train": [str(train_csv)], "test": [str(test_csv)]}},
                                   "output": str(out)})
        prepare_dataset(cfg, out)
    return out


def read_split(data: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[int]]:
    """Ids ``[N, F]``, counts ``[N]``, labels (or None) and the vocabulary sizes of a prepared split."""
    from recemb.data.schema import FeatureMap

    fm = FeatureMap.load(data)
    table = pq.read_table([str(fm.root / f) for f in fm.shards[split]]) if len(fm.shards[split]) > 1 else \
        pq.read_table(fm.root / fm.shards[split][0])
    names = fm.sparse_features
    ids = np.stack([table.column(n).to_numpy() for n in names], 1).astype(np.int64)
    counts = table.column("count").to_numpy().astype(np.float64) if "count" in table.column_names \
        else np.ones(len(ids))
    labels = table.column("label").to_numpy().astype(np.float64) if "label" in table.column_names else None
    return ids, counts, labels, [fm.feature(n).num_embeddings for n in names]


def metrics(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    m = anomaly_metrics(torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels))
    return m["auc"], m["ap"]


def iforest_scores(train: np.ndarray, counts: np.ndarray, sizes: list[int], test: np.ndarray,
                   seed: int) -> np.ndarray:
    from scipy import sparse
    from sklearn.ensemble import IsolationForest

    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])

    def onehot(ids: np.ndarray) -> sparse.csr_matrix:
        n, f = ids.shape
        cols = (ids + offsets).reshape(-1)
        rows = np.repeat(np.arange(n), f)
        return sparse.csr_matrix((np.ones(n * f, dtype=np.float32), (rows, cols)), shape=(n, int(sum(sizes))))

    forest = IsolationForest(n_estimators=100, random_state=seed)
    forest.fit(onehot(train), sample_weight=counts)
    return -forest.score_samples(onehot(test))


class PlainAPE(nn.Module):
    """APE in plain PyTorch: one ``nn.Embedding`` per type, every noise event scored in full."""

    def __init__(self, sizes: list[int], dim: int, noise_counts: list[np.ndarray], k: int, unary: bool,
                 init_std: float) -> None:
        super().__init__()
        n = len(sizes)
        self.k = k
        self.tables = nn.ModuleList(nn.Embedding(s, dim) for s in sizes)
        self.unary = nn.ModuleList(nn.Embedding(s, 1) for s in sizes) if unary else None
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, init_std)
        self.rows, self.cols = torch.triu_indices(n, n, 1)
        self.pair_raw = nn.Parameter(torch.full((len(self.rows),), math.log(math.expm1(1.0))))
        self.probs = [torch.as_tensor(c / c.sum(), dtype=torch.float32) for c in noise_counts]
        self.log_probs = [torch.log(torch.as_tensor(np.where(c > 0, c, UNSEEN_COUNT) / c.sum(),
                                                    dtype=torch.float32)) for c in noise_counts]

    def score(self, ids: torch.Tensor) -> torch.Tensor:
        """``S(e)`` of events ``[..., F]``."""
        v = torch.stack([tab(ids[..., t]) for t, tab in enumerate(self.tables)], -2)  # [..., F, d]
        s = ((v[..., self.rows, :] * v[..., self.cols, :]).sum(-1) * F.softplus(self.pair_raw)).sum(-1)
        if self.unary is not None:
            s = s + sum(tab(ids[..., t]).squeeze(-1) for t, tab in enumerate(self.unary))
        return s

    def loss(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        b, n = ids.shape
        types = torch.randint(n, (b,))
        noise = ids.unsqueeze(1).repeat(1, self.k, 1)  # [B, k, F]
        log_kp = torch.empty(b)
        log_kp_noise = torch.empty(b, self.k)
        for t in range(n):
            sel = torch.nonzero(types == t).reshape(-1)
            if not len(sel):
                continue
            draws = torch.multinomial(self.probs[t], len(sel) * self.k, replacement=True).view(-1, self.k)
            noise[sel, :, t] = draws
            log_kp[sel] = self.log_probs[t][ids[sel, t]]
            log_kp_noise[sel] = self.log_probs[t][draws]
        log_k = math.log(self.k)
        positive = self.score(ids) - (log_k + log_kp)
        negative = self.score(noise) - (log_k + log_kp_noise)
        losses = F.softplus(-positive) + F.softplus(negative).sum(-1)
        return (losses * weights).sum() / weights.sum()


def plain_ape(train: np.ndarray, counts: np.ndarray, sizes: list[int], test: np.ndarray, cfg, seed: int,
              epochs: int) -> tuple[np.ndarray, float]:
    """Train the plain APE with the experiment's dim, k, unary, batch size and epochs; Adam at lr 0.01."""
    torch.manual_seed(seed)
    params = cfg.model.params
    model = PlainAPE(sizes, cfg.embedding.dim, type_counts(train, counts, sizes), int(params.get("noise_samples", 5)),
                     bool(params.get("unary", False)), cfg.embedding.init_std)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, w = torch.as_tensor(train), torch.as_tensor(counts, dtype=torch.float32)
    bs = cfg.train.batch_size
    seconds = 0.0
    for _ in range(epochs):
        order = torch.randperm(len(x))
        start = time.perf_counter()
        for i in range(0, len(x), bs):
            idx = order[i:i + bs]
            opt.zero_grad()
            model.loss(x[idx], w[idx]).backward()
            opt.step()
        seconds += time.perf_counter() - start
    with torch.no_grad():
        scores = -model.score(torch.as_tensor(test)).numpy()
    return scores, len(x) * epochs / seconds


def ours(config: str, data: Path, out: Path, seed: int, epochs: int | None):
    from recemb.config.experiment import load_experiment
    from recemb.train.loop import train

    overrides = [f"data_dir={data}", f"train.output_dir={out / 'runs'}", "train.progress=false",
                 f"train.seed={seed}", f"expid={Path(config).stem}_s{seed}"]
    if epochs is not None:
        overrides += [f"train.epochs={epochs}", "train.patience=1000"]
    cfg = load_experiment(REPO / "configs" / "experiments" / config, overrides)
    return cfg, train(cfg)


def bench(name: str, config: str, data: Path, out: Path, seeds: int, epochs: int | None) -> list[tuple]:
    import torch.distributed as dist

    train_ids, train_counts, _, sizes = read_split(data, "train")
    test_ids, _, labels, _ = read_split(data, "test")
    assert labels is not None
    print(f"[{name}] train rows {len(train_ids):,} ({train_counts.sum():,.0f} events), test rows {len(test_ids):,} "
          f"({(labels == -1).mean():.1%} anomalies), types {sizes}", flush=True)
    rows = []
    freq = metrics(frequency_scores(train_ids, train_counts, sizes, test_ids), labels)
    for seed in range(seeds):
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        cfg, result = ours(config, data, out, seed, epochs)
        ep = result.epochs_run
        rows.append((name, seed, "ape (ours)", result.test["auc"], result.test["ap"], result.samples_per_s, ep))
        rows.append((name, seed, "frequency", *freq, math.nan, 0))
        t0 = time.perf_counter()
        rows.append((name, seed, "iforest", *metrics(iforest_scores(train_ids, train_counts, sizes, test_ids, seed),
                                                     labels), math.nan, 0))
        print(f"  iforest {time.perf_counter() - t0:.1f}s", flush=True)
        scores, eps = plain_ape(train_ids, train_counts, sizes, test_ids, cfg, seed, ep)
        rows.append((name, seed, "plain ape", *metrics(scores, labels), eps, ep))
        for r in rows[-4:]:
            print("  " + fmt(r), flush=True)
    return rows


def fmt(r: tuple) -> str:
    speed = f"{r[5]:>12,.0f}" if r[5] == r[5] else f"{'-':>12}"
    return f"{r[0]:<10} {r[1]:>4} {r[2]:<11} {r[3]:>7.4f} {r[4]:>7.4f} {speed} {r[6]:>6}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/anomaly"))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=0, help="epochs for both APEs (0: the configs' own)")
    parser.add_argument("--synth-events", type=int, default=100_000)
    parser.add_argument("--synth-test", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-synth", action="store_true")
    parser.add_argument("--skip-ids2017", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    out = args.out.resolve()
    epochs = args.epochs or None
    rows: list[tuple] = []
    start = time.perf_counter()
    if not args.skip_synth:
        from recemb.data.synthetic import EventSynthConfig, generate_events

        raw = out / "synthetic_raw"
        if not (raw / "test.csv").is_file():
            generate_events(EventSynthConfig(train_events=args.synth_events, test_events=args.synth_test, seed=0), raw)
        data = prepare("synthetic_events", raw / "train.csv", raw / "test.csv", out / "synthetic_events")
        rows += bench("synthetic", "ape_synthetic_events.yaml", data, out, args.seeds, epochs)
    if not args.skip_ids2017:
        if (IDS2017 / "train.csv").is_file() and (IDS2017 / "test.csv").is_file():
            data = prepare("ids2017", IDS2017 / "train.csv", IDS2017 / "test.csv", out / "ids2017")
            rows += bench("ids2017", "ape_ids2017.yaml", data, out, args.seeds, epochs)
        else:
            print(f"[ids2017] skipped: {IDS2017}/train.csv or test.csv is absent")
    print(f"\n{'data':<10} {'seed':>4} {'method':<11} {'auc':>7} {'ap':>7} {'events/s':>12} {'epochs':>6}")
    for r in rows:
        print(fmt(r))
    for name in sorted({r[0] for r in rows}):
        ours_speed = [r[5] for r in rows if r[0] == name and r[2] == "ape (ours)"]
        plain_speed = [r[5] for r in rows if r[0] == name and r[2] == "plain ape"]
        print(f"{name}: APE (ours) / plain-PyTorch APE training events/s = "
              f"{np.mean(ours_speed):,.0f} / {np.mean(plain_speed):,.0f} = "
              f"{np.mean(ours_speed) / np.mean(plain_speed):.2f}x (mean over seeds)")
        for method in ("ape (ours)", "frequency", "iforest", "plain ape"):
            sel = [r for r in rows if r[0] == name and r[2] == method]
            print(f"  {method:<11} mean auc {np.mean([r[3] for r in sel]):.4f}  ap {np.mean([r[4] for r in sel]):.4f}")
    print(f"total {time.perf_counter() - start:.0f}s on {args.threads} threads (load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
