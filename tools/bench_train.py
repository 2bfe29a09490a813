"""Training speed of DeepFM: our fused FBGEMM tables vs plain PyTorch vs the dense-compute ceiling.

All models train side by side in one process on the same pre-built batches held in memory
(one process per table size). ``fused`` is exactly what ``recemb.train.loop.train`` runs
(``build_model`` on meta, ``shard_model`` at world size 1, ``dense_optimizer``, the same step;
since ``make_plan`` places ``auto`` tables ``table_wise`` on one CPU rank, ``fused-tw`` below
is now the same plan as ``fused``);
``plain`` is the usual CTR-library way (one ``nn.Embedding`` per field, ``torch.optim.Adam``
over every parameter); ``ceiling`` is the same dense part with the lookups replaced by a
constant tensor. ``fused`` is DeepFM as configured by default (``first_order`` left to
its default); ``fused-table`` and ``fused-fwfm`` pin ``first_order: table`` (separate 4-wide
first-order tables: a second lookup of every id) and ``first_order: embedding`` (the
first-order term from the main embeddings, no second lookup). Other variants: ``fused-tw``
(every table ``table_wise`` instead of the planner's choice) and ``fused-merged`` (one
20-wide table per field: 16 columns for the FM/MLP, 4 summed for the first-order term).
The table prints every ``fused*`` variant's ratio to ``plain`` and to ``ceiling``.

``kernel`` times FBGEMM's table-batched kernel alone (forward, backward and the in-backward
row-wise Adagrad update over the same tables; ``kernel-1t`` at one thread): the table
prints the fused/ceiling ratio a model could reach if nothing but those kernels cost time.

Table sizes (``--settings``): ``mincount`` and ``full`` are the prepared synthetic data with
C1..C26 at min_count 10 and 1; ``4m`` and ``20m`` spread the full-vocabulary ids over bigger
tables (~4.2M and ~20M rows in all) by a multiplicative hash (same id skew).

``--device cuda`` (``auto``: CUDA when visible) runs every variant on the GPU: the batches are
moved there before timing, the fused tables are FBGEMM's CUDA kernels over a one-rank nccl
group, and timers are read after ``torch.cuda.synchronize()``; ``kernel`` then times the
CUDA table-batched kernel. The CPU figures are unchanged by the option.

Usage::

    python tools/bench_train.py                                    # synth + prepare + all sizes
    python tools/bench_train.py --settings full --profile          # with a profile of the fused step
    python tools/bench_train.py --settings 4m --threads 1 --variants fused ceiling
    python tools/bench_train.py --device cuda --settings full 4m --rows 200000
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

OUT = REPO / "bench-out"
DATA = OUT / "data"
NUM_SPARSE = 26
DIM = 16
BATCH = 4096
MLP_SIZES = [400, 400, 400]
CPU = torch.device("cpu")
# setting -> (min_count of C1..C26, total rows to spread the ids over; 0 = the prepared vocabularies)
SETTINGS = {"mincount": (10, 0), "full": (1, 0), "4m": (1, 4_200_000), "20m": (1, 20_000_000)}
# fused variants that pin DeepFM's first_order (``fused`` itself takes the default)
FIRST_ORDER = {"fused-table": "table", "fused-fwfm": "embedding"}


# ----------------------------------------------------------------------------- data


def synth_tsv(rows: int, seed: int = 0, root: Path = DATA) -> Path:
    """The synthetic Criteo-format TSV in ``root`` (generated once per row count and seed)."""
    from recemb.data.synthetic import CtrSynthConfig, generate_ctr

    path = root / f"ctr_{rows}_{seed}.tsv"
    if not Path(f"{path}.json").exists():
        generate_ctr(CtrSynthConfig(rows=rows, seed=seed), path)
    return path


def prepared(rows: int, min_count: int, seed: int = 0, root: Path = DATA) -> Path:
    """``configs/datasets/synthetic_ctr.yaml`` over ``synth_tsv`` with C1..C26 at ``min_count``, in ``root``."""
    from recemb.data.preprocess import prepare_dataset
    from recemb.data.schema import load_dataset_config

    out = root / f"synth_{rows}_{seed}_mc{min_count}"
    if (out / "feature_map.json").exists():
        return out
    tsv = synth_tsv(rows, seed, root)
    cfg = load_dataset_config(REPO / "configs/datasets/synthetic_ctr.yaml", {"paths": [str(tsv)]})
    for spec in cfg.features:
        if spec.kind == "sparse":
            spec.min_count = min_count
    prepare_dataset(cfg, out, overwrite=True)
    return out


def total_rows(fm: Any) -> int:
    """Embedding rows over all sparse features (one table per feature)."""
    return sum(fm.feature(f).num_embeddings for f in fm.sparse_features)


def load_batches(data_dir: Path, n: int) -> tuple[Any, list[Any]]:
    """The feature map and the first ``n`` train batches (single-hot checked)."""
    from recemb.data.batch import ParquetBatches
    from recemb.data.schema import FeatureMap

    fm = FeatureMap.load(data_dir / "feature_map.json")
    batches = list(itertools.islice(ParquetBatches(fm, "train", BATCH, root=data_dir, drop_last=True), n))
    for b in batches:
        if not bool((b.sparse.lengths() == 1).all()):
            raise SystemExit("bench_train expects single-hot sparse features")
    return fm, batches


def enlarge(fm: Any, batches: list[Any], target_rows: int) -> tuple[Any, list[Any]]:
    """A feature map with every vocabulary scaled to ~``target_rows`` rows in all, and batches whose
    ids are the original ids spread over the bigger tables by a multiplicative hash (same skew,
    no locality between neighbouring ids)."""
    import copy

    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recemb.data.batch import Batch

    big = copy.deepcopy(fm)
    scale = target_rows / total_rows(fm)
    sizes = []
    for f in big.features:
        if f.is_categorical:
            f.num_embeddings = max(2, int(f.num_embeddings * scale))
            sizes.append(f.num_embeddings)
    sizes_t = torch.tensor(sizes, dtype=torch.int64)
    out = []
    for b in batches:
        ids = b.sparse.values().view(len(sizes), -1)
        field = torch.arange(len(sizes), dtype=torch.int64)[:, None]
        new = (ids * 2654435761 + field * 97) % sizes_t[:, None]
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=b.sparse.keys(), values=new.reshape(-1),
                                                  lengths=b.sparse.lengths())
        out.append(Batch(dense=b.dense, sparse=kjt, labels=b.labels, weights=b.weights))
    return big, out


def dense_ids(batch: Any) -> torch.Tensor:
    """``[B, F]`` ids of a single-hot batch (KJT values are key-major)."""
    return batch.sparse.values().view(len(batch.sparse.keys()), -1).t().contiguous()


# ----------------------------------------------------------------------------- models


class PlainDeepFM(nn.Module):
    """DeepFM as most CTR libraries write it: one ``nn.Embedding`` (and one 1-wide linear
    embedding) per field, FM + MLP on top; trained with ``torch.optim.Adam`` over everything.
    ``init_std`` is FuxiCTR's default embedding initialiser (normal, std 1e-4)."""

    def __init__(self, vocab: list[int], num_dense: int, dim: int = DIM, mlp: list[int] | None = None,
                 init_std: float = 1e-4) -> None:
        from recemb.models.ctr.layers import MLP

        super().__init__()
        self.emb = nn.ModuleList([nn.Embedding(v, dim) for v in vocab])
        self.lin = nn.ModuleList([nn.Embedding(v, 1) for v in vocab])
        for e in [*self.emb, *self.lin]:
            nn.init.normal_(e.weight, std=init_std)
        self.dense_lin = nn.Linear(num_dense, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(1))
        self.mlp = MLP(len(vocab) * dim + num_dense, mlp or MLP_SIZES, out_dim=1)

    def forward(self, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        from recemb.models.ctr.layers import fm_second_order

        e = torch.stack([m(ids[:, i]) for i, m in enumerate(self.emb)], dim=1)
        lin = torch.cat([m(ids[:, i]) for i, m in enumerate(self.lin)], dim=1).sum(dim=1)
        first = lin + self.bias + self.dense_lin(dense).squeeze(-1)
        deep = self.mlp(torch.cat([e.flatten(1), dense], dim=1)).squeeze(-1)
        return first + fm_second_order(e) + deep


class CeilingDeepFM(nn.Module):
    """The dense part of DeepFM with the lookups replaced by constant tensors (whose gradients
    are still computed, as the real lookups' are)."""

    def __init__(self, num_fields: int, num_dense: int, dim: int = DIM) -> None:
        from recemb.models.ctr.layers import MLP

        super().__init__()
        self.register_buffer("e", torch.randn(BATCH, num_fields, dim) * 0.01)
        self.register_buffer("lin", torch.randn(BATCH, num_fields) * 0.01)
        self.dense_lin = nn.Linear(num_dense, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(1))
        self.mlp = MLP(num_fields * dim + num_dense, MLP_SIZES, out_dim=1)

    def forward(self, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        from recemb.models.ctr.layers import fm_second_order

        # Fresh leaves that require grad: the backward still computes d(loss)/d(lookup output)
        # (the MLP's input gradient and the FM's), as with real tables; nothing applies it.
        e = self.e[: dense.shape[0]].detach().requires_grad_()
        lin = self.lin[: dense.shape[0]].detach().requires_grad_()
        first = lin.sum(dim=1) + self.bias + self.dense_lin(dense).squeeze(-1)
        deep = self.mlp(torch.cat([e.flatten(1), dense], dim=1)).squeeze(-1)
        return first + fm_second_order(e) + deep


class MergedDeepFM(nn.Module):
    """DeepFM with the first-order weights as 4 extra columns of each main table (one collection)."""

    def __init__(self, fm: Any, emb_cfg: Any, device: torch.device) -> None:
        import dataclasses

        from recemb.embeddings.registry import build_embedding_layer
        from recemb.models.ctr.layers import MLP

        super().__init__()
        self.dim = emb_cfg.dim
        self.embedding = build_embedding_layer(fm, dataclasses.replace(emb_cfg, dim=emb_cfg.dim + 4),
                                               device=device)
        num_dense = len(fm.dense_features)
        self.num_fields = len(fm.sparse_features)
        self.dense_lin = nn.Linear(num_dense, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(1))
        self.mlp = MLP(self.num_fields * self.dim + num_dense, MLP_SIZES, out_dim=1)

    def forward(self, batch: Any) -> torch.Tensor:
        from recemb.models.ctr.layers import fm_second_order

        v = self.embedding(batch.sparse).values().view(-1, self.num_fields, self.dim + 4)
        e, lin = v[:, :, : self.dim], v[:, :, self.dim :]
        first = lin.sum(dim=(1, 2)) + self.bias + self.dense_lin(batch.dense).squeeze(-1)
        deep = self.mlp(torch.cat([e.flatten(1), batch.dense], dim=1)).squeeze(-1)
        return first + fm_second_order(e) + deep


# ----------------------------------------------------------------------------- steps


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (refused without a visible GPU) or ``auto`` (CUDA when visible)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_train --device cuda: torch sees no CUDA device (use cpu or auto)")
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs asynchronously; timers must not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fused_step(fm: Any, variant: str = "fused", device: torch.device = CPU) -> tuple[Any, Any]:
    """(model, step) trained exactly like ``recemb.train.loop.train`` (same step body) on ``device``
    (a one-rank gloo group on CPU, nccl on CUDA, as the trainer picks)."""
    from recemb.config.experiment import EmbeddingConfig, ModelConfig, TrainConfig
    from recemb.embeddings.sharding import ensure_process_group, shard_model
    from recemb.models.registry import build_model
    from recemb.train.loop import TrainModel, dense_optimizer

    emb, tc = EmbeddingConfig(dim=DIM), TrainConfig(batch_size=BATCH)
    meta = torch.device("meta")
    if variant == "fused-merged":
        inner: nn.Module = MergedDeepFM(fm, emb, meta)
    else:
        params: dict[str, Any] = {"mlp": MLP_SIZES}
        if variant in FIRST_ORDER:
            params["first_order"] = FIRST_ORDER[variant]
        inner = build_model(ModelConfig("deepfm", params), fm, emb, device=meta)
    model = TrainModel(inner)
    overrides = {}
    if variant == "fused-tw":  # every table whole on the one rank instead of the planner's choice
        overrides = {t: "table_wise" for t in _table_names(model)}
    pg = ensure_process_group("nccl" if device.type == "cuda" else "gloo")
    dmp = shard_model(model, emb, device, pg, batch_size=BATCH, overrides=overrides).model
    opt = dense_optimizer(dmp, tc)

    def step(batch: Any, _ids: Any) -> float:
        batch = batch.to(device)
        loss, _ = dmp(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss)

    return dmp, step


def kernel_step(vocab: list[int], threads: int = 0, device: torch.device = CPU) -> Any:
    """Only FBGEMM's work in the fused step: the CPU table-batched kernel (row-wise Adagrad) over
    the same tables, forward and backward with the in-backward update, nothing around it.

    ``1 / (1 / ceiling + 1 / kernel)`` is then the most a fused model can reach (everything but
    the kernels free), so ``kernel`` says how much of the fused/ceiling gap the kernels alone
    explain. ``threads`` > 0 runs it at that intra-op thread count (FBGEMM's CPU backward does
    not use more than one). On CUDA it is the GPU kernel over tables in device memory."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    from recemb.config.experiment import EmbeddingConfig

    cfg = EmbeddingConfig()
    cuda = device.type == "cuda"
    where = (EmbeddingLocation.DEVICE, ComputeDevice.CUDA) if cuda else (EmbeddingLocation.HOST, ComputeDevice.CPU)
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(v, DIM, *where) for v in vocab],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=cfg.lr, eps=cfg.eps,
        **({"device": device} if cuda else {}))
    upstream = torch.full((BATCH, len(vocab) * DIM), 1e-4, device=device)

    def step(batch: Any, _ids: Any) -> float:
        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            kjt = batch.sparse
            out = tbe(kjt.values(), kjt.offsets())
            out.backward(upstream[: out.shape[0]])
        finally:
            torch.set_num_threads(previous)
        return 0.0

    return step


def _table_names(model: nn.Module) -> list[str]:
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    return [t.name for m in model.modules() if isinstance(m, EmbeddingBagCollection)
            for t in m.embedding_bag_configs()]


def torch_step(model: nn.Module, lr: float = 1e-3) -> Any:
    """Adam over every parameter of a plain model taking ``(ids, dense)``."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step(batch: Any, ids: torch.Tensor) -> float:
        logits = model(ids, batch.dense)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss)

    return step


def time_steps(step: Any, batches: list[Any], ids: list[torch.Tensor], warmup: int,
               steps: int, device: torch.device = CPU) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of this process) over ``steps`` steps
    after ``warmup`` steps, cycling through the batches. The CPU figure is steadier on a busy
    machine; with one thread it is the single-core throughput. On CUDA the device is
    synchronised before each timer is read."""
    n = len(batches)
    for i in range(warmup):
        step(batches[i % n], ids[i % n])
    synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(steps):
        step(batches[(warmup + i) % n], ids[(warmup + i) % n])
    synchronize(device)
    return steps * BATCH / (time.perf_counter() - t0), steps * BATCH / (time.process_time() - c0)


def profile_fused(step: Any, batches: list[Any], ids: list[torch.Tensor], steps: int = 10,
                  device: torch.device = CPU) -> str:
    from torch.profiler import ProfilerActivity, profile

    n = len(batches)
    for i in range(3):
        step(batches[i % n], ids[i % n])
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        for i in range(steps):
            step(batches[i % n], ids[i % n])
        synchronize(device)
    return prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                     row_limit=25)


# ----------------------------------------------------------------------------- one setting


def run_setting(setting: str, rows: int, args: argparse.Namespace) -> dict[str, Any]:
    """Build every model for one table size and time them in interleaved rounds."""
    torch.manual_seed(0)
    device = resolve_device(args.device)
    min_count, spread = SETTINGS[setting]
    fm, batches = load_batches(prepared(rows, min_count, root=Path(args.data)), args.batches)
    if spread:
        fm, batches = enlarge(fm, batches, spread)
    ids = [dense_ids(b).to(device) for b in batches]
    batches = [b.to(device) for b in batches]
    vocab = [fm.feature(f).num_embeddings for f in fm.sparse_features]
    num_dense = len(fm.dense_features)
    variants = args.variants
    steps: dict[str, Any] = {}
    t = time.perf_counter()
    for v in variants:
        if v.startswith("fused"):
            steps[v] = fused_step(fm, v, device)[1]
        elif v == "plain":
            steps[v] = torch_step(PlainDeepFM(vocab, num_dense).to(device))
        elif v == "ceiling":
            steps[v] = torch_step(CeilingDeepFM(len(vocab), num_dense).to(device))
        elif v.startswith("kernel"):  # kernel, kernel-1t (one thread)
            steps[v] = kernel_step(vocab, threads=1 if v == "kernel-1t" else 0, device=device)
    build_s = time.perf_counter() - t
    best: dict[str, float] = {v: 0.0 for v in variants}
    best_cpu: dict[str, float] = {v: 0.0 for v in variants}
    runs: dict[str, list[float]] = {v: [] for v in variants}
    load0 = os.getloadavg()
    for _ in range(args.rounds):
        for v in variants:
            sps, cps = time_steps(steps[v], batches, ids, args.warmup, args.steps, device)
            runs[v].append(sps)
            best[v] = max(best[v], sps)
            best_cpu[v] = max(best_cpu[v], cps)
    result: dict[str, Any] = {
        "setting": setting, "device": str(device), "rows": total_rows(fm), "vocab": vocab, "build_s": build_s,
        "samples_per_s": best, "samples_per_cpu_s": best_cpu, "runs": runs,
        "threads": torch.get_num_threads(), "load_avg_before": load0, "load_avg": os.getloadavg(),
    }
    if args.profile and "fused" in steps:
        result["profile"] = profile_fused(steps["fused"], batches, ids, device=device)
    return result


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def print_table(results: list[dict[str, Any]], key: str = "samples_per_s") -> None:
    variants = [v for v in results[0][key]]
    fused = [v for v in variants if v.startswith("fused")]
    ratios = [(v, other) for v in fused for other in ("plain", "ceiling") if other in variants]
    head = f"{'setting':<9} {'rows':>11} " + " ".join(f"{v:>13}" for v in variants)
    head += "".join(f" {v + '/' + other[:4]:>18}" for v, other in ratios)
    print(head)
    for r in results:
        sps = r[key]
        line = f"{r['setting']:<9} {r['rows']:>11,} " + " ".join(f"{sps[v]:>13,.0f}" for v in variants)
        line += "".join(f" {ratio(sps.get(v), sps.get(other)):>18}" for v, other in ratios)
        print(line)
        if sps.get("kernel") and sps.get("ceiling"):
            best = 1.0 / (1.0 / sps["ceiling"] + 1.0 / sps["kernel"])
            print(f"{'':<9} FBGEMM kernels alone {sps['kernel']:,.0f}/s: with nothing else, fused <= {best:,.0f}/s "
                  f"= {best / sps['ceiling']:.2f} of the ceiling")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of synthetic data")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--variants", nargs="+",
                    default=["fused", "plain", "ceiling", "fused-table"])
    ap.add_argument("--batches", type=int, default=24, help="distinct batches held in memory")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds (best one counts)")
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler table of fused")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                    help="where the models train (auto: CUDA when visible); default cpu")
    ap.add_argument("--data", default=str(DATA), help="folder of the synthetic and prepared data")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(OUT / "bench_train.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        from recemb.heap import keep_freed_heap

        keep_freed_heap()  # as `recemb train` runs (RECEMB_MALLOC=default: glibc's own settings)
        print("RESULT " + json.dumps(run_setting(args.settings[0], args.rows, args)), flush=True)
        return
    resolve_device(args.device)  # refuse cuda without a GPU before any data is made
    for s in args.settings:  # data first, so the timed children only read it
        prepared(args.rows, SETTINGS[s][0], root=Path(args.data))
    results = []
    for s in args.settings:
        cmd = [sys.executable, __file__, "--child", "--settings", s, "--rows", str(args.rows),
               "--batches", str(args.batches), "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--rounds", str(args.rounds), "--threads", str(args.threads), "--device", args.device,
               "--data", args.data, "--variants", *args.variants]
        if args.profile:
            cmd.append("--profile")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        print(f"[{s}] rows={r['rows']:,} load={r['load_avg'][0]:.2f} runs=" +
              json.dumps({k: [round(x) for x in v] for k, v in r["runs"].items()}), flush=True)
        if "profile" in r:
            print(r["profile"])
        results.append(r)
    if results:
        print(f"samples/s (wall, best of {args.rounds} interleaved rounds of {args.steps} steps, "
              f"{results[0]['threads']} threads, {results[0]['device']})")
        print_table(results)
        print("samples per CPU-second of the process")
        print_table(results, "samples_per_cpu_s")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
