"""AUC against bytes for every embedding variant at budgets of 1/10, 1/100, 1/1000 of the full tables.

Every run trains the same model (DCNv2: it has no first-order tables, so the
embedding bytes are the variant's bytes alone) on the same prepared data and
split with ``recemb.train.loop.train``, in a fresh subprocess, and records the
achieved bytes (from the built layer, never the target), test AUC and logloss,
training samples/s and the inference lookup latency of the embedding layer
alone (a batch of 4096 test rows, unsharded, eval mode, one thread, median of
repeats). ``--speed`` is the side-by-side speed pass: every variant's training
steps and lookups timed in one process with ``full`` as the baseline (ratios);
run it on a quiet machine (2 cores: another busy process makes OpenMP spin and
times grow tenfold).

Outputs under ``bench-out/compression/<dataset>/``: one JSON per run (reused on
the next call unless ``--fresh``), ``results.json``, ``results.md`` (the
table, Pareto-optimal runs marked) and ``auc_vs_bytes.png``.

Usage::

    python tools/bench_compression.py                             # 1M-row synthetic, every variant
    python tools/bench_compression.py --variants full hashed unified --budgets 0.01
    python tools/bench_compression.py --dataset criteo            # ../shared/data/criteo-10k.txt
    python tools/bench_compression.py --speed --lookup-only --budgets 0.01 --repeats 60   # lookups side by side
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from bench_quality import _set  # noqa: E402  (dotted config settings, shared with the quality benchmark)

from recemb.io import write_json_atomic  # noqa: E402

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
    # OptEmbed: supernet + evolutionary dim search + retrain on pruned tables (recemb search);
    # its bytes are whatever the search reaches. Settings: configs/experiments/optembed_synthetic_ctr.yaml.
    "optembed": ("search", {}, False),
    # Product quantization (codes + codebooks; 4-bit codes reach 1/100, nothing reaches 1/1000 at dim 16)
    # and sparse rows (CSR; the int32 row pointers alone are 1/16 of full at dim 16: 1/10 only).
    "dpq": ("dpq", {}, True),
    "mgqe": ("mgqe", {"hot_share": 0.1, "cold_centroids": 16}, True),
    "deeplight": ("deeplight", {}, True),
    "pep": ("pep", {"search_steps": 100, "threshold_init": -8.0, "threshold_lr": 0.01}, True),
    "dedup": ("dedup", {}, True),  # LSH-merged blocks + index: from 1/64 at dim 16 (1/10 only)
    "autodim": ("autodim", {"search_steps": 100, "arch_every": 2, "arch_lr": 0.01}, True),  # down to 1/16 (width 1)
    "autosrh": ("autosrh", {"search_steps": 100}, True),  # any budget: dims of rare groups go first, rows to zero
    "lowprec": ("lowprec", {"bits": 8}, False),
    "lowprec16": ("lowprec", {"bits": 16}, False),
    # Post-training row-wise quantisation of the trained ``full`` run's tables (no training of its own).
    "quant-fp16": ("quant", {"dtype": "fp16"}, False),
    "quant-int8": ("quant", {"dtype": "int8"}, False),
    "quant-int4": ("quant", {"dtype": "int4"}, False),
}
DATASETS = {
    "synthetic": {"model": "dcnv2", "settings": {"train.epochs": 1}},
    "criteo": {"model": "dcnv2", "settings": {"train.epochs": 3, "train.batch_size": 256,
                                              "train.eval_batch_size": 4096}},
}


# ----------------------------------------------------------------------------- child side


def lookup_latency(cfg: Any, repeats: int = 20) -> float:
    """Median seconds of one forward of the (unsharded, eval-mode) embedding layer on 4096 test rows."""
    import torch

    from recemb.data.batch import ParquetBatches
    from recemb.data.schema import FeatureMap
    from recemb.embeddings.registry import build_embedding_layer

    fm = FeatureMap.load(Path(cfg.data_dir) / "feature_map.json")
    layer = build_embedding_layer(fm, cfg.embedding).eval()
    batch = next(iter(ParquetBatches(fm, "test", 4096, root=Path(cfg.data_dir))))
    torch.set_num_threads(1)  # serving-style latency; also immune to OpenMP spinning on a busy machine
    times = []
    with torch.no_grad():
        for _ in range(repeats + 3):
            t0 = time.perf_counter()
            layer(batch.sparse)
            times.append(time.perf_counter() - t0)
    return float(sorted(times[3:])[len(times[3:]) // 2])


def quantized_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Test metrics and bytes of the trained ``full`` run with its tables quantised to ``dtype``."""
    import torch

    from recemb.data.batch import ParquetBatches
    from recemb.data.schema import FeatureMap
    from recemb.embeddings.quant import quantize_layer
    from recemb.train.loop import TrainModel, evaluate
    from recemb.train.restore import load_trained_model

    model, cfg = load_trained_model(OUT / "runs" / spec["from_expid"] / "checkpoints" / "best")
    full_layer = model.embedding
    model.embedding = quantize_layer(full_layer, spec["params"]["dtype"])
    fm = FeatureMap.load(Path(spec["data_dir"]) / "feature_map.json")
    test = evaluate(TrainModel(model), ParquetBatches(fm, "test", 16384, root=Path(spec["data_dir"])),
                    torch.device("cpu"))
    batch = next(iter(ParquetBatches(fm, "test", 4096, root=Path(spec["data_dir"]))))
    torch.set_num_threads(1)
    times = []
    with torch.no_grad():
        for _ in range(23):
            t0 = time.perf_counter()
            model.embedding(batch.sparse)
            times.append(time.perf_counter() - t0)
    return {"test": test, "samples_per_s": float("nan"), "embedding_bytes": model.embedding.parameter_bytes(),
            "full_bytes": full_layer.full_bytes(), "lookup_s": float(sorted(times[3:])[10])}


def run_folder(spec: dict[str, Any]) -> str:
    """The run's expid: the spec's name with ``@`` spelled ``_at_`` (an expid must be a safe file name; the
    spec keeps ``@`` so results cached under it stay valid)."""
    return spec["expid"].replace("@", "_at_")


def search_child(spec: dict[str, Any]) -> dict[str, Any]:
    """``recemb search`` (OptEmbed, three stages) on the data; the retrained model's metrics and bytes."""
    from pipelines.search import run_search
    from recemb.config.experiment import load_experiment

    cfg = load_experiment(REPO / "configs/experiments/optembed_synthetic_ctr.yaml")
    cfg.data_dir = spec["data_dir"]
    cfg.expid = run_folder(spec)
    cfg.train.output_dir = str(OUT / "runs")
    cfg.train.progress = False
    for k, v in spec.get("settings", {}).items():
        _set(cfg, k, v)
    summary = run_search(cfg, mlflow_uri=f"sqlite:///{OUT / 'mlruns.db'}")
    retrain = summary["retrain"]
    rcfg = load_experiment(REPO / "configs/experiments/optembed_synthetic_ctr.yaml")
    rcfg.data_dir = spec["data_dir"]
    rcfg.embedding.kind = "pruned"
    rcfg.embedding.params = {"path": str(OUT / "runs" / run_folder(spec) / "search" / "pruned")}
    return {"test": retrain["test"], "best_valid": retrain["best_valid"], "samples_per_s": float("nan"),
            "embedding_bytes": retrain["embedding_bytes"], "full_bytes": retrain["full_bytes"],
            "lookup_s": lookup_latency(rcfg), "search": {k: summary[k] for k in ("supernet", "search")}}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run of ``spec`` (model, data, embedding kind/budget/params, settings)."""
    import logging

    logging.disable(logging.WARNING)
    if spec["kind"] == "quant":
        return quantized_child(spec)
    if spec["kind"] == "speed":
        return speed_child(spec)
    if spec["kind"] == "search":
        return search_child(spec)
    from recemb.config.experiment import load_experiment
    from recemb.train.loop import train

    cfg = load_experiment(REPO / "configs/experiments" / f"{spec['model']}_synthetic_ctr.yaml")
    cfg.data_dir = spec["data_dir"]
    cfg.expid = run_folder(spec)
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


def speed_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Train-step samples/s and lookup latency of every run in ``spec["runs"]``, side by side in one process.

    Each run builds the model on meta, wraps it with ``shard_model`` (one gloo
    rank, fused tables) and times ``steps`` training steps (after ``warmup``) on
    the same pre-loaded batches (skipped with ``lookup_only``). Then every run's
    unsharded layer (eval, one thread) is timed in rounds, one forward of each run
    per round on the same batch, so a busy spell of the machine hits all runs alike:
    the median wall time and the median thread CPU time (what the forward itself
    ran, not time spent descheduled) over ``repeats`` rounds. Each forward gets a
    fresh KJT of the batch's tensors, so no run reuses what an earlier call cached
    on it. Ratios are taken against the ``full`` run of the same process.
    """
    import logging

    import torch

    logging.disable(logging.WARNING)
    from recemb.config.experiment import load_experiment
    from recemb.data.batch import ParquetBatches
    from recemb.data.schema import FeatureMap
    from recemb.embeddings.registry import build_embedding_layer
    from recemb.embeddings.sharding import ensure_process_group, shard_model, table_optimizer
    from recemb.errors import ConfigError
    from recemb.models.registry import build_model
    from recemb.train.loop import TrainModel, dense_optimizer

    root = Path(spec["data_dir"])
    fm = FeatureMap.load(root / "feature_map.json")
    need = spec["warmup"] + spec["steps"]
    loaded = list(itertools.islice(iter(ParquetBatches(fm, "train", 4096, root=root)), need))
    batches = [loaded[i % len(loaded)] for i in range(need)]  # small data: the same batches again
    ensure_process_group()
    out: dict[str, Any] = {}
    layers: dict[str, Any] = {}
    for run_name, kind, budget, params in spec["runs"]:
        cfg = load_experiment(REPO / "configs/experiments" / f"{spec['model']}_synthetic_ctr.yaml")
        cfg.embedding.kind, cfg.embedding.budget, cfg.embedding.params = kind, budget, params
        cfg.embedding.hash = spec.get("hash", "mulshift")
        torch.manual_seed(0)
        try:
            model = TrainModel(build_model(cfg.model, fm, cfg.embedding, device=torch.device("meta")),
                               embedding_l2=cfg.embedding.l2)
            layers[run_name] = build_embedding_layer(fm, cfg.embedding).eval()
        except ConfigError as exc:  # e.g. a budget below the variant's minimum on a small dataset
            out[run_name] = {"error": str(exc)}
            layers.pop(run_name, None)
            continue
        if spec.get("lookup_only"):
            out[run_name] = {"train_samples_per_s": float("nan")}
            continue
        dmp = shard_model(model, cfg.embedding, torch.device("cpu"), batch_size=4096).model
        opt, table_opt = dense_optimizer(dmp, cfg.train), table_optimizer(dmp, cfg.embedding)
        t0 = 0.0
        for i, batch in enumerate(batches):
            if i == spec["warmup"]:
                t0 = time.perf_counter()
            loss, _ = dmp(batch)
            opt.zero_grad()
            if table_opt is not None:
                table_opt.zero_grad()
            loss.backward()
            opt.step()
            if table_opt is not None:
                table_opt.step()
        train_sps = spec["steps"] * 4096 / (time.perf_counter() - t0)
        out[run_name] = {"train_samples_per_s": train_sps}
        print(f"speed {run_name}: {train_sps:,.0f} samples/s", file=sys.stderr, flush=True)
    for run_name, (wall, cpu) in lookup_times(layers, batches, spec.get("repeats", spec["steps"])).items():
        out[run_name].update(lookup_s=wall, lookup_cpu_s=cpu)
        print(f"lookup {run_name}: {1000 * wall:.2f} ms wall, {1000 * cpu:.2f} ms CPU", file=sys.stderr, flush=True)
    return out


def lookup_times(layers: dict[str, Any], batches: list[Any], repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, thread CPU) seconds of one no-grad forward per layer, one thread, in interleaved rounds
    (3 warm-up rounds first); every forward gets a fresh KJT of the batch's tensors and metadata."""
    import statistics

    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in layers}
    with torch.no_grad():
        for r in range(repeats + 3):
            sparse = batches[r % len(batches)].sparse
            for name, layer in layers.items():
                fresh = KeyedJaggedTensor(keys=sparse.keys(), values=sparse.values(), lengths=sparse.lengths(),
                                          stride=sparse.stride(), length_per_key=sparse.length_per_key(),
                                          offset_per_key=sparse.offset_per_key())
                w0, c0 = time.perf_counter(), time.thread_time()
                layer(fresh)
                if r >= 3:
                    times[name].append((time.perf_counter() - w0, time.thread_time() - c0))
    torch.set_num_threads(threads)
    return {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for name, t in times.items()}


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


def _speed(value: float) -> str:
    return "-" if value != value else f"{value:,.0f}"


def table(rows: list[dict[str, Any]], front: set[str], header: str) -> str:
    lines = [header, "", "Speed columns come from the side-by-side `--speed` pass when it has the run (marked s), "
             "else from the training run itself.", "",
             "| variant | budget | achieved bytes | ratio to full | test AUC | logloss | "
             "train samples/s | lookup ms (4096 rows, 1 thread) | Pareto |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['budget']} | {error_cell(r['error'])} | | | | | | |")
            continue
        lines.append(
            f"| {r['variant']} | {r['budget']} | {r['bytes']:,} | {r['ratio']:.4f} | {r['auc']:.5f} | "
            f"{r['logloss']:.5f} | {_speed(r['samples_per_s'])}{' s' if r.get('speed_pass') else ''} | "
            f"{1000 * r['lookup_s']:.2f}{' s' if r.get('speed_pass') else ''} | "
            f"{'*' if r['run'] in front else ''} |"
        )
    return "\n".join(lines) + "\n"


_FLOOR = re.compile(r"the smallest embedding\.budget this model \(\w+\) builds with is ([0-9.e-]+)")


def error_cell(error: str) -> str:
    """A failed run's table cell: a budget under the method's floor says so and names the
    floor (the solver's message ends with it); anything else shows its last line.

    Example:
        >>> error_cell("...over the budget; the smallest embedding.budget this model (dcnv2) builds with is 0.0626")
        "below this method's floor: it builds from 0.0626 of full"
    """
    found = _FLOOR.search(error)
    if found:
        return f"below this method's floor: it builds from {found.group(1).rstrip('.')} of full"
    lines = error.strip().splitlines()
    return f"error: {lines[-1][:80] if lines else ''}"


def plot(rows: list[dict[str, Any]], front: set[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    ok = [r for r in rows if "auc" in r]
    colors = plt.get_cmap("tab20").colors
    for i, variant in enumerate(dict.fromkeys(r["variant"] for r in ok)):
        pts = sorted((r["bytes"], r["auc"]) for r in ok if r["variant"] == variant)
        marker = "*" if variant == "full" else "o" if len(pts) > 1 else "s"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, markersize=12 if marker == "*" else 6,
                color=colors[i % len(colors)], label=variant)
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


def speed_pass(args: argparse.Namespace, model: str, data_dir: Path, out: Path) -> None:
    """Side-by-side speed of every trained variant (not quant-*) in one child process; ratios to full."""
    runs = [["full", "full", None, {}]]
    for variant in args.variants:
        kind, params, takes_budget = VARIANTS[variant]
        if kind in ("full", "quant", "search"):
            continue
        for budget in (args.budgets if takes_budget else [None]):
            runs.append([f"{variant}@{budget}" if budget is not None else variant, kind, budget, params])
    res = run({"kind": "speed", "model": model, "data_dir": str(data_dir), "runs": runs, "warmup": 3, "hash": args.hash,
               "steps": args.steps, "repeats": args.repeats or args.steps, "lookup_only": args.lookup_only})
    if "error" in res:
        raise SystemExit(res["error"])
    base = res["full"]
    lines = ["| run | train samples/s | ratio to full | lookup ms (4096 rows, wall) | ratio to full "
             "| lookup CPU ms | ratio to full |", "|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:90]} | | | | | |")
            continue
        lines.append(f"| {name} | {_speed(r['train_samples_per_s'])} "
                     f"| {r['train_samples_per_s'] / base['train_samples_per_s']:.3f} "
                     f"| {1000 * r['lookup_s']:.2f} | {r['lookup_s'] / base['lookup_s']:.2f} "
                     f"| {1000 * r['lookup_cpu_s']:.2f} | {r['lookup_cpu_s'] / base['lookup_cpu_s']:.2f} |")
    md = "\n".join(lines) + "\n"
    # A lookup-only pass has no training speed: it must not replace the full pass's file (results.md reads it).
    stem = "speed_lookup" if args.lookup_only else "speed"
    (out / f"{stem}.md").write_text(md)
    write_json_atomic(out / f"{stem}.json", res)
    print(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="synthetic")
    ap.add_argument("--rows", type=int, default=1_000_000, help="synthetic rows (generated and prepared once)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    ap.add_argument("--fresh", action="store_true", help="re-run even when a result file exists")
    ap.add_argument("--speed", action="store_true",
                    help="only the speed pass: timed train steps and lookups of every run in one process, "
                         "ratios to full (run on a quiet machine)")
    ap.add_argument("--steps", type=int, default=20, help="speed pass: timed steps per run (after 3 warm-up)")
    ap.add_argument("--lookup-only", action="store_true",
                    help="speed pass: time the lookups only, no training steps (writes speed_lookup.md)")
    ap.add_argument("--repeats", type=int, default=0,
                    help="speed pass: interleaved lookup rounds (after 3 warm-up; 0 = --steps)")
    ap.add_argument("--hash", choices=["mulshift", "splitmix64"], default="mulshift",
                    help="embedding.hash of every run (splitmix64 runs go to <dataset>-splitmix64/)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        from recemb.heap import keep_freed_heap

        keep_freed_heap()  # as `recemb train` runs (RECEMB_MALLOC=default: glibc's own settings)
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
    # Runs of the older hash keep their own folder (and cache): the same names, another map of ids to rows.
    out = OUT / (args.dataset if args.hash == "mulshift" else f"{args.dataset}-{args.hash}")
    ds = {**ds, "settings": {**ds["settings"], "embedding.hash": args.hash}}
    out.mkdir(parents=True, exist_ok=True)
    if args.speed:
        speed_pass(args, ds["model"], data_dir, out)
        return
    rows: list[dict[str, Any]] = []
    for variant in args.variants:
        kind, params, takes_budget = VARIANTS[variant]
        for budget in (args.budgets if takes_budget else [None]):
            name = f"{variant}@{budget}" if budget is not None else variant
            path = out / f"{name}.json"
            spec = {"model": ds["model"], "data_dir": str(data_dir), "expid": f"cmp_{args.dataset}_{name}",
                    "kind": kind, "budget": budget, "params": params, "settings": ds["settings"],
                    "from_expid": f"cmp_{args.dataset}_full"}
            cached = json.loads(path.read_text()) if path.exists() and not args.fresh else None
            # A cached result counts only for the same run (data, params, settings); files written
            # before the spec was stored are taken as they are.
            if cached is not None and cached.get("spec", spec) == spec:
                res = cached
            else:
                t0 = time.perf_counter()
                res = run(spec)
                res["wall_s"] = time.perf_counter() - t0
                res["spec"] = spec
                if "error" not in res:
                    write_json_atomic(path, res)
            row: dict[str, Any] = {"run": name, "variant": variant, "budget": budget if budget is not None else "-"}
            if "error" in res:
                row["error"] = res["error"]
                print(f"{name}: ERROR {res['error'].splitlines()[-1] if res['error'] else ''}", flush=True)
            else:
                row.update(bytes=res["embedding_bytes"], ratio=res["embedding_bytes"] / res["full_bytes"],
                           auc=res["test"]["auc"], logloss=res["test"]["logloss"],
                           samples_per_s=res["samples_per_s"], lookup_s=res["lookup_s"])
                print(f"{name}: bytes={row['bytes']:,} ratio={row['ratio']:.4f} auc={row['auc']:.5f} "
                      f"logloss={row['logloss']:.5f} {_speed(row['samples_per_s'])} samples/s "
                      f"lookup {1000 * row['lookup_s']:.2f} ms", flush=True)
            rows.append(row)
    # Merge with earlier runs of variants not requested this time, so the table stays whole.
    done = {r["run"] for r in rows}
    for path in sorted(out.glob("*.json")):
        if path.stem in done or path.name == "results.json":
            continue
        res = json.loads(path.read_text())
        if res.get("spec", {}).get("data_dir", str(data_dir)) != str(data_dir):
            continue  # a run on other data (another --rows): not this table's
        variant, _, budget = path.stem.partition("@")
        if variant in VARIANTS:
            rows.append({"run": path.stem, "variant": variant, "budget": float(budget) if budget else "-",
                         "bytes": res["embedding_bytes"], "ratio": res["embedding_bytes"] / res["full_bytes"],
                         "auc": res["test"]["auc"], "logloss": res["test"]["logloss"],
                         "samples_per_s": res["samples_per_s"], "lookup_s": res["lookup_s"]})
    # Speed from the side-by-side pass (one process, quiet machine) where it exists: the training runs'
    # own samples/s and latencies are taken one after another, under whatever else the machine ran.
    speed_file = out / "speed.json"
    speed = json.loads(speed_file.read_text()) if speed_file.exists() else {}
    for r in rows:
        timed = speed.get(r["run"], {})
        if "train_samples_per_s" in timed and "auc" in r:
            r.update(samples_per_s=timed["train_samples_per_s"], lookup_s=timed["lookup_s"], speed_pass=True)
    order = list(VARIANTS)
    rows.sort(key=lambda r: (order.index(r["variant"]), -(r["budget"] if isinstance(r["budget"], float) else 1.0)))
    front = pareto(rows)
    md = table(rows, front, header)
    (out / "results.md").write_text(md)
    write_json_atomic(out / "results.json", {"header": header, "rows": rows})
    plot(rows, front, out / "auc_vs_bytes.png", header)
    print("\n" + md)
    print(f"wrote {out / 'results.md'} and {out / 'auc_vs_bytes.png'}")


if __name__ == "__main__":
    main()
