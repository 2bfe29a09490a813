"""Model quality checks on synthetic data with a known oracle (and on the Criteo 10k sample).

1. ``parity``: one epoch of DeepFM trained by ``recemb.train.loop.train`` (fused FBGEMM tables,
   row-wise Adagrad) against the plain-PyTorch baseline of ``tools/bench_train.py`` (one
   ``nn.Embedding`` per field, Adam over everything) on the same batches in the same order;
   compares test AUC. ``--grid`` also tries other fused settings.
2. ``oracle``: DeepFM and DCNv2 trained by ``train`` (early stopping on valid AUC) against the
   planted model: ``(auc - 0.5) / (oracle_auc - 0.5)`` on the test split, with the oracle
   computed on the very test rows (the prepared split is re-derived from the row hash).
3. ``criteo``: every model on ``../shared/data/criteo-10k.txt`` when it exists (tiny; reported only).
4. ``bound``: what is learnable from these rows at all. The oracle's ``p`` uses latents no
   model sees, and 1M rows leave many planted effects poorly estimated, so the oracle AUC
   is not reachable. Reported on the same test split: the *observable* oracle
   ``E[p | observed row]`` (``observable_oracle_p``: dense latents integrated over what their
   floored counts leave open) and a *structured fit*: the planted model's exact form
   (effects of head ids, the planted pairs' rank-r factors, a value per count of the signal
   dense fields) fitted on the train split with Gaussian priors at the planted scales,
   early-stopped on valid. It knows which ids, pairs and fields matter, which no generic
   model does, so its AUC is an optimistic estimate of the best achievable from these rows.

Each training run is a fresh subprocess (``train`` starts a process group). Results go to
``bench-out/bench_quality.json``.

Usage::

    python tools/bench_quality.py                      # all parts, current defaults
    python tools/bench_quality.py --parts parity --grid
    python tools/bench_quality.py --parts bound        # learnable bound only (no training runs)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

OUT = REPO / "bench-out"
RUNS = OUT / "quality-runs"
CRITEO = REPO.parent / "shared" / "data" / "criteo-10k.txt"
MIN_COUNT = 2  # configs/datasets/synthetic_ctr.yaml as shipped
TARGET_RATIO = 0.97

# Fused settings tried for parity (None = the current defaults); keys are dotted config paths.
GRID: list[dict[str, Any]] = [
    {},
    {"embedding.init_std": 1e-4},
    {"embedding.init_std": 0.01},
    {"embedding.lr": 0.01},
    {"embedding.lr": 0.1},
    {"embedding.init_std": 0.01, "embedding.lr": 0.02},
    {"train.dense_lr": 2e-3},
]


# ----------------------------------------------------------------------------- children


def _set(cfg: Any, key: str, value: Any) -> None:
    node = cfg
    parts = key.split(".")
    for p in parts[:-1]:
        node = getattr(node, p)
    if not hasattr(node, parts[-1]):
        raise SystemExit(f"unknown setting {key}")
    setattr(node, parts[-1], value)


def child_train(spec: dict[str, Any]) -> dict[str, Any]:
    """One ``recemb.train.loop.train`` run: experiment YAML + data dir + settings."""
    import logging

    logging.disable(logging.WARNING)
    from recemb.config.experiment import load_experiment
    from recemb.train.loop import train

    cfg = load_experiment(REPO / "configs/experiments" / f"{spec['model']}_synthetic_ctr.yaml")
    cfg.data_dir = spec["data_dir"]
    cfg.expid = spec["expid"]
    cfg.train.output_dir = str(RUNS)
    cfg.train.progress = False
    for k, v in spec.get("settings", {}).items():
        _set(cfg, k, v)
    result = train(cfg)
    return {"test": result.test, "best_valid": result.best_valid, "epochs_run": result.epochs_run,
            "steps": result.steps, "samples_per_s": result.samples_per_s, "seconds": result.seconds,
            "history": [{k: h[k] for k in ("auc", "logloss", "epoch", "step") if k in h} for h in result.history]}


def child_plain(spec: dict[str, Any]) -> dict[str, Any]:
    """The plain baseline, fed exactly the batches ``train`` would feed (same order, size)."""
    import torch
    from bench_train import PlainDeepFM, dense_ids
    from torch import nn

    from recemb.config.experiment import TrainConfig
    from recemb.data.batch import ParquetBatches, split_rows
    from recemb.data.schema import FeatureMap
    from recemb.eval.metrics import MetricAccumulator
    from recemb.train.loop import resolved_batch_size, seed_everything

    tc = TrainConfig(seed=int(spec.get("seed", 0)))
    seed_everything(tc.seed)
    root = Path(spec["data_dir"])
    fm = FeatureMap.load(root / "feature_map.json")
    batch_size = resolved_batch_size(tc, split_rows(fm, root, "train"))  # the batch train() picks
    vocab = [fm.feature(f).num_embeddings for f in fm.sparse_features]
    model = PlainDeepFM(vocab, len(fm.dense_features), init_std=spec.get("init_std", 1e-4))
    opt = torch.optim.Adam(model.parameters(), lr=spec.get("lr", 1e-3))
    t0 = time.perf_counter()
    samples = 0
    for epoch in range(spec.get("epochs", 1)):
        it = ParquetBatches(fm, "train", batch_size, root=root, shuffle_rows=tc.shuffle_rows,
                            seed=tc.seed, drop_last=True)
        it.set_epoch(epoch)
        for batch in it:
            loss = nn.functional.binary_cross_entropy_with_logits(model(dense_ids(batch), batch.dense), batch.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            samples += batch.batch_size
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {"samples_per_s": samples / seconds}
    model.eval()
    with torch.no_grad():
        for split in ("valid", "test"):
            acc = MetricAccumulator()
            for batch in ParquetBatches(fm, split, tc.eval_batch_size, root=root):
                acc.update(model(dense_ids(batch), batch.dense), batch.labels)
            out[split] = acc.compute()
    return out


JOBS = 1  # children run at once (--jobs); with more than one each gets one thread


def run_children(kind: str, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``specs`` as fresh subprocesses, ``JOBS`` at a time; results in order."""
    env = dict(os.environ)
    if JOBS > 1:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    results: list[dict[str, Any]] = [{} for _ in specs]
    pending = list(enumerate(specs))
    running: list[tuple[int, subprocess.Popen[str]]] = []
    while pending or running:
        while pending and len(running) < JOBS:
            i, spec = pending.pop(0)
            cmd = [sys.executable, __file__, "--child", spec.get("kind", kind), json.dumps(spec)]
            running.append((i, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                env=env)))
        i, proc = running.pop(0)
        out, err = proc.communicate()
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            results[i] = {"error": (err or out)[-2000:]}
        else:
            results[i] = json.loads(lines[-1][len("RESULT "):])
    return results


def run_child(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return run_children(kind, [spec])[0]


# ----------------------------------------------------------------------------- data + oracle


def oracle_on_test(rows: int, data_dir: Path) -> dict[str, Any]:
    """Oracle AUC over all rows (generator report) and over the prepared test split.

    The split of a row is ``row_uniform(file 0, line, seed)`` (lines count from 1); the test
    rows' labels are checked against the prepared test shards before the oracle is trusted.
    """
    import numpy as np
    import pyarrow.parquet as pq
    from bench_train import synth_tsv

    from recemb.data.hashing import row_uniform
    from recemb.data.schema import FeatureMap
    from recemb.data.synthetic import roc_auc

    tsv = synth_tsv(rows)
    report = json.loads(Path(f"{tsv}.json").read_text())
    p = pq.read_table(f"{tsv}.oracle.parquet").column("p").to_numpy()
    import pyarrow.csv as pacsv

    labels = pacsv.read_csv(tsv, read_options=pacsv.ReadOptions(column_names=["label"] + [f"x{i}" for i in range(39)]),
                            parse_options=pacsv.ParseOptions(delimiter="\t"),
                            convert_options=pacsv.ConvertOptions(include_columns=["label"])).column("label").to_numpy()
    fm = FeatureMap.load(data_dir / "feature_map.json")
    split_cfg = json.loads((data_dir / "stats.json").read_text()) if (data_dir / "stats.json").exists() else {}
    u = row_uniform(0, np.arange(1, len(p) + 1), 0)
    test = u >= 0.9
    prepared_labels = np.concatenate([pq.read_table(data_dir / f, columns=[fm.label]).column(0).to_numpy()
                                      for f in fm.shards["test"]])
    matches = len(prepared_labels) == int(test.sum()) and bool((prepared_labels == labels[test]).all())
    out = {"oracle_auc_all": report["oracle_auc"], "test_rows": int(test.sum()), "split_verified": matches,
           "rows_out": split_cfg.get("rows_out")}
    out["oracle_auc_test"] = float(roc_auc(p[test], labels[test])) if matches else None
    return out


def prepare_criteo() -> Path | None:
    from recemb.data.preprocess import prepare_dataset
    from recemb.data.schema import load_dataset_config

    if not CRITEO.exists():
        return None
    out = OUT / "data" / "criteo10k"
    if not (out / "feature_map.json").exists():
        cfg = load_dataset_config(REPO / "configs/datasets/criteo.yaml", {"paths": [str(CRITEO)]})
        prepare_dataset(cfg, out, overwrite=True)
    return out


# ----------------------------------------------------------------------------- parts


def part_parity(data_dir: Path, grid: list[dict[str, Any]], with_plain: bool = True) -> dict[str, Any]:
    specs = [{"kind": "plain", "data_dir": str(data_dir)}] if with_plain else []
    specs += [{"kind": "train", "model": "deepfm", "data_dir": str(data_dir), "expid": f"parity_{i}",
               "settings": {**settings, "train.epochs": 1}} for i, settings in enumerate(grid)]
    results = run_children("train", specs)
    plain = results.pop(0) if with_plain else {}
    if with_plain:
        print(f"plain  test auc={plain.get('test', {}).get('auc', float('nan')):.5f} "
              f"({plain.get('samples_per_s', 0):,.0f} samples/s)", flush=True)
    for r, settings in zip(results, grid, strict=True):
        r["settings"] = settings or "defaults"
        print(f"fused {settings or 'defaults'} test auc={r.get('test', {}).get('auc', float('nan')):.5f} "
              f"({r.get('samples_per_s', 0):,.0f} samples/s)", flush=True)
    return {"plain": plain, "fused": results}


def part_oracle(data_dir: Path, rows: int, epochs: int) -> dict[str, Any]:
    oracle = oracle_on_test(rows, data_dir)
    ref = oracle["oracle_auc_test"] or oracle["oracle_auc_all"]
    out: dict[str, Any] = {"oracle": oracle, "models": {}}
    models = ("deepfm", "dcnv2")
    specs = [{"model": m, "data_dir": str(data_dir), "expid": f"oracle_{m}", "settings": {"train.epochs": epochs}}
             for m in models]
    for model, r in zip(models, run_children("train", specs), strict=True):
        if "test" in r:
            r["ratio"] = (r["test"]["auc"] - 0.5) / (ref - 0.5)
        out["models"][model] = r
        print(f"{model} test auc={r.get('test', {}).get('auc', float('nan')):.5f} "
              f"ratio={r.get('ratio', float('nan')):.4f} epochs_run={r.get('epochs_run')}", flush=True)
    return out


def part_bound(rows: int, seed: int = 0, max_epochs: int = 15, patience: int = 3) -> dict[str, Any]:
    """Latent oracle, observable oracle and structured-fit AUC on the prepared test split (see ``bound``)."""
    import numpy as np
    import torch

    from recemb.data.hashing import row_uniform
    from recemb.data.synthetic import (
        CtrSynthConfig,
        binary_logloss,
        build_planted_model,
        iter_ctr_chunks,
        observable_oracle_p,
        roc_auc,
    )

    t0 = time.perf_counter()
    cfg = CtrSynthConfig(rows=rows, seed=seed)
    planted = build_planted_model(cfg)
    head = np.asarray(planted.head_sizes)
    signal_dense = np.flatnonzero(planted.dense_beta)
    max_count = 400  # counts above share a slot (their latents are far in the tail)
    slots, cslots, p, q, y = [], [], [], [], []
    for chunk in iter_ctr_chunks(cfg, planted):
        ids, missing = chunk["ids"], chunk["sparse_missing"]
        slots.append(np.where((ids < head) & ~missing, ids, head))  # tail and missing ids: the zero slot
        counts = np.minimum(chunk["counts"][:, signal_dense], max_count)
        cslots.append(np.where(chunk["dense_missing"][:, signal_dense], max_count + 1, counts))
        p.append(chunk["p"])
        q.append(observable_oracle_p(planted, chunk))
        y.append(chunk["label"])
    slot, cslot = torch.from_numpy(np.concatenate(slots)), torch.from_numpy(np.concatenate(cslots))
    p_all, q_all, y_all = np.concatenate(p), np.concatenate(q), np.concatenate(y)
    u = row_uniform(0, np.arange(1, rows + 1), 0)  # configs/datasets/synthetic_ctr.yaml: 0.8 / 0.1 / 0.1, seed 0
    split = np.where(u < 0.8, 0, np.where(u < 0.9, 1, 2))
    test = split == 2
    out: dict[str, Any] = {
        "oracle_auc_test": roc_auc(p_all[test], y_all[test]),
        "observable_auc_test": roc_auc(q_all[test], y_all[test]),
        "observable_logloss_test": binary_logloss(q_all[test], y_all[test]),
    }

    fields = [f for f in range(len(head)) if head[f]]
    stds = {f: float(np.std(planted.effects[f])) or 1.0 for f in fields}
    rank = cfg.interaction_rank
    pair_std = math.sqrt(cfg.interaction_std) * rank**-0.25  # the generator's factor entry std

    class Structured(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.effects = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(head[f] + 1)) for f in fields])
            self.u = torch.nn.ParameterList([torch.nn.Parameter(0.01 * torch.randn(head[a] + 1, rank))
                                             for a, _ in planted.pairs])
            self.v = torch.nn.ParameterList([torch.nn.Parameter(0.01 * torch.randn(head[b] + 1, rank))
                                             for _, b in planted.pairs])
            self.dense = torch.nn.Parameter(torch.zeros(len(signal_dense), max_count + 2))
            self.bias = torch.nn.Parameter(torch.tensor(float(planted.bias)))

        def forward(self, s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            z = self.bias + sum(e[s[:, f]] for e, f in zip(self.effects, fields, strict=True))
            for (a, b), u_, v_ in zip(planted.pairs, self.u, self.v, strict=True):
                z = z + (u_[s[:, a]] * v_[s[:, b]]).sum(1)
            return z + sum(self.dense[j][c[:, j]] for j in range(len(signal_dense)))

        def prior(self) -> torch.Tensor:
            # Gaussian priors at the planted scales; the zero slot is held at 0; counts vary smoothly.
            r = sum((e[:-1] ** 2).sum() / (2 * stds[f] ** 2) + 1e3 * e[-1] ** 2
                    for e, f in zip(self.effects, fields, strict=True))
            r = r + sum((u_**2).sum() + (v_**2).sum() for u_, v_ in zip(self.u, self.v, strict=True)) / (2 * pair_std**2)
            counts = self.dense[:, : max_count + 1]  # the missing slot (last) is its own value
            return r + 50.0 * (counts[:, 1:] - counts[:, :-1]).pow(2).sum()

    torch.manual_seed(seed)
    model = Structured()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    train_rows = np.flatnonzero(split == 0)
    labels = torch.from_numpy(y_all).float()

    def scores(mask: np.ndarray) -> np.ndarray:
        idx = torch.from_numpy(np.flatnonzero(mask))
        with torch.no_grad():
            return model(slot[idx], cslot[idx]).numpy()

    best: dict[str, Any] = {"valid_auc": -1.0}
    history = []
    for epoch in range(max_epochs):
        order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(train_rows))
        for i in range(0, len(order), 32768):
            b = order[i : i + 32768]
            loss = nn_bce(model(slot[b], cslot[b]), labels[b]) + model.prior() / len(train_rows)
            opt.zero_grad()
            loss.backward()
            opt.step()
        valid_auc = roc_auc(scores(split == 1), y_all[split == 1])
        history.append(round(valid_auc, 5))
        if valid_auc > best["valid_auc"]:
            z = scores(test)
            best = {"valid_auc": valid_auc, "epoch": epoch, "test_auc": roc_auc(z, y_all[test]),
                    "test_logloss": binary_logloss(1.0 / (1.0 + np.exp(-z)), y_all[test])}
        elif epoch - best["epoch"] >= patience:
            break
    out["structured_fit"] = {**best, "valid_history": history, "train_rows": len(train_rows)}
    ref = out["oracle_auc_test"]
    for key, auc in (("observable", out["observable_auc_test"]), ("structured_fit", best["test_auc"])):
        out[f"{key}_ratio"] = (auc - 0.5) / (ref - 0.5)
    out["seconds"] = time.perf_counter() - t0
    print(f"bound: oracle {ref:.5f}, observable {out['observable_auc_test']:.5f} "
          f"(ratio {out['observable_ratio']:.3f}), structured fit {best['test_auc']:.5f} "
          f"(ratio {out['structured_fit_ratio']:.3f}, best epoch {best['epoch']})", flush=True)
    return out


def nn_bce(logits: Any, labels: Any) -> Any:
    import torch

    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)


def part_criteo(epochs: int) -> dict[str, Any]:
    data_dir = prepare_criteo()
    if data_dir is None:
        return {"skipped": f"{CRITEO} not found"}
    out: dict[str, Any] = {}
    models = ("lr", "fm", "deepfm", "dcnv2", "dlrm", "wdl")
    specs = [{"model": m, "data_dir": str(data_dir), "expid": f"criteo_{m}",
              "settings": {"train.epochs": epochs, "train.batch_size": 256, "train.eval_batch_size": 4096}}
             for m in models]
    for model, r in zip(models, run_children("train", specs), strict=True):
        out[model] = r
        t = r.get("test", {})
        print(f"criteo {model} test auc={t.get('auc', float('nan')):.5f} logloss={t.get('logloss', float('nan')):.5f}",
              flush=True)
    return out


def print_tables(res: dict[str, Any]) -> None:
    if "parity" in res:
        p = res["parity"]
        print("\n== parity (1 epoch, test split)")
        print(f"{'run':<50} {'test_auc':>9} {'logloss':>8} {'samples/s':>10}")
        t = p["plain"].get("test", {})
        print(f"{'plain nn.Embedding + Adam(lr 1e-3, init std 1e-4)':<50} {t.get('auc', 0):>9.5f} "
              f"{t.get('logloss', 0):>8.5f} {p['plain'].get('samples_per_s', 0):>10,.0f}")
        for r in p["fused"]:
            t = r.get("test", {})
            print(f"{'fused ' + json.dumps(r['settings']):<50} {t.get('auc', 0):>9.5f} {t.get('logloss', 0):>8.5f} "
                  f"{r.get('samples_per_s', 0):>10,.0f}")
    if "oracle" in res:
        o = res["oracle"]
        print(f"\n== oracle: all rows {o['oracle']['oracle_auc_all']:.5f}, test rows "
              f"{o['oracle']['oracle_auc_test']} (split verified: {o['oracle']['split_verified']})")
        for m, r in o["models"].items():
            t = r.get("test", {})
            print(f"{m:<8} test auc={t.get('auc', 0):.5f} logloss={t.get('logloss', 0):.5f} "
                  f"ratio={r.get('ratio', 0):.4f} (target {TARGET_RATIO}) epochs_run={r.get('epochs_run')}")
    if "bound" in res:
        b = res["bound"]
        fit = b["structured_fit"]
        print(f"\n== what is learnable (test split): oracle {b['oracle_auc_test']:.5f}; observable oracle "
              f"{b['observable_auc_test']:.5f} (ratio {b['observable_ratio']:.3f}); structured fit on "
              f"{fit['train_rows']:,} train rows {fit['test_auc']:.5f} (ratio {b['structured_fit_ratio']:.3f})")
        bound_lift = fit["test_auc"] - 0.5
        for m, r in res.get("oracle", {}).get("models", {}).items():
            if "test" in r:
                print(f"{m:<8} test auc={r['test']['auc']:.5f}: {(r['test']['auc'] - 0.5) / bound_lift:.3f} "
                      "of the structured fit's lift above 0.5")
    if "criteo" in res and "skipped" not in res["criteo"]:
        print("\n== criteo-10k (test split)")
        for m, r in res["criteo"].items():
            t = r.get("test", {})
            print(f"{m:<8} auc={t.get('auc', 0):.5f} logloss={t.get('logloss', 0):.5f} epochs_run={r.get('epochs_run')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--parts", nargs="+", default=["parity", "oracle", "criteo", "bound"],
                    choices=["parity", "oracle", "criteo", "bound"])
    ap.add_argument("--grid", action="store_true", help="parity: also try the GRID of fused settings")
    ap.add_argument("--try", dest="try_settings", nargs="+", help='parity: fused settings as JSON, e.g. '
                    '\'{"embedding.lr": 0.02}\' (replaces the grid)')
    ap.add_argument("--no-plain", action="store_true", help="parity: skip the plain baseline")
    ap.add_argument("--jobs", type=int, default=1, help="training subprocesses at once (one thread each)")
    ap.add_argument("--epochs", type=int, default=4, help="max epochs of the oracle runs (early stopping)")
    ap.add_argument("--criteo-epochs", type=int, default=5)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(OUT / "bench_quality.json"))
    args = ap.parse_args()
    if args.child:
        kind, spec = args.child[0], json.loads(args.child[1])
        result = child_train(spec) if kind == "train" else child_plain(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return
    from bench_train import prepared

    global JOBS
    JOBS = args.jobs
    data_dir = prepared(args.rows, MIN_COUNT)
    res: dict[str, Any] = {"data_dir": str(data_dir)}
    out = Path(args.out)
    if out.exists():  # keep the parts not re-run
        res = {**json.loads(out.read_text()), **res}
    if "parity" in args.parts:
        grid = GRID if args.grid else [{}]
        if args.try_settings:
            grid = [json.loads(t) for t in args.try_settings]
        parity = part_parity(data_dir, grid, with_plain=not args.no_plain)
        if args.no_plain and "parity" in res:  # keep the earlier baseline
            parity["plain"] = res["parity"].get("plain", {})
        res["parity"] = parity
    if "oracle" in args.parts:
        res["oracle"] = part_oracle(data_dir, args.rows, args.epochs)
    if "criteo" in args.parts:
        res["criteo"] = part_criteo(args.criteo_epochs)
    if "bound" in args.parts:
        res["bound"] = part_bound(args.rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print_tables(res)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
