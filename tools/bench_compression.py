"""AUC against bytes for every embedding variant at budgets of 1/10, 1/100, 1/1000 of the full tables.

Every run trains the same model (DCNv2: it has no first-order tables, so the
embedding bytes are the variant's bytes alone) on the same prepared data and
split with ``recemb.train.loop.train``, in a fresh subprocess, and records the
achieved bytes (from the built layer, never the target), test AUC and logloss,
training samples/s and the inference lookup latency of the embedding layer
alone (a batch of 4096 test rows, unsharded, eval mode, median of repeats).

Outputs under ``bench-out/compression/<dataset>/``: one JSON per run (reused on
the next call unless ``--fresh``), ``results.json``, ``results.md`` (the
table, Pareto-optimal runs marked) and ``auc_vs_bytes.png``.

Usage::

    python tools/bench_compression.py                             # 1M-row synthetic, every variant
    python tools/bench_compression.py --variants full hashed unified --budgets 0.01
    python tools/bench_compression.py --dataset criteo            # ../shared/data/criteo-10k.txt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

OUT = REPO / "bench-out" / "compression"
BUDGETS = [0.1, 0.01, 0.001]

# name -> (embedding.kind, embedding.params, whether the variant takes a budget)
VARIANTS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "full": ("full", {}, False),
    "hashed": ("hashed", {}, True),
    "qr": ("qr", {"op": "mult"}, True),
    "unified": ("unified", {}, True),
    "tt": ("tt", {}, True),
    "dhe": ("dhe", {}, True),
    "robe": ("robe", {}, True),
    "mde": ("mde", {"alpha": 0.3, "blocks": 4}, True),
    "hybrid": ("hybrid", {}, True),
    "lowprec": ("lowprec", {}, False),
}
DATASETS = {
    "synthetic": {"model": "dcnv2", "settings": {"train.epochs": 1}},
    "criteo": {"model": "dcnv2", "settings": {"train.epochs": 3, "train.batch_size": 256,
                                              "train.eval_batch_size": 4096}},
}


# ----------------------------------------------------------------------------- child side


def _set(cfg: Any, key: str, value: Any) -> None:
    node = cfg
    parts = key.split(".")
    for p in parts[:-1]:
        node = getattr(node, p)
    if not hasattr(node, parts[-1]):
        raise SystemExit(f"unknown setting {key}")
    setattr(node, parts[-1], value)


def lookup_latency(cfg: Any, repeats: int = 20) -> float:
    """Median seconds of one forward of the (unsharded, eval-mode) embedding layer on 4096 test rows."""
    import torch

    from recemb.data.batch import ParquetBatches
    from recemb.data.schema import FeatureMap
    from recemb.embeddings.registry import build_embedding_layer

    fm = FeatureMap.load(Path(cfg.data_dir) / "feature_map.json")
    layer = build_embedding_layer(fm, cfg.embedding).eval()
    batch = next(iter(ParquetBatches(fm, "test", 4096, root=Path(cfg.data_dir))))
    times = []
    with torch.no_grad():
        for _ in range(repeats + 3):
            t0 = time.perf_counter()
            layer(batch.sparse)
            times.append(time.perf_counter() - t0)
    return float(sorted(times[3:])[len(times[3:]) // 2])


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run of ``spec`` (model, data, embedding kind/budget/params, settings)."""
    import logging

    logging.disable(logging.WARNING)
    from recemb.config.experiment import load_experiment
    from recemb.train.loop import train

    cfg = load_experiment(REPO / "configs/experiments" / f"{spec['model']}_synthetic_ctr.yaml")
    cfg.data_dir = spec["data_dir"]
    cfg.expid = spec["expid"]
    cfg.train.output_dir = str(OUT / "runs")
    cfg.train.progress = False
    cfg.embedding.kind = spec["kind"]
    cfg.embedding.budget = spec["budget"]
    cfg.embedding.params = spec["params"]
    for k, v in spec.get("settings", {}).items():
        _set(cfg, k, v)
    result = train(cfg)
    return {
        "test": result.test, "best_valid": result.best_valid, "samples_per_s": result.samples_per_s,
        "embedding_bytes": result.embedding_bytes, "full_bytes": result.full_bytes,
        "seconds": result.seconds, "steps": result.steps, "lookup_s": lookup_latency(cfg),
    }


# ----------------------------------------------------------------------------- parent side


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """``child(spec)`` in a fresh process (``train`` owns a process group)."""
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr or proc.stdout)[-3000:]}
    return json.loads(lines[-1][len("RESULT "):])


def pareto(rows: list[dict[str, Any]]) -> set[str]:
    """Names of runs no other run beats on both bytes (fewer) and AUC (higher)."""
    ok = [r for r in rows if "auc" in r]
    front = set()
    for r in ok:
        dominated = any(
            o["bytes"] <= r["bytes"] and o["auc"] >= r["auc"] and (o["bytes"] < r["bytes"] or o["auc"] > r["auc"])
            for o in ok
        )
        if not dominated:
            front.add(r["run"])
    return front


def table(rows: list[dict[str, Any]], front: set[str], header: str) -> str:
    lines = [header, "", "| variant | budget | achieved bytes | ratio to full | test AUC | logloss | "
             "train samples/s | lookup ms (4096 rows) | Pareto |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['budget']} | error: {r['error'].splitlines()[-1][:80]} "
                         "| | | | | | |")
            continue
        lines.append(
            f"| {r['variant']} | {r['budget']} | {r['bytes']:,} | {r['ratio']:.4f} | {r['auc']:.5f} | "
            f"{r['logloss']:.5f} | {r['samples_per_s']:,.0f} | {1000 * r['lookup_s']:.2f} | "
            f"{'*' if r['run'] in front else ''} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], front: set[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    ok = [r for r in rows if "auc" in r]
    for variant in dict.fromkeys(r["variant"] for r in ok):
        pts = sorted((r["bytes"], r["auc"]) for r in ok if r["variant"] == variant)
        marker = "*" if variant == "full" else "o"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, markersize=12 if marker == "*" else 6,
                label=variant)
    fr = sorted((r["bytes"], r["auc"]) for r in ok if r["run"] in front)
    ax.plot([p[0] for p in fr], [p[1] for p in fr], color="black", linestyle=":", linewidth=1, label="Pareto front")
    ax.scatter([p[0] for p in fr], [p[1] for p in fr], s=120, facecolors="none", edgecolors="black")
    ax.set_xscale("log")
    ax.set_xlabel("embedding bytes (achieved)")
    ax.set_ylabel("test AUC")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="synthetic")
    ap.add_argument("--rows", type=int, default=1_000_000, help="synthetic rows (generated and prepared once)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    ap.add_argument("--fresh", action="store_true", help="re-run even when a result file exists")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return

    ds = DATASETS[args.dataset]
    header = ""
    if args.dataset == "synthetic":
        from bench_quality import oracle_on_test
        from bench_train import prepared

        data_dir = prepared(args.rows, 2)
        oracle = oracle_on_test(args.rows, data_dir)
        header = (f"Synthetic CTR, {args.rows:,} rows (min_count 2), model {ds['model']}, "
                  f"oracle test AUC {oracle['oracle_auc_test'] or oracle['oracle_auc_all']:.5f}")
    else:
        from bench_quality import prepare_criteo

        found = prepare_criteo()
        if found is None:
            print("criteo-10k.txt not found: skipped")
            return
        data_dir = found
        header = f"criteo-10k.txt, model {ds['model']}"
    out = OUT / args.dataset
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for variant in args.variants:
        kind, params, takes_budget = VARIANTS[variant]
        for budget in (args.budgets if takes_budget else [None]):
            name = f"{variant}@{budget}" if budget is not None else variant
            path = out / f"{name}.json"
            if path.exists() and not args.fresh:
                res = json.loads(path.read_text())
            else:
                spec = {"model": ds["model"], "data_dir": str(data_dir), "expid": f"cmp_{args.dataset}_{name}",
                        "kind": kind, "budget": budget, "params": params, "settings": ds["settings"]}
                t0 = time.perf_counter()
                res = run(spec)
                res["wall_s"] = time.perf_counter() - t0
                if "error" not in res:
                    path.write_text(json.dumps(res, indent=1))
            row: dict[str, Any] = {"run": name, "variant": variant, "budget": budget if budget is not None else "-"}
            if "error" in res:
                row["error"] = res["error"]
                print(f"{name}: ERROR {res['error'].splitlines()[-1] if res['error'] else ''}", flush=True)
            else:
                row.update(bytes=res["embedding_bytes"], ratio=res["embedding_bytes"] / res["full_bytes"],
                           auc=res["test"]["auc"], logloss=res["test"]["logloss"],
                           samples_per_s=res["samples_per_s"], lookup_s=res["lookup_s"])
                print(f"{name}: bytes={row['bytes']:,} ratio={row['ratio']:.4f} auc={row['auc']:.5f} "
                      f"logloss={row['logloss']:.5f} {row['samples_per_s']:,.0f} samples/s "
                      f"lookup {1000 * row['lookup_s']:.2f} ms", flush=True)
            rows.append(row)
    # Merge with earlier runs of variants not requested this time, so the table stays whole.
    done = {r["run"] for r in rows}
    for path in sorted(out.glob("*.json")):
        if path.stem in done or path.name == "results.json":
            continue
        res = json.loads(path.read_text())
        variant, _, budget = path.stem.partition("@")
        if variant in VARIANTS:
            rows.append({"run": path.stem, "variant": variant, "budget": float(budget) if budget else "-",
                         "bytes": res["embedding_bytes"], "ratio": res["embedding_bytes"] / res["full_bytes"],
                         "auc": res["test"]["auc"], "logloss": res["test"]["logloss"],
                         "samples_per_s": res["samples_per_s"], "lookup_s": res["lookup_s"]})
    order = list(VARIANTS)
    rows.sort(key=lambda r: (order.index(r["variant"]), -(r["budget"] if isinstance(r["budget"], float) else 1.0)))
    front = pareto(rows)
    md = table(rows, front, header)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    plot(rows, front, out / "auc_vs_bytes.png", header)
    print("\n" + md)
    print(f"wrote {out / 'results.md'} and {out / 'auc_vs_bytes.png'}")


if __name__ == "__main__":
    main()
