"""``recemb train``: one experiment in-process, or on Ray Train with N workers.

With ``workers == 0`` the loop runs in this process (one gloo rank). With
``workers >= 1`` a Ray ``TorchTrainer`` starts the workers and their process group;
each worker builds the model on the meta device and wraps it with torchrec's
``DistributedModelParallel`` itself (never Ray's ``prepare_model``, which is DDP),
reads its equal Ray Data split, reports at the same cadence on every rank and
checkpoints each epoch, so ``FailureConfig`` restarts from the last epoch.
Every run is tracked in MLflow (rank 0 only).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pipelines.ray_runtime  # noqa: F401  (sets Ray's environment before anything imports ray)
from pipelines.ray_progress import BoardTracker, ProgressWatch, StartupClock, TrackingRelay, start_board
from recemb.config.experiment import ClusterConfig, ExperimentConfig, load_experiment
from recemb.config.loader import from_dict
from recemb.data.schema import FeatureMap
from recemb.errors import ConfigError, RecembError
from recemb.tracking import TAG_CHECKPOINT_DIR, TAG_EMBEDDING_BYTES, TAG_FULL_BYTES, TAG_WORLD_SIZE, Tracker
from recemb.train.quiet import quiet_known_warnings

if TYPE_CHECKING:
    from recemb.train.loop import TrainResult


def quiet_logs() -> None:
    """torchrec and fbgemm log at INFO by default; keep the console readable: WARNING and up,
    without the known-harmless library warnings (``recemb.train.quiet``)."""
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    quiet_known_warnings()


def _finish_tracking(tracker: Tracker, cfg: ExperimentConfig, result: TrainResult) -> None:
    tracker.log_metrics(result.steps, result.test, split="test")
    # The best evaluation by train.monitor (whose checkpoint the test metrics come from), as
    # best_valid_<metric>: what `recemb runs list` shows.
    best = {k: v for k, v in result.best_valid.items() if k not in ("step", "epoch") and not k.startswith("lr_")}
    if best:
        tracker.log_metrics(int(result.best_valid.get("step", result.steps)), best, split="best_valid")
    tracker.set_tags({
        TAG_EMBEDDING_BYTES: result.embedding_bytes,
        TAG_FULL_BYTES: result.full_bytes,
        TAG_CHECKPOINT_DIR: str(Path(result.output_dir).resolve() / "checkpoints"),
        "recemb.samples_per_s": round(result.samples_per_s, 1),
    })
    out = Path(result.output_dir)
    for name in ("config.yaml", "sharding_plan.json", "result.json"):
        if (out / name).exists():
            tracker.log_artifact(out / name)
    data = Path(cfg.data_dir)
    for name in ("feature_map.json", "stats.json"):
        if (data / name).exists():
            tracker.log_artifact(data / name, artifact_path="data")


def apply_cluster_args(
    cluster: ClusterConfig, workers: int | None, address: str | None, mlflow_uri: str | None,
) -> ClusterConfig:
    """``cluster`` with the command line's ``--workers/--address/--mlflow-uri`` (where given),
    validated like the config file's values (``--workers -3`` is a ``ConfigError``)."""
    given = {k: v for k, v in (("workers", workers), ("address", address), ("mlflow_uri", mlflow_uri))
             if v is not None}
    try:
        return dataclasses.replace(cluster, **given)
    except ValueError as exc:
        raise ConfigError(f"command line: cluster: {exc}") from None


def check_experiment(cfg: ExperimentConfig) -> FeatureMap:
    """Everything that can be checked before a run is tracked: the prepared data's feature map
    exists and the whole config fits it and the device (``recemb.train.preflight.check_run``:
    kinds, params, budgets per block, the sparse optimizer). Returns the feature map."""
    from recemb.train.preflight import check_run  # torch and torchrec: seconds, so only when checking

    fm = FeatureMap.load(Path(cfg.data_dir) / "feature_map.json")
    check_run(cfg, fm)
    return fm


def join_ray(cfg: ExperimentConfig) -> str:
    """Join (or start) Ray for ``cfg`` and check that it can schedule the run; returns the
    process-group backend (gloo or nccl). A local Ray that cannot is a ``ConfigError``."""
    from pipelines.ray_runtime import check_train_resources, init_ray, is_local

    backend = cfg.cluster.backend
    if backend == "auto":
        backend = "nccl" if cfg.train.device == "cuda" else "gloo"
    init_ray(cfg.cluster.address)
    check_train_resources(cfg.cluster.workers, cfg.cluster.cpus_per_worker, gpus=backend == "nccl",
                          local=is_local(cfg.cluster.address))
    return backend


def _load_and_check(load: Callable[[], ExperimentConfig],
                    clock: StartupClock) -> tuple[ExperimentConfig, FeatureMap]:
    """``load()`` the config, ``check_experiment`` it, then import MLflow (the run is created
    next): the driver's seconds of imports and model building, run while the other thread
    waits for Ray to start."""
    cfg = load()
    fm = check_experiment(cfg)
    clock.mark("checked")
    import mlflow  # noqa: F401  (only to have it imported when the run is created)

    return cfg, fm


def _check_while_ray_starts(load: Callable[[], ExperimentConfig], clock: StartupClock,
                            address: str) -> tuple[ExperimentConfig, FeatureMap]:
    """Load and check the config (``load``, ``check_experiment``: torch, torchrec and the model
    on the meta device, seconds) in a thread while this thread starts (or joins) the Ray at
    ``address``: Ray's start is mostly waiting on its own processes. Then ``join_ray`` checks
    that Ray can schedule the run; a config naming another cluster than ``address`` restarts
    Ray there.

    Errors come in the order they did one after the other: the config's and the preflight's
    first (and a Ray started here for them is shut down again), then Ray's. Returns the config
    and its feature map.
    """
    import ray  # here, before the thread starts importing: one thread imports Ray's modules

    from pipelines.ray_runtime import init_ray

    started_here = not ray.is_initialized()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="recemb-preflight") as pool:
        checked = pool.submit(_load_and_check, load, clock)
        ray_error: BaseException | None = None
        try:
            init_ray(address)
            clock.mark("ray")
        except BaseException as exc:  # raised after the config's own errors, as before
            ray_error = exc
        try:
            cfg, fm = checked.result()
        except BaseException:
            if started_here and ray.is_initialized():
                ray.shutdown()
            raise
    if ray_error is not None:
        raise ray_error
    if cfg.cluster.address != address:  # the config file names the cluster: go there instead
        if started_here:
            ray.shutdown()
    join_ray(cfg)
    return cfg, fm


def _resume_path(resume: str | Path | None, mlflow_uri: str) -> Path | None:
    """A path as given, or an MLflow run id's ``<checkpoint_dir>/last``."""
    if resume is None or Path(resume).exists():
        return Path(resume) if resume is not None else None
    text = str(resume)
    if len(text) == 32 and all(c in "0123456789abcdef" for c in text):
        from recemb.tracking import resolve_run

        folder = resolve_run(mlflow_uri, text).get("checkpoint_dir")
        if folder and (Path(folder) / "last").exists():
            return Path(folder) / "last"
        raise RecembError(f"MLflow run {text} has no checkpoint folder with a 'last' checkpoint")
    raise RecembError(f"--resume {text}: no such checkpoint or run folder, and not an MLflow run id")


def run_train(
    config: str | Path | ExperimentConfig,
    overrides: list[str] | None = None,
    resume: str | Path | None = None,
    workers: int | None = None,
    address: str | None = None,
    mlflow_uri: str | None = None,
    fail: dict[str, Any] | None = None,
) -> TrainResult:
    """Train the experiment at ``config``, tracked in MLflow; returns its result.

    ``workers``/``address``/``mlflow_uri`` override the config's ``cluster`` block;
    ``resume`` is a checkpoint folder, a run folder, or an MLflow run id.
    """
    global _CALLED
    # The first call counts from the process's start (imports included); a later call in the
    # same process (a notebook, tools/bench_scale.py) from its own start.
    clock = StartupClock(None if not _CALLED else time.time())
    if not _CALLED:
        clock.mark("imported", _IMPORTED_AT)
    _CALLED = True
    quiet_logs()

    def load_config() -> ExperimentConfig:
        loaded = config if isinstance(config, ExperimentConfig) else load_experiment(config, overrides)
        loaded.cluster = apply_cluster_args(loaded.cluster, workers, address, mlflow_uri)
        clock.mark("config")
        return loaded

    if workers is not None and workers > 0:
        # Ray asked for on the command line: start it while the config loads and is checked
        # (loading imports torch and torchrec: seconds). Refuses a run Ray could never schedule
        # before it is tracked.
        cfg, fm = _check_while_ray_starts(load_config, clock, address or "")
    else:
        loaded = load_config()
        if loaded.cluster.workers <= 0:
            cfg, fm = loaded, check_experiment(loaded)
        else:
            cfg, fm = _check_while_ray_starts(lambda: loaded, clock, loaded.cluster.address)
    if not cfg.train.batch_size:
        # Picked here, before the run is tracked, so that MLflow's train.batch_size is the batch
        # the run trains with (0 there told nothing), and a Ray run's console shows the line too.
        from recemb.train.loop import auto_batch_note, auto_batch_size, epoch_train_rows

        rows, world = epoch_train_rows(cfg.train, fm, cfg.data_dir), max(1, cfg.cluster.workers)
        cfg.train.batch_size = auto_batch_size(rows, world)
        print(auto_batch_note(rows, cfg.train.batch_size, world), flush=True)
    if cfg.cluster.workers > 0:
        from recemb.train.loop import epoch_train_rows, few_steps_warning

        # The workers' own lines do not reach this console (log_to_driver=False): warn here.
        warning = few_steps_warning(cfg.train, epoch_train_rows(cfg.train, fm, cfg.data_dir), cfg.cluster.workers)
        if warning:
            print(warning, flush=True)
    tracker = Tracker.from_config(cfg, rank=0)
    resume = _resume_path(resume, tracker.uri)
    # The run's world is the Ray workers (or this one process), whatever group the driver may hold.
    tags = {TAG_WORLD_SIZE: str(max(1, cfg.cluster.workers))}
    if resume:
        tags["recemb.resumed_from"] = str(resume)
    run_id = tracker.start(cfg, tags=tags)
    tracker.log_params_from_config(cfg)
    print(f"[mlflow] run {run_id} ({cfg.expid}) in {tracker.uri}", flush=True)
    clock.mark("mlflow")
    try:
        if cfg.cluster.workers <= 0:
            from recemb.train.loop import train

            result = train(cfg, resume=resume, on_metrics=tracker.metrics_hook("valid"))
        else:
            result = _train_on_ray(cfg, tracker, resume, fail, clock)
        _finish_tracking(tracker, cfg, result)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    result.run_id = run_id
    return result


def _worker_loop(config: dict[str, Any]) -> None:
    """Body of every Ray Train worker: same ``train`` as in-process, Ray Data in, reports out."""
    entered = time.time()
    quiet_logs()
    import ray.train
    from ray.train import Checkpoint

    from pipelines.ray_data import FailureInjection, RayDataSource

    cfg = from_dict(ExperimentConfig, config["cfg"], where="ray worker config")
    rank = ray.train.get_context().get_world_rank()
    fm = FeatureMap.load(Path(cfg.data_dir) / "feature_map.json")
    fail = FailureInjection(**config["fail"]) if config.get("fail") else None
    source = RayDataSource(fm, shuffle_rows=cfg.train.shuffle_rows, seed=cfg.train.seed, fail=fail,
                           progress=config.get("progress") if rank == 0 else None)
    poster = source.poster  # rank 0's start-up marks go to the driver's line
    if poster is not None:
        poster.mark("wimported", _IMPORTED_AT)
        poster.mark("worker", entered)
    resume = config.get("resume")
    restored = ray.train.get_checkpoint()
    if restored is not None:
        resume = restored.to_directory()
    from recemb.train.loop import auto_batch_size, epoch_train_rows, train  # torchrec: seconds

    if poster is not None:
        poster.mark("wlibs")
    if resume is None and cfg.train.counts != "sample":
        # Ray Data's wait for the first batch runs beside the MLflow start and the model build
        # (every rank opens it: they share one streaming split).
        world = ray.train.get_context().get_world_size()
        source.open_train(cfg.train.batch_size or auto_batch_size(epoch_train_rows(cfg.train, fm, cfg.data_dir), world))
    # Rank 0's MLflow records go to the driver through the progress board (the driver writes them
    # to its run): no MLflow import or store in the workers.
    tracker = BoardTracker(config.get("progress") if rank == 0 else None)
    tracker.resumed()
    if restored is not None:
        tracker.set_tags({"recemb.restored_from": str(restored.path)})

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        tracker.log_metrics(step, metrics, split="valid")
        ray.train.report({f"valid_{k}": v for k, v in metrics.items()})

    def on_epoch_end(epoch: int, step: int, path: Path, metrics: dict[str, float]) -> None:
        tracker.log_metrics(step, {f"train_rows_epoch{epoch}": metrics["train_rows"]})
        report = {f"valid_{k}": v for k, v in metrics.items()}
        report.update({"epoch_done": epoch, "step": step, f"train_rows_epoch{epoch}": metrics["train_rows"]})
        ray.train.report(report, checkpoint=Checkpoint.from_directory(str(path)))

    def on_start(model: Any, step: int) -> None:
        if poster is not None:
            poster.mark("model")

    result = train(cfg, resume=resume, on_metrics=on_metrics, source=source, on_epoch_end=on_epoch_end,
                   on_start=on_start)
    tracker.log_dict(result.to_dict(), "result_worker.json")
    tracker.flush()


def _train_on_ray(
    cfg: ExperimentConfig, tracker: Tracker, resume: str | Path | None,
    fail: dict[str, Any] | None, clock: StartupClock | None = None,
) -> TrainResult:
    import ray
    import ray.data
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.ray_runtime import worker_env

    backend = join_ray(cfg)
    data_dir = Path(cfg.data_dir).resolve()
    cfg.data_dir = str(data_dir)
    cfg.train.output_dir = str(Path(cfg.train.output_dir).resolve())
    fm = FeatureMap.load(data_dir / "feature_map.json")
    datasets = {
        split: ray.data.read_parquet([str(data_dir / f) for f in files], shuffle=None)
        for split, files in fm.shards.items() if files
    }
    clock = clock or StartupClock()
    clock.mark("data")
    storage = cfg.cluster.storage_path or str(Path(cfg.train.output_dir) / "ray")
    progress = start_board()
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "resume": str(resume) if resume else None, "fail": fail, "progress": progress,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.cluster.workers, use_gpu=backend == "nccl",
            resources_per_worker={"CPU": cfg.cluster.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend=backend),
        run_config=RunConfig(
            # A unique name per run: Ray Train restores a run whose name and storage it
            # finds again, which would silently reuse an earlier run's checkpoint.
            name=f"{cfg.expid}-{(tracker.run_id or 'untracked')[:12]}", storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
            worker_runtime_env={"env_vars": worker_env()},
        ),
        datasets=datasets,
    )
    watch = ProgressWatch(progress, cfg.cluster.workers, cfg.cluster.cpus_per_worker)
    relay = TrackingRelay(progress, tracker, cfg)
    watch.start()
    relay.start()
    tracking_error: BaseException | None = None
    try:
        ray_result = trainer.fit()
    finally:
        watch.stop()
        tracking_error = relay.stop()  # rank 0's last records written before the board goes
        try:
            print(clock.line(ray.get(progress.read_marks.remote(), timeout=10)), flush=True)
        except Exception:  # the line is informative only: a lost board never fails the run
            pass
        ray.kill(progress)
    if ray_result.error is not None:
        raise RecembError(f"Ray training of {cfg.expid} failed: {ray_result.error}")
    if tracking_error is not None:
        raise RecembError(f"{cfg.expid}: writing rank 0's records to MLflow failed: {tracking_error}") \
            from tracking_error
    result_path = Path(cfg.train.output_dir) / cfg.expid / "result.json"
    data = json.loads(result_path.read_text(encoding="utf-8"))
    from recemb.train.loop import TrainResult

    return TrainResult(**data)


# When this module's imports were done (the driver's "imports" stage ends here).
_IMPORTED_AT = time.time()
_CALLED = False  # run_train ran in this process before

__all__ = ["quiet_logs", "run_train"]
