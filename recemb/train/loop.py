"""The training loop as plain functions: build, shard, train, evaluate, checkpoint.

The loop knows no task: the model of any family (``recemb.models.registry``) gives
the loss of a batch and the metrics of an evaluation (``TaskModel``), so click models
and event models share this loop, its checkpoints, Ray and MLflow.

``train`` runs one experiment on the current process group (one rank when none is
running, so FBGEMM's fused tables still do the work). Ray's worker function
calls the same function on every rank; only rank 0 prints, logs and writes.

Example:
    >>> cfg = load_experiment("configs/experiments/deepfm_synthetic_ctr.yaml")  # doctest: +SKIP
    >>> result = train(cfg)                                                      # doctest: +SKIP
    >>> result.test["auc"]                                                       # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torchrec.optim.optimizers import in_backward_optimizer_filter

from recemb.config.experiment import ExperimentConfig, TrainConfig
from recemb.data.batch import Batch, BatchSource, ParquetSource, epoch_steps, split_rows
from recemb.data.resample import CountSampledSource
from recemb.data.schema import FeatureMap
from recemb.embeddings.base import pad_for_fbgemm
from recemb.embeddings.sharding import (
    ensure_process_group,
    plan_to_dict,
    shard_model,
    table_optimizer,
    unfused_table_params,
)
from recemb.errors import ConfigError, DataError
from recemb.eval.metrics import MetricAccumulator
from recemb.io import write_json_atomic, write_text_atomic
from recemb.models.ctr.objective import BinaryObjective
from recemb.models.registry import TaskModel, build_model, embedding_layers
from recemb.train.checkpoint import (
    TrainState,
    check_resume,
    load_checkpoint,
    read_meta,
    rows_in_epoch,
    save_checkpoint,
)
from recemb.train.schedule import LrScheduler, run_rates

log = logging.getLogger("recemb.train")
MetricsHook = Callable[[int, dict[str, float]], None]
EpochHook = Callable[[int, int, Path, dict[str, float]], None]
StartHook = Callable[[nn.Module, int], None]


class TrainModel(nn.Module):
    """Model + its own loss: returns ``(loss, (data_loss, rows, labels))`` like torchrec's examples.

    The data loss is the model's ``loss(batch, output)`` (CTR: mean binary cross-entropy,
    weighted by ``batch.weights`` when set; APE: noise-contrastive loss); ``rows`` are its
    ``eval_rows(batch, output)`` (CTR: the logits), which its ``metrics`` read at evaluation.
    In training mode, every submodule with a ``regularization() -> Tensor`` method
    (e.g. OptEmbed's threshold prior) adds its term to the first (optimised) loss, and
    so does ``embedding_l2 / 2 * mean_b sum |e|^2`` over the pooled outputs of every
    top-level embedding layer (``embedding_layers``, collected by forward hooks during
    this module's own training forward) when ``embedding_l2 > 0``; the reported loss
    stays the data loss.
    """

    def __init__(self, model: nn.Module, embedding_l2: float = 0.0) -> None:
        super().__init__()
        self.model = model
        # A plain module that returns logits (a test's toy, a benchmark's variant) keeps the CTR objective.
        self._own_objective = isinstance(model, TaskModel)
        # Modules (not parameters) are kept: DMP re-creates meta parameters but keeps modules.
        self._regularized = [m for m in model.modules() if callable(getattr(m, "regularization", None))]
        self.embedding_l2 = embedding_l2
        self._pooled: list[torch.Tensor] | None = None  # a list only inside a training forward
        self._hooks = [layer.register_forward_hook(self._keep_pooled)
                       for layer in embedding_layers(model).values()] if embedding_l2 > 0 else []

    def _keep_pooled(self, module: nn.Module, _inputs: Any, output: Any) -> None:
        if self._pooled is not None and module.training:
            self._pooled.append(output.values())

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        self._pooled = [] if self.training and self._hooks else None
        try:
            output = self.model(batch)
            pooled = self._pooled or []
        finally:
            self._pooled = None
        objective = self.objective()
        loss = objective.loss(batch, output)
        data_loss = loss.detach()
        if self.training:
            for module in self._regularized:
                loss = loss + module.regularization()
            if pooled:
                squares = sum(v.square().sum() for v in pooled)
                loss = loss + 0.5 * self.embedding_l2 * squares / batch.batch_size
        return loss, (data_loss, objective.eval_rows(batch, output), batch.labels)

    def objective(self) -> TaskModel | BinaryObjective:
        """Whose ``loss``/``eval_rows``/``metrics`` apply: the model's own, else the binary (CTR) one."""
        return self.model if self._own_objective else _BINARY


_BINARY = BinaryObjective()


def objective_of(model: nn.Module) -> TaskModel | BinaryObjective:
    """The objective of the ``TrainModel`` in ``model`` (itself, or DMP over one)."""
    inner: Any = model
    while not isinstance(inner, TrainModel) and hasattr(inner, "module"):
        inner = inner.module
    if not isinstance(inner, TrainModel):
        raise TypeError(f"expected a TrainModel (or DMP over one), got {type(model).__name__}")
    return inner.objective()


@dataclass
class TrainResult:
    """What a run produced: best validation metrics, test metrics, where files are.

    ``trained_rows``: the training rows each completed epoch used, over all ranks (the epochs
    this process finished; an epoch resumed mid-way counts its rows before the stop too).
    """

    expid: str
    output_dir: str
    steps: int
    epochs_run: int
    samples_per_s: float
    best_valid: dict[str, float]
    test: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    embedding_bytes: int = 0
    full_bytes: int = 0
    seconds: float = 0.0
    run_id: str = ""
    first_step_seconds: float = 0.0
    trained_rows: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (the model init and dropout)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def aux_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Parameter groups that modules ask to train apart from the dense optimizer.

    A module with ``optimizer_groups() -> list[{"params": [...], "lr": float}]`` (e.g.
    OptEmbed's pruning thresholds, which need their own learning rate) gets those
    parameters stepped by the auxiliary Adam of ``aux_optimizer`` instead.
    """
    groups: list[dict[str, Any]] = []
    for m in model.modules():
        fn = getattr(m, "optimizer_groups", None)
        if callable(fn):
            groups.extend(g for g in fn() if g["params"])
    return groups


def aux_optimizer(model: nn.Module) -> torch.optim.Optimizer | None:
    """Adam over ``aux_param_groups(model)`` (each group's own lr), or None when there are none."""
    groups = aux_param_groups(model)
    return torch.optim.Adam(groups) if groups else None


def dense_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Optimizer for the dense parameters: neither fused tables, data-parallel tables nor aux groups.

    Parameters a module lists in ``no_weight_decay()`` get no ``dense_weight_decay``.
    """
    tables = {id(p) for p in unfused_table_params(model)}
    tables |= {id(p) for g in aux_param_groups(model) for p in g["params"]}
    params = [
        p for _, p in in_backward_optimizer_filter(model.named_parameters())
        if p.requires_grad and id(p) not in tables
    ]
    kinds: dict[str, type[torch.optim.Optimizer]] = {
        "adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD,
    }
    # Modules name parameters that weight decay would harm (e.g. lowprec's log step sizes).
    exempt = {id(p) for m in model.modules() if callable(getattr(m, "no_weight_decay", None))
              for p in m.no_weight_decay()}
    groups: list[dict[str, Any]] = [{"params": [p for p in params if id(p) not in exempt]}]
    if exempt and cfg.dense_weight_decay:
        groups.append({"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0})
    else:
        groups[0]["params"] = params
    return kinds[cfg.dense_optimizer](groups, lr=cfg.dense_lr, weight_decay=cfg.dense_weight_decay)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when visible, else CPU; ``cuda`` without a GPU is a config error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible (use cpu or auto)")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def monitor_score(metrics: dict[str, float], monitor: dict[str, float]) -> float:
    """Weighted sum of monitored metrics; higher is better (NaN counts as -inf)."""
    score = sum(w * metrics[k] for k, w in monitor.items())
    return -math.inf if math.isnan(score) else score


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def evaluate(model: nn.Module, batches: Iterable[Batch], device: torch.device) -> dict[str, float]:
    """Exact metrics of ``model`` (a ``TrainModel``, or DMP over one) over ``batches``, merged
    across ranks; which metrics is the model's own ``metrics``."""
    acc = MetricAccumulator(compute_fn=objective_of(model).metrics)
    model.eval()
    with torch.no_grad():
        for batch in batches:
            _, (_, rows, labels) = model(batch.to(device))
            acc.update(rows.float().cpu(), labels.cpu())
    model.train()
    return acc.compute()


def _skip_rows(it: Iterator[Batch], rows: int, world: int) -> Iterator[Batch]:
    """``it`` without its first ``rows`` rows over all ranks (whole batches).

    Every rank holds an equal slice of each global batch (ParquetBatches, Ray's equal
    splits), so a local batch of ``b`` rows is ``b * world`` rows of the epoch.
    """
    skipped = 0
    for batch in it:
        if skipped >= rows:
            yield batch
            continue
        skipped += batch.batch_size * world
        if skipped > rows:
            raise DataError(f"resuming {rows:,} rows into the epoch, but its batches end at row {skipped:,} "
                            "(the data or the global batch changed since the checkpoint)")


def train(
    cfg: ExperimentConfig,
    device: torch.device | None = None,
    resume: str | Path | None = None,
    on_metrics: MetricsHook | None = None,
    stop_after_steps: int = 0,
    source: BatchSource | None = None,
    on_epoch_end: EpochHook | None = None,
    on_start: StartHook | None = None,
) -> TrainResult:
    """Train ``cfg`` on this process group; evaluate on valid (and test at the end).

    ``resume`` is a checkpoint folder (or the run folder, meaning its ``last``
    checkpoint); its files are verified, ``cfg`` may differ from the saved config only
    where ``checkpoint.check_resume`` allows (a ``ConfigError`` lists every other
    change), and training goes on at the row of the epoch where it stopped. ``on_metrics(step, metrics)`` is called on every rank after each
    evaluation (Ray reports and MLflow logging hook in here). ``stop_after_steps``
    stops early after a checkpoint at that step, to test resuming. ``source``
    gives the batches (default: this rank's share of the prepared Parquet).
    ``on_epoch_end(epoch, step, checkpoint, metrics)`` runs on every rank after
    each completed epoch's checkpoint; ``metrics`` holds the last validation
    metrics and ``train_rows``, the rows trained in that epoch over all ranks.
    ``on_start(model, step)`` runs on every rank once the sharded model is built
    (and restored when resuming, ``step`` > 0) and before the first step: to save
    initial weights or to load given ones.
    """
    t_start = time.perf_counter()
    tc = cfg.train
    device = device or resolve_device(tc.device)
    seed_everything(tc.seed)
    pg = ensure_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    data_dir = Path(cfg.data_dir)
    fm = FeatureMap.load(data_dir / "feature_map.json")
    out_dir = Path(tc.output_dir) / cfg.expid
    ckpt_dir = out_dir / "checkpoints"

    sampled = tc.counts == "sample"
    if sampled and not fm.count_column:
        raise ConfigError(f"train.counts=sample: the data in {data_dir} has no count column (count_column at "
                          "prepare); use train.counts=weight")
    rows_per_epoch = epoch_train_rows(tc, fm, data_dir)
    if not tc.batch_size:  # picked from the rows; the run's saved config names the batch it trained with
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(tc, batch_size=auto_batch_size(rows_per_epoch, world)))
        tc = cfg.train
        if _is_rank0():
            print(auto_batch_note(rows_per_epoch, tc.batch_size, world), flush=True)
    model = TrainModel(build_model(cfg.model, fm, cfg.embedding, device=torch.device("meta")),
                       embedding_l2=cfg.embedding.l2)
    padded = pad_for_fbgemm(model)  # widths FBGEMM cannot run (embedding.dim=10) are held 12 wide
    layers = list(embedding_layers(model.model).values())
    emb_bytes = sum(layer.parameter_bytes() for layer in layers)
    full_bytes = sum(layer.full_bytes() for layer in layers)
    sharded = shard_model(model, cfg.embedding, device, pg, batch_size=tc.batch_size)
    dmp = sharded.model
    opt = dense_optimizer(dmp, tc)
    table_opt = table_optimizer(dmp, cfg.embedding)
    aux_opt = aux_optimizer(dmp)
    state = TrainState(model=dmp, dense_optimizer=opt, fused_optimizer=dmp.fused_optimizer,
                       table_optimizer=table_opt, aux_optimizer=aux_opt, widths=padded)
    # Built before a checkpoint is loaded: the starting rates are the configured ones.
    rates, push_rates = run_rates(dmp, opt, table_opt, dmp.fused_optimizer)
    total_steps = run_steps(tc, rows_per_epoch, world)
    schedule = LrScheduler(tc.lr_schedule, total_steps, rates, push_rates)
    warning = few_steps_warning(tc, rows_per_epoch, world)
    if warning and _is_rank0():
        print(warning, flush=True)

    if _is_rank0():
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_json_atomic(out_dir / "sharding_plan.json", plan_to_dict(sharded.plan))
        ratio = emb_bytes / full_bytes if full_bytes else float("nan")
        print(f"[embedding] kind={cfg.embedding.kind} budget={cfg.embedding.budget} bytes={emb_bytes:,} "
              f"full={full_bytes:,} ratio={ratio:.4f}", flush=True)
        padding = sum(m.padding_bytes() for layer in layers for m in layer.modules()
                      if callable(getattr(m, "padding_bytes", None)))
        if padding:
            print(f"[embedding] FBGEMM runs table widths divisible by 4 only: narrower ones are held padded, "
                  f"{padding:,} of the bytes above are padding", flush=True)
        log.info("sharding plan:\n%s", sharded.plan)

    start_step, start_epoch, skip_rows = 0, 0, 0
    history: list[dict[str, float]] = []
    best: dict[str, float] = {}
    best_score, bad_evals = -math.inf, 0
    if resume is not None:
        path = Path(resume)
        if not (path / "meta.json").exists():
            path = path / "checkpoints" / "last"
        check_resume(path, read_meta(path), cfg.to_dict(), world)
        meta = load_checkpoint(path, state)
        start_step, start_epoch = meta["step"], meta["epoch"]
        skip_rows = rows_in_epoch(meta)
        history = meta["extra"].get("history", [])
        best = meta["extra"].get("best", {})
        best_score = meta["extra"].get("best_score", -math.inf)
        bad_evals = meta["extra"].get("bad_evals", 0)
        if "lr_schedule" in meta["extra"]:
            schedule.load_state_dict(meta["extra"]["lr_schedule"], where=f"{path}/meta.json")
    if on_start is not None:
        on_start(dmp, start_step)

    source = source or ParquetSource(fm, data_dir, shuffle_rows=tc.shuffle_rows, seed=tc.seed,
                                     rank=rank, world_size=world)
    if sampled:  # train rows drawn by count, in this process (Ray Data or not); valid/test as before
        source = CountSampledSource(source, fm, data_dir, epoch_rows=tc.epoch_rows, seed=tc.seed, rank=rank,
                                    world_size=world)

    def batches(split: str, size: int, epoch: int = 0) -> Iterable[Batch]:
        return source.batches(split, size, epoch)

    def checkpoint(name: str, step: int, epoch: int, position: int) -> None:
        """``position``: rows of ``epoch`` trained so far over all ranks (0 when ``epoch`` starts)."""
        extra = {"rows_in_epoch": position, "history": history, "best": best,
                 "best_score": best_score, "bad_evals": bad_evals, "lr_schedule": schedule.state_dict()}
        save_checkpoint(ckpt_dir / name, state, step=step, epoch=epoch, config=cfg.to_dict(), extra=extra)

    step, samples, train_seconds, first_step_at = start_step, 0, 0.0, 0.0
    used_rows: list[int] = []
    # A run resumed after it stopped early (or reached max_steps) has nothing left to train.
    stop = patience_spent(bad_evals, tc.patience) or bool(tc.max_steps and step >= tc.max_steps)
    epoch = start_epoch
    progress = _progress(tc, rank)
    for epoch in range(start_epoch, tc.epochs):
        if stop:
            break
        it = iter(batches("train", tc.batch_size, epoch))
        rows = 0
        in_epoch = skip_rows if epoch == start_epoch else 0  # rows of this epoch trained, over all ranks
        if in_epoch:
            it = _skip_rows(it, in_epoch, world)
        running = 0.0
        t0 = time.perf_counter()
        for batch in it:
            batch = batch.to(device)
            schedule.apply(step)
            loss, _ = dmp(batch)
            opt.zero_grad()
            if table_opt is not None:
                table_opt.zero_grad()
            if aux_opt is not None:
                aux_opt.zero_grad()
            loss.backward()
            if tc.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                               tc.clip_grad_norm)
            opt.step()
            if table_opt is not None:
                table_opt.step()
            if aux_opt is not None:
                aux_opt.step()
            step += 1
            if not first_step_at:
                first_step_at = time.perf_counter() - t_start
            in_epoch += batch.batch_size * world
            samples += batch.batch_size
            rows += batch.batch_size
            value = float(loss.detach())
            running = 0.98 * running + 0.02 * value if step > start_step + 1 else value
            progress(batch.batch_size, running)
            end_of_run = tc.max_steps and step >= tc.max_steps
            if (tc.eval_every_steps and step % tc.eval_every_steps == 0) or end_of_run:
                train_seconds += time.perf_counter() - t0
                best_score, bad_evals, improved = _eval_step(
                    dmp, batches, tc, device, step, epoch, history, best_score, bad_evals, on_metrics, schedule)
                if improved:
                    best = history[-1]
                    checkpoint("best", step, epoch, in_epoch)
                checkpoint("last", step, epoch, in_epoch)
                t0 = time.perf_counter()
                if patience_spent(bad_evals, tc.patience):
                    stop = True
            if stop_after_steps and step >= stop_after_steps:
                checkpoint("last", step, epoch, in_epoch)
                return TrainResult(cfg.expid, str(out_dir), step, epoch, 0.0, best, {}, history)
            if stop or end_of_run:
                break
        train_seconds += time.perf_counter() - t0
        if stop or (tc.max_steps and step >= tc.max_steps):
            break
        used_rows.append(in_epoch)
        if _is_rank0():
            print(f"\n[epoch] {epoch}: {_rows_line(in_epoch, split_rows(fm, data_dir, 'train'), world)}",
                  flush=True)
        if not (tc.eval_every_steps and step % tc.eval_every_steps == 0):
            best_score, bad_evals, improved = _eval_step(
                dmp, batches, tc, device, step, epoch, history, best_score, bad_evals, on_metrics, schedule)
            if improved:
                best = history[-1]
                checkpoint("best", step, epoch + 1, 0)
            if patience_spent(bad_evals, tc.patience):
                checkpoint("last", step, epoch + 1, 0)
                break
        checkpoint("last", step, epoch + 1, 0)
        if on_epoch_end is not None:
            total = torch.tensor([rows], dtype=torch.int64)
            dist.all_reduce(total, group=pg)
            last = dict(history[-1]) if history else {}
            on_epoch_end(epoch, step, ckpt_dir / "last", {**last, "train_rows": int(total.item())})
    if (ckpt_dir / "best").exists():
        load_checkpoint(ckpt_dir / "best", state)
    test = evaluate(dmp, batches("test", tc.eval_batch_size), device) if source.has_split("test") else {}
    result = TrainResult(
        expid=cfg.expid, output_dir=str(out_dir), steps=step, epochs_run=epoch + 1,
        samples_per_s=samples * world / train_seconds if train_seconds else 0.0,
        best_valid=best, test=test, history=history, embedding_bytes=emb_bytes, full_bytes=full_bytes,
        seconds=time.perf_counter() - t_start, first_step_seconds=first_step_at, trained_rows=used_rows,
    )
    if _is_rank0():
        print(f"[metrics] split=test step={step} " + _fmt(test), flush=True)
        write_json_atomic(out_dir / "result.json", result.to_dict())
        _append_results_csv(Path(tc.output_dir) / "results.csv", cfg, result)
    return result


def patience_spent(bad_evals: int, patience: int) -> bool:
    """Whether early stopping ends the run: ``patience`` evaluations in a row have not improved
    the monitored score (``train.patience``; 0 never stops early).

    Example:
        >>> [patience_spent(bad, 2) for bad in (0, 1, 2)], patience_spent(5, 0)
        ([False, False, True], False)
    """
    return patience > 0 and bad_evals >= patience


AUTO_BATCH_STEPS = 100  # train.batch_size=0: the batch gives every epoch at least this many steps
AUTO_BATCH_MIN, AUTO_BATCH_MAX = 64, 4096


def auto_batch_size(rows_per_epoch: int, world_size: int = 1) -> int:
    """The batch (per rank) that ``train.batch_size=0`` trains with: the largest power of two in
    [``AUTO_BATCH_MIN``, ``AUTO_BATCH_MAX``] whose epoch still takes ``AUTO_BATCH_STEPS`` steps.

    Small data gets many small steps an epoch, large data the throughput of big batches (4,096
    from 409,600 rows an epoch on one rank); the cap is where 1M-row runs were measured.

    Example:
        >>> auto_batch_size(40_066), auto_batch_size(7_990), auto_batch_size(800_000), auto_batch_size(40_066, 2)
        (256, 64, 4096, 128)
    """
    per_rank = rows_per_epoch // max(world_size, 1)
    batch = AUTO_BATCH_MIN
    while batch * 2 <= AUTO_BATCH_MAX and batch * 2 * AUTO_BATCH_STEPS <= per_rank:
        batch *= 2
    return batch


def auto_batch_note(rows_per_epoch: int, batch_size: int, world_size: int = 1) -> str:
    """The line a run prints when ``train.batch_size=0`` picked its batch.

    Example:
        >>> auto_batch_note(40_066, 256)
        '[train] batch_size 256 (40,066 rows an epoch, 157 steps; train.batch_size=0 picks it)'
    """
    return (f"[train] batch_size {batch_size:,} ({rows_per_epoch:,} rows an epoch, "
            f"{epoch_steps(rows_per_epoch, batch_size, world_size):,} steps; train.batch_size=0 picks it)")


def resolved_batch_size(tc: TrainConfig, rows_per_epoch: int, world_size: int = 1) -> int:
    """``train.batch_size``, or the batch ``auto_batch_size`` picks for it when it is 0."""
    return tc.batch_size or auto_batch_size(rows_per_epoch, world_size)


def epoch_train_rows(tc: TrainConfig, fm: FeatureMap, data_dir: str | Path) -> int:
    """Rows an epoch trains on: ``train.epoch_rows`` when rows are sampled by count, else the train split's."""
    return (tc.epoch_rows if tc.counts == "sample" else 0) or split_rows(fm, data_dir, "train")


MIN_RUN_STEPS = 100  # fewer optimizer steps than this in a whole run: the defaults barely train


def few_steps_warning(tc: TrainConfig, rows_per_epoch: int, world_size: int) -> str:
    """A one-line warning when the whole run takes under ``MIN_RUN_STEPS`` optimizer steps
    (``train.max_steps`` aside: a cap is asked for), saying what to change; else ``""``.

    Example:
        >>> few_steps_warning(TrainConfig(epochs=1, batch_size=4096), 49_041, 1)  # doctest: +ELLIPSIS
        '[warning] this run takes only 12 optimizer steps (49,041 rows an epoch / batch 4,096 x 1 epoch): ...'
    """
    given = resolved_batch_size(tc, rows_per_epoch, world_size)
    steps = tc.epochs * epoch_steps(rows_per_epoch, given, world_size)
    if steps >= MIN_RUN_STEPS:
        return ""
    ranks = f" x {world_size} ranks" if world_size > 1 else ""
    line = (f"[warning] this run takes only {steps:,} optimizer steps ({rows_per_epoch:,} rows an epoch / batch "
            f"{given:,}{ranks} x {tc.epochs} epoch{'s' if tc.epochs > 1 else ''}): too few to learn much")
    batch = given
    while batch > 64 and epoch_steps(rows_per_epoch, batch, world_size) * 4 < MIN_RUN_STEPS:
        batch //= 2
    per_epoch = epoch_steps(rows_per_epoch, batch, world_size)
    hints = [f"train.batch_size={batch} ({per_epoch} steps an epoch)"] if batch < given else []
    if per_epoch * tc.epochs < MIN_RUN_STEPS and per_epoch:
        hints.append(f"train.epochs={-(-MIN_RUN_STEPS // per_epoch)} or more with early stopping (train.patience)")
    return line + (f"; set {' and '.join(hints)}" if hints else "; use more data")


def _rows_line(used: int, rows: int, world: int) -> str:
    """How many rows an epoch trained, against the train split's (and why a few were left over)."""
    line = f"trained {used:,} rows (the train split has {rows:,})"
    if 0 < rows - used < world:
        line += f"; {rows - used} left over, as the last batch is split evenly over {world} ranks"
    return line


def run_steps(tc: TrainConfig, train_rows: int, world_size: int) -> int:
    """Optimizer steps the whole run takes: epochs x steps per epoch, capped by ``max_steps``.

    Example:
        >>> run_steps(TrainConfig(epochs=3, batch_size=1000, max_steps=25), train_rows=10_000, world_size=1)
        25
    """
    steps = tc.epochs * epoch_steps(train_rows, resolved_batch_size(tc, train_rows, world_size), world_size)
    return min(steps, tc.max_steps) if tc.max_steps else steps


def _fmt(metrics: dict[str, float]) -> str:
    keys = ("auc", "logloss", "ne", "calibration", "ap", "precision_at_k", "recall_at_k", "nce_loss",
            "unseen_share")
    rates = " ".join(f"{k}={metrics[k]:.3g}" for k in ("lr_dense", "lr_embedding") if k in metrics)
    return " ".join([f"{k}={metrics[k]:.5f}" for k in keys if k in metrics] + ([rates] if rates else []))


def _eval_step(
    dmp: nn.Module, batches: Callable[..., Iterable[Batch]], tc: TrainConfig, device: torch.device,
    step: int, epoch: int, history: list[dict[str, float]], best_score: float, bad_evals: int,
    on_metrics: MetricsHook | None, schedule: LrScheduler,
) -> tuple[float, int, bool]:
    metrics = evaluate(dmp, batches("valid", tc.eval_batch_size), device)
    # The rates of the steps just evaluated, when a schedule changes them.
    rates = schedule.current() if schedule.active else {}
    metrics = {**metrics, **rates, "step": step, "epoch": epoch}
    history.append(metrics)
    if _is_rank0():
        print(f"\n[metrics] split=valid step={step} epoch={epoch} " + _fmt(metrics), flush=True)
    if on_metrics is not None:
        on_metrics(step, metrics)
    score = monitor_score(metrics, tc.monitor)
    if schedule.observe(score) and _is_rank0():
        print(f"[lr] no improvement in {tc.lr_schedule.patience} evaluation(s): learning rates x"
              f"{tc.lr_schedule.factor:g} (now {schedule.multiplier(step):g} x the configured ones, "
              f"min_lr {tc.lr_schedule.min_lr:g})", flush=True)
    if score > best_score:
        return score, 0, True
    return best_score, bad_evals + 1, False


def _progress(tc: TrainConfig, rank: int) -> Callable[[int, float], None]:
    if not tc.progress or rank != 0:
        return lambda n, loss: None
    from tqdm import tqdm

    bar = tqdm(unit="samples", unit_scale=True, dynamic_ncols=True, mininterval=2.0)

    def update(n: int, loss: float) -> None:
        bar.update(n)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    return update


def _append_results_csv(path: Path, cfg: ExperimentConfig, result: TrainResult) -> None:
    """One line per run (FuxiCTR-style), appended; the header is written once."""
    row = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "expid": cfg.expid, "model": cfg.model.name,
        "embedding": cfg.embedding.kind, "dataset": cfg.dataset_id, "steps": result.steps,
        "valid_auc": result.best_valid.get("auc"), "valid_logloss": result.best_valid.get("logloss"),
        "test_auc": result.test.get("auc"), "test_logloss": result.test.get("logloss"),
        "samples_per_s": round(result.samples_per_s, 1), "embedding_bytes": result.embedding_bytes,
        "full_bytes": result.full_bytes, "output_dir": result.output_dir,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


__all__ = ["TrainModel", "TrainResult", "objective_of", "aux_optimizer", "aux_param_groups", "dense_optimizer", "evaluate",
           "auto_batch_note", "auto_batch_size", "epoch_train_rows", "few_steps_warning", "monitor_score", "patience_spent",
           "resolved_batch_size", "run_steps", "train"]
