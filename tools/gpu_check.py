"""The GPU paths recemb has never run, checked step by step in under 5 minutes; one table at the end.

A device machine is lent for minutes at a time, so this runs everything in one go and cannot
stop half-way: each step runs in a child process of its own with its own time limit (a hang,
crash or error there is a ``failed`` row with its reason, and the next step runs), steps whose
needs are missing are ``skipped`` with the reason, and the table always prints.

Steps (``--steps`` picks some; ``env`` always runs first):

* ``env``: torch, CUDA, torchrec and fbgemm_gpu versions, GPU count and name, whether
  fbgemm_gpu has CUDA kernels (it runs one on the GPU), nccl, mlflow.
* ``shard``: a DeepFM built by ``build_model`` inside ``TrainModel``, its tables planned and
  sharded by ``shard_model`` over nccl (2 ranks when 2 GPUs are visible, else 1; spawned
  processes), fused SGD. On the same global batch the sharded model's logits, its dense
  gradients (averaged over ranks) and its table rows after the in-backward update equal an
  unsharded model's trained on the mean loss; one row per sharding type.
* ``adam``: ``embedding.optimizer: adam`` (FBGEMM's fused Adam) on CUDA tables: over a few
  steps on the same batches the loss falls and the rows of the ids seen move (and no other).
* ``bench``: ``tools/bench_train.py --device cuda``: the fused DeepFM (table and fwfm first
  order), plain PyTorch and the dense ceiling; samples/s and the ratio to the ceiling.
* ``pipeline``: ``torchrec``'s ``TrainPipelineSparseDist`` (batch copy and the tables' input
  dist overlapped with forward/backward) against the plain loop of ``recemb.train.loop`` on
  two copies of the same sharded DeepFM: both samples/s, their ratio, and that both give the
  same losses step by step. ``Batch`` already has what the pipeline needs of its input
  (torchrec's ``Pipelineable``: ``to(device, non_blocking)``, ``record_stream``; and
  ``pin_memory``, used here on CUDA for the host batches).
* ``cli``: ``recemb synth``, ``prepare`` and a 1-epoch ``train`` with ``train.device=cuda``
  through the real command line.

``--device cpu`` runs the same steps on CPU (gloo instead of nccl; FBGEMM's Adam is GPU-only
and ``shard_model`` refuses it on CPU, so ``adam`` checks that refusal and runs the CPU fused
kernel, row-wise Adagrad, instead): that is how this script is proven without a GPU.
``--device auto`` (the default) picks CUDA when torch sees one.

What a GPU machine needs (the README's "GPU variant" install): Python >= 3.11, a CUDA build
of torch 2.13 and the CUDA ``fbgemm-gpu==1.8.0`` (not ``fbgemm-gpu-cpu``, nor the
``fbgemm-gpu 1.8.0+cpustub`` of the CPU install; fbgemm 1.8 is built against torch 2.13),
``torchrec==1.8.0`` and the rest of requirements.txt (pyarrow, ray, mlflow-skinny, ...)::

    python3.11 -m venv .venv
    .venv/bin/pip install torch==2.13.0 --index-url <PyTorch's CUDA wheel index for your CUDA version>
    .venv/bin/pip install fbgemm-gpu==1.8.0 torchrec==1.8.0 \
        $(grep -v -E '^(#|torch==|fbgemm)' requirements.txt) -r requirements-dev.txt
    .venv/bin/pip install --no-deps -e .

nccl comes with the CUDA torch. ``shard`` and ``pipeline`` run 2 ranks when 2 GPUs are visible.

This workplace's device machine (``nvidia-h200``: one H200) lacks that stack: its python3.12
has torch 2.11.0+cu130 (not 2.13) and no torchrec, fbgemm-gpu, ray or mlflow (it has pyarrow,
pandas, pyyaml, torchmetrics and pyre-extensions); it reaches no package
index, and a call carries at most 64 MiB of files, so the CUDA fbgemm-gpu wheel (~500 MB) cannot
be brought there. On it, ``env`` reports what is missing and every other step is skipped with
that reason, in seconds. With one GPU, ``shard`` runs one rank (nccl cannot put two ranks on one
GPU).

Usage::

    tools/gpu_check.sh                                   # auto device, under 290 s in all
    tools/gpu_check.sh --device cpu --size tiny          # the CPU proof, small
    python tools/gpu_check.py --device cpu --steps shard pipeline --ranks 2
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STEPS = ("env", "shard", "adam", "bench", "pipeline", "cli")
# Each step's own limit in seconds (a child past it is killed); the whole run has --budget.
STEP_LIMITS = {"env": 60, "shard": 100, "adam": 60, "bench": 150, "pipeline": 90, "cli": 150}
MIN_STEP_S = 20  # a step is not started with less than this left of the budget
RESULT = "GPU_CHECK_RESULT "


# ----------------------------------------------------------------------------- rows and sizes


@dataclass
class Row:
    """One line of the table: a step (or one case of it) on a device, its status and figure.

    ``status`` is ``ok``, ``failed`` or ``skipped``; ``why`` says why it is not ``ok``;
    ``seconds`` is the step's wall time (a case's own, without the step's start-up, where a
    step has several rows); ``data`` keeps the numbers behind ``figure`` (and ``env``'s facts)
    for ``--json``.
    """

    step: str
    device: str
    status: str
    figure: str = ""
    why: str = ""
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sizes:
    """How big each step runs. ``tiny`` is the test's, ``cpu`` this kind of 2-core machine's,
    ``gpu`` sized to finish every step well inside the 5 minutes on one H200."""

    features: int = 4
    rows: int = 500  # rows of the first table (the others 1/2 and 2x of it, in turn)
    dim: int = 8
    batch: int = 64  # per rank
    mlp: tuple[int, ...] = (16,)
    shardings: tuple[str, ...] = ("auto",)
    adam_steps: int = 6
    pipe_batch: int = 64
    pipe_warmup: int = 2
    pipe_steps: int = 6
    pipe_rounds: int = 1
    bench_rows: int = 30_000
    bench_settings: tuple[str, ...] = ("full",)
    bench_batches: int = 3
    bench_steps: int = 2
    cli_rows: int = 20_000
    cli_overrides: tuple[str, ...] = ("train.batch_size=512", "train.eval_batch_size=4096", "embedding.dim=8",
                                      "model.params={mlp: [32, 16]}")


SIZES = {
    "tiny": Sizes(),
    "cpu": Sizes(features=8, rows=2_000, dim=16, batch=256, mlp=(64, 32),
                 shardings=("auto", "row_wise", "column_wise"), adam_steps=8,
                 pipe_batch=1024, pipe_warmup=3, pipe_steps=20, pipe_rounds=2, bench_batches=4, bench_steps=3),
    "gpu": Sizes(features=26, rows=100_000, dim=16, batch=2048, mlp=(400, 400, 400),
                 shardings=("auto", "table_wise", "row_wise", "column_wise", "table_row_wise"), adam_steps=20,
                 pipe_batch=8192, pipe_warmup=10, pipe_steps=100, pipe_rounds=2, bench_rows=200_000,
                 bench_settings=("full", "4m"), bench_batches=24, bench_steps=30, cli_rows=200_000,
                 cli_overrides=()),
}


@dataclass(frozen=True)
class Options:
    """What every step gets: the device type (``cpu``/``cuda``), sizes, ranks, a work folder."""

    device: str
    size: str
    ranks: int
    work: Path
    threads: int = 0

    @property
    def sizes(self) -> Sizes:
        return SIZES[self.size]

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"


# ----------------------------------------------------------------------------- step: env


def _version(dist_name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def gather_facts() -> dict[str, Any]:
    """What is installed and what it can do; every probe guarded (a missing piece is a fact)."""
    facts: dict[str, Any] = {"python": sys.version.split()[0]}
    try:
        import torch
        import torch.distributed as dist
    except Exception as exc:  # nothing else runs without torch: say why
        facts["torch_error"] = f"{type(exc).__name__}: {exc}"
        return facts
    facts.update(torch=torch.__version__, cuda=torch.version.cuda, gpus=torch.cuda.device_count(),
                 gpu_names=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                 nccl=bool(dist.is_available() and dist.is_nccl_available()))
    facts["fbgemm_dists"] = {d: v for d in ("fbgemm-gpu", "fbgemm-gpu-cpu", "fbgemm-gpu-genai")
                             if (v := _version(d))}
    try:
        import fbgemm_gpu

        facts["fbgemm_variant"] = str(getattr(fbgemm_gpu, "__variant__", "unknown"))
        facts["fbgemm_version"] = str(getattr(fbgemm_gpu, "__version__", "unknown"))
    except Exception as exc:  # a missing or broken piece is a fact
        facts["fbgemm_error"] = f"{type(exc).__name__}: {exc}"
    if facts["gpus"] and "fbgemm_error" not in facts:
        try:  # the proof that the CUDA kernels are there: run one
            lengths = torch.tensor([1, 2, 3], dtype=torch.int64, device="cuda")
            offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
            facts["fbgemm_cuda"] = offsets.cpu().tolist() == [0, 1, 3, 6]
        except Exception as exc:  # a missing or broken piece is a fact
            facts["fbgemm_cuda"] = False
            facts["fbgemm_cuda_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    try:
        import torchrec

        facts["torchrec"] = str(getattr(torchrec, "__version__", None) or _version("torchrec"))
    except Exception as exc:  # a missing or broken piece is a fact
        facts["torchrec_error"] = f"{type(exc).__name__}: {exc}"
    facts.update({name: _version(name) for name in ("mlflow-skinny", "mlflow", "ray", "pyarrow")})
    return facts


def step_env(opts: Options) -> list[Row]:
    """The environment report: one row, its facts in ``data``."""
    facts = gather_facts()
    for key, value in facts.items():
        print(f"[env] {key}: {value}", flush=True)
    if "torch_error" in facts:
        return [Row("env", opts.device, "failed", why=f"torch does not import: {facts['torch_error']}", data=facts)]
    gpus = f"{facts['gpus']} GPU" + (f" ({facts['gpu_names'][0]})" if facts["gpus"] else "")
    fbgemm = (f"fbgemm_gpu {facts.get('fbgemm_version')} {facts.get('fbgemm_variant')}"
              if "fbgemm_error" not in facts else "fbgemm_gpu does not load")
    cuda_ops = {True: "yes", False: "no"}.get(facts.get("fbgemm_cuda"), "not tried (no GPU)")
    figure = (f"torch {facts['torch']} (CUDA {facts['cuda'] or '-'}), {gpus}, "
              f"torchrec {facts.get('torchrec') or 'missing'}, {fbgemm} (CUDA ops: {cuda_ops})")
    return [Row("env", opts.device, "ok", figure, data=facts)]


def skip_reason(step: str, device: str, facts: dict[str, Any]) -> str:
    """Why ``step`` cannot run on ``device`` given ``env``'s facts, or ``""`` when it can.

    Example:
        >>> skip_reason("adam", "cuda", {"torch": "2.13.0", "gpus": 0, "torchrec": "1.8.0"})
        'torch sees no CUDA device'
    """
    if "torch_error" in facts:
        return f"torch does not import ({facts['torch_error']})"
    if device == "cuda" and not facts.get("gpus"):
        return "torch sees no CUDA device"
    missing = []  # the whole stack's gaps at once: one look tells what to install
    if "fbgemm_error" in facts or (not facts.get("fbgemm_variant") and not facts.get("fbgemm_dists")):
        missing.append(f"fbgemm_gpu does not load ({facts.get('fbgemm_error', 'not installed')})")
    if not facts.get("torchrec"):
        missing.append(f"torchrec is not installed ({facts.get('torchrec_error', 'no torchrec')})")
    if missing:
        return "; ".join(missing) + " (README: GPU variant)"
    if device == "cuda":
        if facts.get("fbgemm_cuda") is False:
            return (f"fbgemm_gpu {facts.get('fbgemm_variant')} build has no CUDA kernels "
                    f"({facts.get('fbgemm_cuda_error', '')}): install the CUDA fbgemm-gpu==1.8.0 (README: GPU variant)")
        if not facts.get("nccl"):
            return "torch has no nccl backend"
    if step == "cli" and not (facts.get("mlflow-skinny") or facts.get("mlflow")):
        return "mlflow is not installed (recemb train tracks every run in MLflow)"
    if step in ("bench", "cli") and not facts.get("pyarrow"):
        return "pyarrow is not installed (prepare writes Parquet)"
    return ""


# ----------------------------------------------------------------------------- toy data and models


def toy_feature_map(sizes: Sizes) -> Any:
    """Four dense features and ``sizes.features`` sparse ones of three table sizes; the last multi-hot."""
    from recemb.data.schema import FeatureInfo, FeatureMap

    feats = [FeatureInfo(name=f"d{i}", kind="dense", source=f"d{i}") for i in range(4)]
    for i in range(sizes.features):
        kind = "multihot" if i == sizes.features - 1 > 0 else "sparse"  # c0 single-hot: the labels read it
        rows = max(8, int(sizes.rows * (1.0, 0.5, 2.0)[i % 3]))
        feats.append(FeatureInfo(name=f"c{i}", kind=kind, source=f"c{i}", num_embeddings=rows))
    return FeatureMap(dataset_id="gpu_check", label="label", features=feats)


def toy_batch(fm: Any, batch: int, step: int, rank: int) -> Any:
    """Rank ``rank``'s batch of step ``step`` (on CPU): skewed ids (repeats within a batch),
    0-3 ids per bag in the multi-hot feature, and labels read from ``c0``'s id (learnable)."""
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recemb.data.batch import Batch

    gen = torch.Generator().manual_seed(7919 * step + rank)
    lengths, values, first = [], [], None
    for name in fm.sparse_features:
        info = fm.feature(name)
        if info.kind == "multihot":
            length = torch.randint(0, 4, (batch,), generator=gen)
        else:
            length = torch.ones(batch, dtype=torch.int64)
        ids = (torch.rand(int(length.sum()), generator=gen) ** 3 * info.num_embeddings).long()
        first = ids if first is None else first
        lengths.append(length)
        values.append(ids)
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=fm.sparse_features, values=torch.cat(values),
                                                 lengths=torch.cat(lengths))
    labels = (first % 2 == 0).float() if first is not None else torch.zeros(batch)
    return Batch(dense=torch.randn(batch, len(fm.dense_features), generator=gen), sparse=sparse, labels=labels)


def build_pair(fm: Any, sizes: Sizes, emb: Any, device: Any, pg: Any, copies: int = 1) -> tuple[Any, list[Any]]:
    """An unsharded ``TrainModel`` DeepFM on CPU (seeded) and ``copies`` sharded ones on ``device``
    built by ``shard_model`` and started from its weights (``load_full_state``)."""
    import torch

    from recemb.config.experiment import ModelConfig
    from recemb.embeddings.sharding import load_full_state, shard_model
    from recemb.models.registry import build_model
    from recemb.train.loop import TrainModel

    model_cfg = ModelConfig("deepfm", {"mlp": list(sizes.mlp)})
    torch.manual_seed(0)
    reference = TrainModel(build_model(model_cfg, fm, emb))
    state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    sharded = []
    for _ in range(copies):
        meta = TrainModel(build_model(model_cfg, fm, emb, device=torch.device("meta")))
        one = shard_model(meta, emb, device, pg, batch_size=sizes.batch)
        load_full_state(one.model, state)
        sharded.append(one)
    return reference, sharded


def table_pieces(model: Any) -> dict[str, list[tuple[list[int], Any]]]:
    """This rank's pieces of every embedding table: key -> [(global offsets, local tensor)]."""
    from recemb.embeddings.sharding import local_pieces

    return {k: local_pieces(v) for k, v in model.state_dict().items() if ".embedding_bags." in k}


def _max_diff(a: Any, b: Any) -> float:
    return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max()) if a.numel() else 0.0


# ----------------------------------------------------------------------------- ranks


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def process_group(backend: str, rank: int, world: int, port: int) -> Iterator[Any]:
    """This rank in a ``world``-rank group over TCP on 127.0.0.1; left on exit."""
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _rank_device(device: str, rank: int) -> Any:
    import torch

    if device == "cuda":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _rank_entry(fn: Callable[..., Any], rank: int, world: int, port: int, opts: Options, results: Any) -> None:
    _quiet(opts.threads)
    try:
        device = _rank_device(opts.device, rank)
        with process_group(opts.backend, rank, world, port) as pg:
            results.put((rank, "ok", fn(rank, world, device, pg, opts)))
    except BaseException:  # the step reports the rank's traceback
        results.put((rank, "error", traceback.format_exc()))


def on_ranks(fn: Callable[..., Any], opts: Options) -> list[Any]:
    """``fn(rank, world, device, pg, opts)`` on ``opts.ranks`` ranks; their results by rank.

    One rank runs here; more are spawned (torch.multiprocessing), each on its own GPU
    under nccl or on CPU under gloo. A rank that fails raises here with its traceback.
    """
    port = _free_port()
    if opts.ranks == 1:
        device = _rank_device(opts.device, 0)
        with process_group(opts.backend, 0, 1, port) as pg:
            return [fn(0, 1, device, pg, opts)]
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_entry, args=(fn, r, opts.ranks, port, opts, results), daemon=True)
             for r in range(opts.ranks)]
    for proc in procs:
        proc.start()
    by_rank: dict[int, Any] = {}
    try:
        while len(by_rank) < opts.ranks:
            try:
                rank, status, payload = results.get(timeout=2.0)
            except queue.Empty:  # look for ranks that died without a word
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a rank died without reporting (exit codes {dead})") from None
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} of {opts.ranks} failed:\n{payload}")
            by_rank[rank] = payload
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return [by_rank[r] for r in range(opts.ranks)]


# ----------------------------------------------------------------------------- step: shard


def shard_rank(rank: int, world: int, device: Any, pg: Any, opts: Options) -> dict[str, Any]:
    """Per sharding type: max differences of the sharded model from the unsharded one on this rank."""
    import torch
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from recemb.config.experiment import EmbeddingConfig
    from recemb.embeddings.sharding import plan_to_dict, table_optimizer

    sizes, lr = opts.sizes, 0.5
    fm = toy_feature_map(sizes)
    batches = [toy_batch(fm, sizes.batch, 0, r) for r in range(world)]
    out: dict[str, Any] = {}
    for kind in sizes.shardings:
        t0 = time.perf_counter()
        emb = EmbeddingConfig(dim=sizes.dim, sharding=kind, optimizer="exact_sgd", lr=lr)
        reference, (sharded,) = build_pair(fm, sizes, emb, device, pg)
        dmp = sharded.model
        loss, (_, logits, _) = dmp(batches[rank].to(device))
        loss.backward()  # the fused SGD updates this rank's table shards here
        unfused = table_optimizer(dmp, emb)  # data_parallel tables (the planner may pick it): as the loop does
        if unfused is not None:
            unfused.step()
        ref_losses = [reference(b)[0] for b in batches]
        ref_logits = reference(batches[rank])[1][1]
        (sum(ref_losses) / world).backward()
        ref_params = dict(reference.named_parameters())
        grads = [_max_diff(p.grad, ref_params[n].grad) for n, p in in_backward_optimizer_filter(
            dmp.named_parameters()) if p.grad is not None and n in ref_params]
        grad = max(grads, default=float("nan"))  # nan (a failure) when no dense gradient was compared
        rows = 0.0
        with torch.no_grad():
            expected = {k: p - lr * p.grad for k, p in reference.state_dict(keep_vars=True).items()
                        if ".embedding_bags." in k}
            for key, pieces in table_pieces(dmp).items():
                for offsets, local in pieces:
                    index = tuple(slice(o, o + s) for o, s in zip(offsets, local.shape, strict=True))
                    rows = max(rows, _max_diff(local, expected[key][index]))
        plan = plan_to_dict(sharded.plan)
        if rank == 0:
            print(f"[shard] {kind}: compared on {world} rank(s)", flush=True)
        out[kind] = {"forward": _max_diff(logits, ref_logits), "grad": grad, "rows": rows,
                     "seconds": time.perf_counter() - t0,
                     "planned": sorted({t["sharding_type"] for ts in plan.values() for t in ts.values()}),
                     "kernels": sorted({t["compute_kernel"] for ts in plan.values() for t in ts.values()})}
    return out


def step_shard(opts: Options) -> list[Row]:
    """Sharded DeepFM against the unsharded one, one row per sharding type."""
    per_rank = on_ranks(shard_rank, opts)
    tol = 1e-4 if opts.device == "cuda" else 1e-5
    where = f"{opts.device} x{opts.ranks} {opts.backend}"
    rows = []
    for kind in opts.sizes.shardings:
        worst = {k: max(r[kind][k] for r in per_rank) for k in ("forward", "grad", "rows")}
        planned = "/".join(per_rank[0][kind]["planned"])
        figure = (f"max abs diff: logits {worst['forward']:.1e}, dense grads {worst['grad']:.1e}, "
                  f"rows after fused SGD {worst['rows']:.1e} (tol {tol:g}); plan {planned}, "
                  f"kernel {'/'.join(per_rank[0][kind]['kernels'])}")
        bad = [k for k, v in worst.items() if not v <= tol]
        rows.append(Row(f"shard {kind}", where, "failed" if bad else "ok", figure,
                        why=f"{', '.join(bad)} differ from the unsharded model" if bad else "",
                        seconds=per_rank[0][kind]["seconds"],
                        data={**worst, "planned": per_rank[0][kind]["planned"]}))
    return rows


# ----------------------------------------------------------------------------- step: adam


def step_adam(opts: Options) -> list[Row]:
    """Fused Adam on the device's tables (on CPU: the refusal, then the CPU fused kernel)."""
    import torch

    from recemb.config.experiment import EmbeddingConfig, TrainConfig
    from recemb.embeddings.sharding import check_sparse_optimizer, plan_to_dict
    from recemb.errors import ConfigError
    from recemb.train.loop import dense_optimizer

    sizes, cuda = opts.sizes, opts.device == "cuda"
    note = ""
    if not cuda:
        try:
            check_sparse_optimizer("adam", torch.device("cpu"))
            return [Row("adam", "cpu x1 gloo", "failed", why="shard_model accepts fused Adam on CPU (FBGEMM has none)")]
        except ConfigError:
            note = "adam refused on CPU as designed; ran the CPU fused kernel (row-wise Adagrad): "
    optimizer, lr = ("adam", 0.01) if cuda else ("exact_rowwise_adagrad", 0.1)
    fm = toy_feature_map(sizes)
    batches = [toy_batch(fm, sizes.batch, s, 0) for s in range(2)]
    # table_wise: the fused kernel for sure (``auto`` may pick data_parallel for small tables, unfused)
    emb = EmbeddingConfig(dim=sizes.dim, sharding="table_wise", optimizer=optimizer, lr=lr)

    def run(rank: int, world: int, device: Any, pg: Any, o: Options) -> dict[str, Any]:
        _, (sharded,) = build_pair(fm, sizes, emb, device, pg)
        dmp = sharded.model
        opt = dense_optimizer(dmp, TrainConfig())
        before = {k: [(off, t.detach().clone()) for off, t in ps] for k, ps in table_pieces(dmp).items()}
        losses = []
        for i in range(sizes.adam_steps):
            loss, _ = dmp(batches[i % len(batches)].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        moved_seen = seen = moved_unseen = 0
        after = table_pieces(dmp)
        for key, pieces in before.items():
            feature = key.split(".embedding_bags.")[1].split(".")[0].removeprefix("lin_").removeprefix("t_")
            ids = torch.cat([b.sparse[feature].values() for b in batches]).unique()
            for (offsets, old), (_, new) in zip(pieces, after[key], strict=True):
                moved = (new.detach().cpu() != old.cpu()).any(dim=1)
                rows = torch.arange(old.shape[0]) + offsets[0]
                hit = torch.isin(rows, ids)
                seen += int(hit.sum()) if offsets[1] == 0 else 0  # count each row once over column shards
                moved_seen += int((moved & hit).sum()) if offsets[1] == 0 else 0
                moved_unseen += int((moved & ~hit).sum())
        kernels = sorted({t["compute_kernel"] for ts in plan_to_dict(sharded.plan).values() for t in ts.values()})
        return {"losses": losses, "seen": seen, "moved_seen": moved_seen, "moved_unseen": moved_unseen,
                "kernels": kernels}

    r = on_ranks(run, dataclasses.replace(opts, ranks=1))[0]
    first, last = r["losses"][0], min(r["losses"][-2:])
    figure = (f"{note}loss {first:.4f} -> {last:.4f} in {sizes.adam_steps} steps; rows moved: "
              f"{r['moved_seen']}/{r['seen']} of the ids seen, {r['moved_unseen']} others; kernel "
              f"{'/'.join(r['kernels'])}")
    problems = []
    if not last < first:
        problems.append("the loss did not fall")
    if r["moved_seen"] < r["seen"] or not r["seen"]:
        problems.append("rows of ids seen did not all move")
    return [Row("adam" if cuda else "adam (cpu: row-wise adagrad)", f"{opts.device} x1 {opts.backend}",
                "failed" if problems else "ok", figure, why="; ".join(problems), data=r)]


# ----------------------------------------------------------------------------- step: pipeline


def pipeline_rank(rank: int, world: int, device: Any, pg: Any, opts: Options) -> dict[str, Any]:
    """Plain loop and TrainPipelineSparseDist on two copies of one sharded DeepFM, interleaved rounds."""
    import torch
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from recemb.config.experiment import EmbeddingConfig, TrainConfig
    from recemb.train.loop import dense_optimizer

    sizes = opts.sizes
    fm = toy_feature_map(sizes)
    # row_wise: every table has an input dist to overlap (bucketize + all-to-all), and stays fused
    emb = EmbeddingConfig(dim=sizes.dim, sharding="row_wise")
    _, (plain, piped) = build_pair(fm, sizes, emb, device, pg, copies=2)
    host = [toy_batch(fm, sizes.pipe_batch, s, rank) for s in range(8)]
    if device.type == "cuda":
        host = [b.pin_memory() for b in host]  # as a DataLoader with pin_memory hands them over
    total = sizes.pipe_warmup + sizes.pipe_rounds * sizes.pipe_steps
    plain_opt, piped_opt = dense_optimizer(plain.model, TrainConfig()), dense_optimizer(piped.model, TrainConfig())
    pipe = TrainPipelineSparseDist(piped.model, piped_opt, device)
    stream = iter([host[i % len(host)] for i in range(total)])
    plain_losses: list[Any] = []
    piped_losses: list[Any] = []

    def plain_steps(start: int, n: int) -> None:
        for i in range(start, start + n):
            batch = host[i % len(host)].to(device, non_blocking=True)  # recemb.train.loop's step
            loss, (data_loss, _, _) = plain.model(batch)
            plain_opt.zero_grad()
            loss.backward()
            plain_opt.step()
            plain_losses.append(data_loss.detach())

    def piped_steps(n: int) -> None:
        for _ in range(n):
            piped_losses.append(pipe.progress(stream)[0].detach())

    def timed(run: Callable[[], None]) -> float:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        return time.perf_counter() - t0

    plain_steps(0, sizes.pipe_warmup)
    piped_steps(sizes.pipe_warmup)
    best_plain = best_piped = float("inf")
    for r in range(sizes.pipe_rounds):
        start = sizes.pipe_warmup + r * sizes.pipe_steps
        best_plain = min(best_plain, timed(lambda s=start: plain_steps(s, sizes.pipe_steps)))
        best_piped = min(best_piped, timed(lambda: piped_steps(sizes.pipe_steps)))
    pipelined = pipelined_modules(pipe)
    pipe.detach()
    if rank == 0:
        print(f"[pipeline] {len(plain_losses)} plain and {len(piped_losses)} pipelined steps done", flush=True)
    diffs = [abs(float(a) - float(b)) for a, b in zip(plain_losses, piped_losses, strict=True)]
    return {"plain_s": best_plain, "piped_s": best_piped, "loss_diff": max(diffs), "pipelined": pipelined,
            "steps": len(diffs)}


def pipelined_modules(pipe: Any) -> int:
    """How many sharded modules the pipeline runs ahead (input dist overlapped); 0 means no overlap.

    torchrec keeps this list private (``_pipelined_modules``); read in this one place only.
    """
    return len(getattr(pipe, "_pipelined_modules", []) or [])


def step_pipeline(opts: Options) -> list[Row]:
    """TrainPipelineSparseDist against the plain loop: samples/s of both, ratio, equal losses."""
    per_rank = on_ranks(pipeline_rank, opts)
    sizes = opts.sizes
    samples = sizes.pipe_steps * sizes.pipe_batch * opts.ranks
    plain = samples / max(r["plain_s"] for r in per_rank)
    piped = samples / max(r["piped_s"] for r in per_rank)
    diff = max(r["loss_diff"] for r in per_rank)
    tol = 1e-4 if opts.device == "cuda" else 1e-5
    pipelined = per_rank[0]["pipelined"]
    figure = (f"plain {plain:,.0f}/s, pipeline {piped:,.0f}/s = {piped / plain:.2f}x; {pipelined} sharded "
              f"modules pipelined; max abs loss diff {diff:.1e} over {per_rank[0]['steps']} steps (batch "
              f"{sizes.pipe_batch}/rank, row_wise tables, best of {sizes.pipe_rounds} x {sizes.pipe_steps})")
    problems = []
    if not diff <= tol:
        problems.append(f"losses differ from the plain loop's by {diff:.1e}")
    if not pipelined:
        problems.append("no sharded module was pipelined (the model did not trace): no overlap")
    return [Row("pipeline", f"{opts.device} x{opts.ranks} {opts.backend}", "failed" if problems else "ok",
                figure, why="; ".join(problems),
                data={"plain_per_s": plain, "pipeline_per_s": piped, "ratio": piped / plain, "loss_diff": diff,
                      "pipelined": pipelined})]


# ----------------------------------------------------------------------------- steps: bench, cli


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` from the repo root, its output kept in ``log``; a failure raises with its last lines."""
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})
    log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"{log.stem} exited {proc.returncode} (log {log}): {tail}")
    return proc


def step_bench(opts: Options) -> list[Row]:
    """``tools/bench_train.py`` on the device: fused and fwfm DeepFM, plain PyTorch, the ceiling."""
    sizes, work = opts.sizes, opts.work / "bench"
    out = work / "bench_train.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(REPO / "tools" / "bench_train.py"), "--device", opts.device,
           "--rows", str(sizes.bench_rows), "--settings", *sizes.bench_settings,
           "--variants", "fused", "fused-fwfm", "plain", "ceiling", "--batches", str(sizes.bench_batches),
           "--steps", str(sizes.bench_steps), "--warmup", "2", "--rounds", "1",
           "--threads", str(opts.threads), "--data", str(work / "data"), "--out", str(out)]
    _run(cmd, work / "bench_train.log")
    results = json.loads(out.read_text()) if out.exists() else []
    done = {r["setting"] for r in results}
    rows = [Row(f"bench {s}", opts.device, "failed", why="bench_train gave no result (see bench/bench_train.log)")
            for s in sizes.bench_settings if s not in done]
    for r in results:
        sps = r["samples_per_s"]
        ceiling = sps.get("ceiling") or float("nan")
        figure = (f"{r['rows']:,} rows: fused {sps['fused']:,.0f}/s = {sps['fused'] / ceiling:.2f} of the ceiling "
                  f"{ceiling:,.0f}/s; fwfm {sps['fused-fwfm'] / ceiling:.2f}; plain {sps['plain']:,.0f}/s")
        rows.append(Row(f"bench {r['setting']}", r["device"], "ok", figure, data=sps))
    return rows


def step_cli(opts: Options) -> list[Row]:
    """``recemb synth`` + ``prepare`` + a 1-epoch ``train`` on the device, through the CLI."""
    sizes, work = opts.sizes, opts.work / "cli"
    script = Path(sys.executable).parent / "recemb"
    recemb = [str(script)] if script.exists() else [sys.executable, "-m", "recemb.cli"]
    env = {"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.perf_counter()
    raw, data = work / "ctr.tsv", work / "prepared"
    _run([*recemb, "synth", "ctr", "--rows", str(sizes.cli_rows), "--out", str(raw),
          *(["--vocab-scale", "0.002"] if sizes.cli_rows < 100_000 else [])], work / "synth.log", env)
    _run([*recemb, "prepare", "--config", "configs/datasets/synthetic_ctr.yaml", "--output", str(data),
          "--overwrite", f"paths=[{raw}]"], work / "prepare.log", env)
    made = time.perf_counter() - t0
    expid = "gpu_check_cli"
    _run([*recemb, "train", "--config", "configs/experiments/deepfm_synthetic_ctr.yaml", "--workers", "0",
          "--mlflow-uri", f"sqlite:///{work / 'mlruns.db'}", f"data_dir={data}", f"train.output_dir={work / 'runs'}",
          f"expid={expid}", f"train.device={opts.device}", "train.epochs=1", "train.progress=false",
          *sizes.cli_overrides], work / "train.log", env)
    result = json.loads((work / "runs" / expid / "result.json").read_text())
    auc = result.get("test", {}).get("auc", float("nan"))
    figure = (f"{sizes.cli_rows:,} rows, 1 epoch: {result['steps']} steps, {result['samples_per_s']:,.0f} samples/s, "
              f"test AUC {auc:.4f}; train {result['seconds']:.0f} s (synth + prepare {made:.0f} s)")
    return [Row("cli train", opts.device, "ok", figure,
                data={k: result.get(k) for k in ("steps", "samples_per_s", "seconds", "test")})]


STEP_FNS: dict[str, Callable[[Options], list[Row]]] = {
    "env": step_env, "shard": step_shard, "adam": step_adam, "bench": step_bench,
    "pipeline": step_pipeline, "cli": step_cli,
}


# ----------------------------------------------------------------------------- running and the table


def _quiet(threads: int) -> None:
    """In a step's own process: torchrec's planner and fbgemm log loudly at INFO/WARNING (keep
    the log readable), and the asked-for torch threads. Not for ``--in-process``: it would
    silence the caller's logging for good."""
    import logging
    import warnings

    logging.getLogger().setLevel(logging.ERROR)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    _threads(threads)


def _threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def run_guarded(name: str, opts: Options) -> list[Row]:
    """Step ``name`` here, its error (if any) turned into a failed row; each row timed."""
    t0 = time.perf_counter()
    try:
        if name != "env":
            _threads(opts.threads)
        rows = STEP_FNS[name](opts)
    except Exception as exc:  # the table reports it and the next step runs
        traceback.print_exc()
        lines = str(exc).strip().splitlines() or [""]
        last = next((ln for ln in reversed(lines) if ln.strip()), "")
        why = f"{type(exc).__name__}: {lines[0][:200]}" + (f" ... {last.strip()[:200]}" if len(lines) > 1 else "")
        rows = [Row(name, opts.device, "failed", why=why)]
    seconds = (time.perf_counter() - t0) / max(1, len(rows))
    for row in rows:
        row.seconds = row.seconds or seconds
    return rows


class ChildRunner:
    """Runs each step as ``gpu_check.py --child STEP`` in a new process group with a time limit,
    so a hang (a stuck nccl collective) or a crash cannot take the run or the table with it."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.proc: subprocess.Popen[str] | None = None

    def kill(self) -> None:
        """Kill the running step and everything it started (its spawned ranks, bench_train)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def __call__(self, name: str, limit: float) -> list[Row]:
        o = self.opts
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--device", o.device, "--size", o.size,
               "--ranks", str(o.ranks), "--work", str(o.work), "--threads", str(o.threads)]
        log = o.work / f"{name}.log"
        t0 = time.perf_counter()
        with log.open("w") as sink:  # a file, not a pipe: what a killed step printed is still there
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, text=True,
                                         start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                self.proc.wait(timeout=limit)
                timed_out = False
            except subprocess.TimeoutExpired:
                self.kill()
                self.proc.wait()
                timed_out = True
        seconds = time.perf_counter() - t0
        output = log.read_text(errors="replace")
        for line in output.splitlines():
            if line.startswith("[env] "):
                print(line, flush=True)
        found = [ln for ln in output.splitlines() if ln.startswith(RESULT)]
        if found:
            return [Row(**r) for r in json.loads(found[-1][len(RESULT):])]
        tail = [ln for ln in output.strip().splitlines() if ln.strip()][-3:]
        why = (f"timed out after {limit:.0f} s" if timed_out else f"exited {self.proc.returncode} without a result")
        print(f"[{name}] {why}; last lines of {log}:\n  " + "\n  ".join(tail), flush=True)
        last = f": {' | '.join(tail)[-240:]}" if tail else " (it printed nothing)"
        return [Row(name, o.device, "failed", why=why + last, seconds=seconds)]


def format_table(rows: list[Row]) -> str:
    """The rows as one pipe table: step, device, seconds, status (with why), figure."""
    head = ["step", "device", "s", "status", "figure"]
    cells = [[r.step, r.device, f"{r.seconds:.1f}", r.status + (f": {r.why}" if r.why else ""), r.figure]
             for r in rows]
    widths = [max(len(head[i]), *(len(c[i]) for c in cells)) if cells else len(head[i]) for i in range(4)]

    def line(values: list[str]) -> str:
        return "| " + " | ".join([*(v.ljust(w) for v, w in zip(values[:4], widths, strict=True)), values[4]]) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|---|"
    return "\n".join([line(head), rule, *(line(c) for c in cells)])


def resolve_options(args: argparse.Namespace, facts: dict[str, Any] | None = None) -> Options:
    """``auto`` device -> cuda when torch sees a GPU; ranks 2 with 2 GPUs (or on CPU), else 1."""
    gpus = int((facts or {}).get("gpus") or 0)
    device = args.device if args.device != "auto" else ("cuda" if gpus else "cpu")
    ranks = args.ranks or (min(2, gpus) if device == "cuda" else 2) or 1
    size = args.size if args.size != "auto" else ("gpu" if device == "cuda" else "cpu")
    return Options(device=device, size=size, ranks=ranks, work=Path(args.work).resolve(), threads=args.threads)


def run_all(args: argparse.Namespace) -> list[Row]:
    """``env``, then every asked-for step that can run, within ``args.budget`` seconds in all."""
    start = time.perf_counter()
    probe = Options(device=args.device if args.device != "auto" else "cpu", size="tiny", ranks=1,
                    work=Path(args.work).resolve(), threads=args.threads)
    probe.work.mkdir(parents=True, exist_ok=True)
    runner = ChildRunner(probe)
    rows: list[Row] = []

    def on_term(signum: int, _frame: Any) -> None:  # the outer `timeout` ran out: still show the table
        runner.kill()
        rows.append(Row("(run)", probe.device, "failed", why=f"stopped by signal {signum} (outer time limit)"))
        print(format_table(rows), flush=True)
        sys.exit(124)

    signal.signal(signal.SIGTERM, on_term)
    env_rows = run_guarded("env", probe) if args.in_process else runner("env", STEP_LIMITS["env"] * args.slow)
    rows += env_rows
    facts = env_rows[0].data
    opts = resolve_options(args, facts)
    runner.opts = opts
    for row in rows:
        row.device = opts.device
    print(f"[gpu_check] device={opts.device} size={opts.size} ranks={opts.ranks} budget={args.budget:.0f} s "
          f"work={opts.work}", flush=True)
    for name in [s for s in STEPS if s in args.steps and s != "env"]:
        why = skip_reason(name, opts.device, facts)
        left = args.budget - (time.perf_counter() - start)
        if not why and left < MIN_STEP_S:
            why = f"no time left ({left:.0f} s of the {args.budget:.0f} s budget)"
        if why:
            new = [Row(name, opts.device, "skipped", why=why)]
        elif args.in_process:
            new = run_guarded(name, opts)
        else:
            new = runner(name, min(STEP_LIMITS[name] * args.slow, left - 5))
        for row in new:
            print(f"[{row.step}] {row.status}{': ' + row.why if row.why else ''} {row.figure} ({row.seconds:.1f} s)",
                  flush=True)
        rows += new
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the checks, print the table; exit 1 when a step failed (skips are not failures)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--size", choices=["auto", *SIZES], default="auto", help="auto: gpu on CUDA, else cpu")
    ap.add_argument("--ranks", type=int, default=0, help="ranks of shard/pipeline (0: 2 with 2 GPUs or on CPU, else 1)")
    ap.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    ap.add_argument("--budget", type=float, default=280.0, help="seconds for all steps together")
    ap.add_argument("--slow", type=float, default=1.0,
                    help="multiply each step's own time limit (a busy CPU machine; keep 1 on a GPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--work", default=str(REPO / "bench-out" / "gpu_check"), help="folder for data, logs, runs")
    ap.add_argument("--json", help="also write the rows (with their numbers) to this JSON file")
    ap.add_argument("--in-process", action="store_true",
                    help="run the steps in this process (tests; no per-step time limit)")
    ap.add_argument("--child", choices=STEPS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        opts = Options(device=args.device, size=args.size, ranks=args.ranks or 1, work=Path(args.work),
                       threads=args.threads)
        if args.child != "env":
            _quiet(opts.threads)
        rows = run_guarded(args.child, opts)
        print(RESULT + json.dumps([dataclasses.asdict(r) for r in rows], default=str), flush=True)
        return 0
    rows = run_all(args)
    print(format_table(rows), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1, default=str))
    return 1 if any(r.status == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
