"""``recemb tune``: a hyperparameter search on Ray Tune, with ASHA stopping the bad trials early.

Each trial draws its overrides from the search space (``recemb.search_space``), trains in
its own Tune trial process with the same ``train`` as ``recemb train`` and reports the
monitored score (``train.monitor``) after every evaluation, so ASHA can stop a trial that
falls behind at a rung. Every trial is an MLflow child run (tag ``mlflow.parentRunId``) of
one parent run that logs the space, the results table and the best trial. Under ``--out``:
``trials.csv`` and ``trials.json`` (every trial's params, status and best score),
``best.yaml`` (the best trial's resolved config, for ``recemb train --config``), and each
trial's run folder under ``trials/``.

Example:
    $ recemb tune --config configs/experiments/deepfm_synthetic_ctr.yaml \\
        --space configs/tune/deepfm_small.yaml --trials 16 --workers 2 train.epochs=8
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import pipelines.ray_runtime  # noqa: F401  (sets Ray's environment before anything imports ray)

# Tune's console tables (its "new output") ignore verbose=0; the old reporter honours it.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
from pipelines.train import _finish_tracking, check_experiment, quiet_logs
from recemb.config.experiment import ExperimentConfig, load_experiment
from recemb.data.batch import epoch_steps
from recemb.errors import ConfigError, RecembError
from recemb.io import write_json_atomic, write_text_atomic
from recemb.search_space import SearchSpace, apply_overrides, check_space, load_space, override_words
from recemb.tracking import TAG_WORLD_SIZE, Tracker
from recemb.train.loop import epoch_train_rows, monitor_score, resolved_batch_size, train
from recemb.train.preflight import check_run

TAG_TUNE_ROLE = "recemb.tune"
TAG_TRIAL = "recemb.tune.trial"
TAG_STOPPED = "recemb.tune.stopped"
TRIAL_FILE = "trial.json"


@dataclass
class TrialRow:
    """One trial's line of ``trials.csv``: its overrides, how it ended and its best evaluation.

    ``status``: ``finished`` (trained to its end or its own early stop), ``stopped`` (ASHA
    stopped it at a rung) or ``error``. ``best_score`` is the best monitored score of its
    evaluations; ``test`` holds test metrics of finished trials only.
    """

    trial: str
    run_id: str
    status: str
    evaluations: int
    best_score: float
    params: dict[str, Any]
    best_valid: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""


@dataclass
class TuneResult:
    """What ``run_tune`` produced: the parent run, every trial (best score first), the best one's
    config file and the commands that reproduce it (``best.yaml``, or the config plus overrides)."""

    parent_run_id: str
    out_dir: str
    trials: list[TrialRow]
    best: TrialRow
    best_config: str
    command: str
    overrides_command: str
    seconds: float


# ----------------------------------------------------------------------------- one trial


def trial_config(base: ExperimentConfig, params: dict[str, Any], name: str, out_dir: Path) -> ExperimentConfig:
    """``base`` with a trial's ``params``, training in this process into ``<out>/trials/<name>``."""
    cfg = apply_overrides(base, params, where=f"trial {name}")
    cfg.expid = name
    cfg.train.output_dir = str(out_dir / "trials")
    cfg.train.progress = False
    cfg.cluster = dataclasses.replace(cfg.cluster, workers=0)
    return cfg


def _trial(params: dict[str, Any], *, base: dict[str, Any], parent_run_id: str, mlflow_uri: str,
           out_dir: str) -> None:
    """Body of every Tune trial: train, report each evaluation's score, track as a child run."""
    quiet_logs()
    from ray import tune

    from recemb.config.loader import from_dict

    name = f"trial_{tune.get_context().get_trial_id()}"
    cfg = trial_config(from_dict(ExperimentConfig, base, where="tune trial"), params, name, Path(out_dir))
    tracker = Tracker(mlflow_uri, rank=0, experiment_name=cfg.dataset_id)
    run_id = tracker.start(cfg, tags={"mlflow.parentRunId": parent_run_id, TAG_TUNE_ROLE: "trial",
                                      TAG_TRIAL: name, TAG_WORLD_SIZE: "1"})
    tracker.log_params_from_config(cfg)
    best, best_metrics = -math.inf, {}

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        nonlocal best, best_metrics
        tracker.log_metrics(step, metrics, split="valid")
        score = monitor_score(metrics, cfg.train.monitor)
        if score > best or not best_metrics:
            best = max(best, score)
            best_metrics = {f"best_valid_{k}": float(v) for k, v in metrics.items()
                            if isinstance(v, (int, float)) and k not in ("step", "epoch")}
        # The best evaluation so far rides along: a trial ASHA stops is known by its last report.
        tune.report({"score": score, "best_score": best, "step": step, "run_id": run_id, "trial": name,
                     **best_metrics})

    try:
        result = train(cfg, on_metrics=on_metrics)
        _finish_tracking(tracker, cfg, result)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    write_json_atomic(Path(result.output_dir) / TRIAL_FILE, {
        "trial": name, "run_id": run_id, "params": params, "best_score": best, "evaluations": len(result.history),
        "best_valid": result.best_valid, "test": result.test, "seconds": result.seconds,
    })


# ----------------------------------------------------------------------------- the search


def evaluations(cfg: ExperimentConfig, train_rows: int) -> int:
    """How many validation evaluations a run of ``cfg`` makes at most (ASHA's ``max_t``)."""
    tc = cfg.train
    per_epoch = epoch_steps(train_rows, resolved_batch_size(tc, train_rows, 1), 1)
    steps = tc.epochs * per_epoch
    if tc.max_steps:
        steps = min(steps, tc.max_steps)
    within = steps // tc.eval_every_steps if tc.eval_every_steps else 0
    return max(1, within + math.ceil(steps / max(per_epoch, 1)))


def _prepare_out(out: Path, overwrite: bool) -> None:
    ours = [out / n for n in ("trials", "trials.csv", "trials.json", "best.yaml", "ray")]
    if any(p.exists() for p in ours):
        if not overwrite:
            raise ConfigError(f"{out} holds an earlier search; pass --overwrite or another --out")
        for p in ours:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _check_trial_resources(workers: int, cpus: float, gpus: int, local: bool) -> None:
    import ray

    total = ray.cluster_resources()
    have_cpu, have_gpu = float(total.get("CPU", 0.0)), float(total.get("GPU", 0.0))
    problems = []
    if workers * cpus > have_cpu + 1e-9:
        problems.append(f"{workers} concurrent trials x {cpus:g} CPU = {workers * cpus:g} CPUs, but the cluster "
                        f"has {have_cpu:g}; use fewer --workers or fewer CPUs each (cluster.cpus_per_worker)")
    if workers * gpus > have_gpu:
        problems.append(f"{workers} concurrent trials need a GPU each, but the cluster has {have_gpu:g}")
    if problems and local:
        raise ConfigError(f"Ray cannot schedule this search (it would wait forever): {'; '.join(problems)}")
    if problems:
        print(f"[tune] warning: the cluster cannot run the trials now (they wait until it can): "
              f"{'; '.join(problems)}", flush=True)


def _tune_domains(space: SearchSpace) -> dict[str, Any]:
    from ray import tune

    domains: dict[str, Any] = {}
    for key, dist in space.params.items():
        if dist.kind == "choice":
            domains[key] = tune.choice(list(dist.values))
        elif dist.kind == "randint":
            domains[key] = tune.randint(dist.values[0], dist.values[1] + 1)  # Tune's upper end is excluded
        elif dist.kind == "loguniform":
            domains[key] = tune.loguniform(*dist.values)
        else:
            domains[key] = tune.uniform(*dist.values)
    return domains


def _collect(results: Any, space: SearchSpace) -> list[TrialRow]:
    """One ``TrialRow`` per Tune result: the trial's own file when it finished, else its last report."""
    rows = []
    for res in results:
        params = {k: res.config[k] for k in space.params}
        last = res.metrics or {}
        name = str(last.get("trial", "")) or (f"trial_{last['trial_id']}" if "trial_id" in last
                                               else Path(str(res.path)).name)
        row = TrialRow(trial=name, run_id=str(last.get("run_id", "")), status="stopped",
                       evaluations=int(last.get("training_iteration", 0)),
                       best_score=float(last.get("best_score", -math.inf)), params=params,
                       best_valid={k.removeprefix("best_valid_"): v for k, v in last.items()
                                   if k.startswith("best_valid_")})
        if res.error is not None:
            row.status, row.error = "error", " ".join(str(res.error).split())[:500]
        rows.append(row)
    return rows


def _read_trial_files(rows: list[TrialRow], trials_dir: Path) -> None:
    """Finished trials wrote ``trial.json`` into their run folder: take their final figures."""
    for row in rows:
        path = trials_dir / row.trial / TRIAL_FILE
        if row.status == "error" or not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        row.status = "finished"
        row.run_id = data["run_id"]
        row.evaluations = int(data["evaluations"])
        row.best_score = float(data["best_score"])
        row.best_valid = {k: v for k, v in data["best_valid"].items() if k not in ("step", "epoch")}
        row.test = data["test"]
        row.seconds = float(data["seconds"])


def _close_stopped_runs(tracker: Tracker, rows: list[TrialRow]) -> None:
    """A trial ASHA stopped ends with its process: mark its child run KILLED, tagged why."""
    for row in rows:
        if row.status != "stopped" or not row.run_id:
            continue
        child = Tracker(tracker.uri, rank=0)
        child.run_id = row.run_id
        child.set_tags({TAG_STOPPED: f"asha after {row.evaluations} evaluation(s)"})
        child.end("KILLED")


def _write_results(out: Path, rows: list[TrialRow]) -> None:
    keys = sorted({k for r in rows for k in r.params})
    metrics = sorted({k for r in rows for k in r.best_valid if isinstance(r.best_valid[k], (int, float))})
    tests = sorted({k for r in rows for k in r.test})
    header = ["trial", "status", "best_score", "evaluations", *keys, *(f"valid_{m}" for m in metrics),
              *(f"test_{m}" for m in tests), "seconds", "run_id", "error"]
    lines = []
    for r in rows:
        line = {"trial": r.trial, "status": r.status, "best_score": r.best_score, "evaluations": r.evaluations,
                "seconds": round(r.seconds, 1), "run_id": r.run_id, "error": r.error}
        line.update({k: r.params.get(k) for k in keys})
        line.update({f"valid_{m}": r.best_valid.get(m) for m in metrics})
        line.update({f"test_{m}": r.test.get(m) for m in tests})
        lines.append(line)
    tmp = out / "trials.csv.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(lines)
    tmp.replace(out / "trials.csv")
    write_json_atomic(out / "trials.json", [dataclasses.asdict(r) for r in rows])


def best_config(base: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """The config ``recemb train`` reproduces the best trial with: ``base`` (its cluster, output
    folder, progress bar) with the trial's ``params``, under the run name ``<expid>_tuned``."""
    cfg = apply_overrides(base, params, where="best trial")
    cfg.expid = f"{base.expid}_tuned"
    return cfg


def run_tune(
    config: str | Path | ExperimentConfig,
    space: str | Path | SearchSpace,
    trials: int = 8,
    overrides: list[str] | None = None,
    workers: int = 2,
    out: str | Path | None = None,
    mlflow_uri: str | None = None,
    address: str | None = None,
    seed: int = 0,
    grace_period: int = 1,
    reduction_factor: float = 2.0,
    overwrite: bool = False,
) -> TuneResult:
    """Search ``space`` around ``config`` with ``trials`` Tune trials, ``workers`` at a time.

    Every config error (the space's keys and values against the experiment, the resources)
    is raised before a run is tracked or a folder is written. Returns the trials, best first.

    Example:
        >>> result = run_tune("configs/experiments/deepfm_synthetic_ctr.yaml",
        ...                   "configs/tune/deepfm_small.yaml", trials=4)   # doctest: +SKIP
        >>> result.command                                                  # doctest: +SKIP
        'recemb train --config tune-out/deepfm_synthetic_ctr/best.yaml'
    """
    t0 = time.perf_counter()
    quiet_logs()
    if trials < 1 or workers < 1:
        raise ConfigError(f"--trials and --workers must be >= 1, got {trials} and {workers}")
    if not (grace_period >= 1 and reduction_factor > 1):
        raise ConfigError("ASHA needs grace_period >= 1 and reduction_factor > 1")
    base = config if isinstance(config, ExperimentConfig) else load_experiment(config, overrides)
    if mlflow_uri:
        base.cluster = dataclasses.replace(base.cluster, mlflow_uri=mlflow_uri)
    where = str(space) if not isinstance(space, SearchSpace) else "search space"
    space = space if isinstance(space, SearchSpace) else load_space(space)
    fm = check_experiment(base)
    check_space(space, base, where=where, check=lambda cfg: check_run(cfg, fm))
    base.data_dir = str(Path(base.data_dir).resolve())
    out_dir = Path(out or Path("tune-out") / base.expid).resolve()
    train_rows = epoch_train_rows(base.train, fm, base.data_dir)
    # One more than any trial evaluates: ASHA stops a trial that reaches max_t, which would cut
    # the trial's test evaluation after its last validation.
    max_t = 1 + max(evaluations(apply_overrides(base, o), train_rows) for o in space.edge_overrides())

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipelines.ray_runtime import init_ray, is_local

    init_ray(address or base.cluster.address)
    gpus = 1 if base.train.device == "cuda" else 0
    _check_trial_resources(workers, base.cluster.cpus_per_worker, gpus,
                           local=is_local(address or base.cluster.address))
    _prepare_out(out_dir, overwrite)

    parent_cfg = dataclasses.replace(base, expid=f"{base.expid}_tune")
    tracker = Tracker.from_config(base, rank=0)
    parent_id = tracker.start(parent_cfg, tags={TAG_TUNE_ROLE: "parent", TAG_WORLD_SIZE: str(workers),
                                                "recemb.tune.trials": trials, "recemb.tune.out": str(out_dir)})
    tracker.log_params_from_config(base)
    tracker.log_dict(space.to_dict(), "space.yaml")
    print(f"[mlflow] parent run {parent_id} ({parent_cfg.expid}) in {tracker.uri}", flush=True)
    print(f"[tune] {trials} trials, {workers} at a time, ASHA over up to {max_t - 1} evaluations "
          f"(grace {grace_period}, reduction {reduction_factor:g}); results in {out_dir}", flush=True)
    try:
        trainable = tune.with_resources(
            tune.with_parameters(_trial, base=base.to_dict(), parent_run_id=parent_id, mlflow_uri=tracker.uri,
                                 out_dir=str(out_dir)),
            {"CPU": base.cluster.cpus_per_worker, "GPU": gpus},
        )
        tuner = tune.Tuner(
            trainable,
            param_space=_tune_domains(space),
            tune_config=tune.TuneConfig(
                metric="score", mode="max", num_samples=trials,
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=grace_period,
                                        reduction_factor=reduction_factor),
                search_alg=BasicVariantGenerator(max_concurrent=workers, random_state=seed),
            ),
            # A unique name: Tune restores an experiment whose name and storage it finds again.
            run_config=tune.RunConfig(name=f"{base.expid}-{parent_id[:12]}", storage_path=str(out_dir / "ray"),
                                      verbose=0),
        )
        grid = tuner.fit()
        rows = _collect(grid, space)
        _read_trial_files(rows, out_dir / "trials")
        _close_stopped_runs(tracker, rows)
        rows.sort(key=lambda r: (r.status != "error", r.best_score), reverse=True)
        _write_results(out_dir, rows)
        scored = [r for r in rows if r.status != "error" and math.isfinite(r.best_score)]
        if not scored:
            raise RecembError(f"no trial reported a score (see {out_dir / 'trials.csv'}): "
                              f"{rows[0].error if rows else 'no trials ran'}")
        best = scored[0]
        cfg = best_config(base, best.params)
        best_path = out_dir / "best.yaml"
        write_text_atomic(best_path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        tracker.log_metrics(0, {"best_score": best.best_score,
                                **{f"best_valid_{k}": v for k, v in best.best_valid.items()},
                                **{f"best_test_{k}": v for k, v in best.test.items()},
                                **{f"trials_{s}": sum(r.status == s for r in rows)
                                   for s in ("finished", "stopped", "error")}})
        tracker.set_tags({"recemb.tune.best_run_id": best.run_id, "recemb.tune.best_trial": best.trial,
                          "recemb.tune.best_params": json.dumps(best.params)})
        for name in ("trials.csv", "trials.json", "best.yaml"):
            tracker.log_artifact(out_dir / name)
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    command = f"recemb train --config {_shown(best_path)}"
    if not isinstance(config, ExperimentConfig):
        alternative = f"recemb train --config {config} {' '.join(reproduce_words(overrides, best.params, cfg.expid))}"
    else:
        alternative = ""
    return TuneResult(parent_run_id=parent_id, out_dir=str(out_dir), trials=rows, best=best,
                      best_config=str(best_path), command=command, overrides_command=alternative,
                      seconds=time.perf_counter() - t0)


def reproduce_words(overrides: list[str] | None, params: dict[str, Any], expid: str) -> list[str]:
    """The ``key=value`` words that reproduce a trial from the experiment file: every trial's
    overrides, the trial's drawn ``params``, then the tuned run's name (an ``expid`` among the
    overrides is left out: it would only be repeated).

    Example:
        >>> reproduce_words(["train.epochs=8", "expid=mine"], {"embedding.lr": 0.01}, "mine_tuned")
        ['train.epochs=8', 'embedding.lr=0.01', 'expid=mine_tuned']
    """
    kept = [w for w in overrides or [] if not w.startswith("expid=")]
    return [*kept, *override_words(params), f"expid={expid}"]


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (a shorter command)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def format_trials(result: TuneResult) -> str:
    """The trials as a fixed-width table, best first, then how to reproduce the best one."""
    keys = list(result.best.params)
    header = ["trial", "status", "evals", "best_score", *keys, "test_auc"]
    table = [header] + [
        [r.trial, r.status, str(r.evaluations), f"{r.best_score:.5f}",
         *(f"{r.params[k]:.4g}" if isinstance(r.params[k], float) else str(r.params[k]) for k in keys),
         f"{r.test['auc']:.5f}" if "auc" in r.test else "-"]
        for r in result.trials
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table]
    lines.append(f"best: {result.best.trial} (score {result.best.best_score:.5f}, MLflow run {result.best.run_id})")
    lines.append(f"reproduce: {result.command}")
    if result.overrides_command:
        lines.append(f"      or: {result.overrides_command}")
    return "\n".join(lines)


__all__ = ["TrialRow", "TuneResult", "best_config", "evaluations", "format_trials", "run_tune", "trial_config"]
