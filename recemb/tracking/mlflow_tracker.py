"""MLflow tracking for training runs: rank 0 logs, every other rank is a no-op.

One MLflow experiment per dataset, one run per experiment id (``cfg.expid``). The
tracking URI is always explicit (argument, ``MLFLOW_TRACKING_URI``, or a sqlite file
in the working directory), so mlflow never falls back to a ``./mlruns`` file store.
``mlflow`` is imported lazily, on first use on rank 0, to keep ``recemb --help`` fast.

Example:
    >>> tracker = Tracker("sqlite:////tmp/recemb/mlruns.db")                # doctest: +SKIP
    >>> run_id = tracker.start(cfg)                                          # doctest: +SKIP
    >>> tracker.log_params_from_config(cfg)                                  # doctest: +SKIP
    >>> result = train(cfg, on_metrics=tracker.metrics_hook("valid"))        # doctest: +SKIP
    >>> tracker.set_tags({TAG_EMBEDDING_BYTES: result.embedding_bytes})     # doctest: +SKIP
    >>> tracker.end("FINISHED")                                              # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import getpass
import importlib.metadata
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from recemb.errors import RecembError

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from recemb.config.experiment import ExperimentConfig

log = logging.getLogger("recemb.tracking")

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
MetricsHook = Callable[[int, dict[str, float]], None]

DEFAULT_DB_NAME = "mlruns.db"
ARTIFACTS_DIR_NAME = "mlartifacts"

# Tag keys other parts of recemb read back (``recemb runs list``, run-id lookups).
TAG_GIT_COMMIT = "recemb.git_commit"
TAG_VARIANT = "recemb.variant"
TAG_EMBEDDING_BYTES = "recemb.embedding_bytes"
TAG_FULL_BYTES = "recemb.full_bytes"
TAG_CHECKPOINT_DIR = "recemb.checkpoint_dir"
TAG_HOST = "recemb.host"
TAG_WORLD_SIZE = "recemb.world_size"
TAG_EXPID = "recemb.expid"
TAG_MODEL = "recemb.model"
TAG_DATASET = "recemb.dataset"
TAG_RESUMES = "recemb.resumes"
TAG_VERSION_PREFIX = "recemb.version."
TAG_PARAM_CHANGED_PREFIX = "recemb.param_changed."

# Distribution names per reported package; the first installed one wins (fbgemm ships
# as a CPU-only wheel too, and a stub ``fbgemm-gpu`` may sit next to it).
_VERSIONED_PACKAGES: dict[str, tuple[str, ...]] = {
    "recemb": ("recemb",),
    "torch": ("torch",),
    "torchrec": ("torchrec",),
    "fbgemm_gpu": ("fbgemm-gpu-cpu", "fbgemm-gpu", "fbgemm-gpu-nightly", "fbgemm-gpu-nightly-cpu"),
    "ray": ("ray",),
    "pyarrow": ("pyarrow",),
    "mlflow": ("mlflow", "mlflow-skinny"),
}
# Limits of MLflow's REST/SQL stores (mlflow.utils.validation), used if it moves them.
_FALLBACK_MAX_PARAM_VAL = 6000
_FALLBACK_MAX_TAG_VAL = 8000
_MAX_KEY_LENGTH = 250
_BATCH = 100
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
_UNPREFIXED_METRICS = frozenset({"epoch"})
_DROPPED_METRICS = frozenset({"step"})


class TrackingError(RecembError):
    """The tracking store cannot be used as asked: bad URI, unknown run, deleted experiment."""


# ---------------------------------------------------------------------------------------
# URIs, ranks and the lazy mlflow import


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The tracking URI to use: ``explicit``, else ``MLFLOW_TRACKING_URI``, else a sqlite
    file ``mlruns.db`` in the current directory; sqlite paths are made absolute.

    Absolute paths matter because Ray workers run in another working directory. A plain
    path ending in ``.db``/``.sqlite``/``.sqlite3`` is taken as a sqlite file; a file store
    (``file:`` URI or a folder) is refused, as MLflow 3 deprecates it.

    Example:
        >>> resolve_tracking_uri("sqlite:////tmp/m.db")
        'sqlite:////tmp/m.db'
        >>> resolve_tracking_uri("http://mlflow:5000")
        'http://mlflow:5000'
    """
    uri = (explicit or "").strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        return _sqlite_uri(Path.cwd() / DEFAULT_DB_NAME)
    if uri.startswith("sqlite:///"):
        rest = uri[len("sqlite:///"):]
        path, sep, query = rest.partition("?")
        if path and not path.startswith("/") and path != ":memory:":
            return _sqlite_uri(Path(path).resolve()) + (sep + query)
        return uri
    if uri.startswith("file:"):
        raise TrackingError(
            f"tracking URI {uri!r} is a file store, which MLflow 3 refuses; "
            f"use a sqlite file (e.g. sqlite:///{Path.cwd() / DEFAULT_DB_NAME}) or an http(s) server"
        )
    if "://" not in uri and not re.match(r"^[a-z][a-z0-9+.-]*:", uri):
        path = Path(uri).expanduser()
        if path.suffix in {".db", ".sqlite", ".sqlite3"}:
            return _sqlite_uri(path.resolve())
        raise TrackingError(
            f"tracking URI {uri!r} is a plain path; give a sqlite file ending in .db "
            f"(e.g. {path / DEFAULT_DB_NAME}) or a URI such as sqlite:///... or http://..."
        )
    return uri


def _sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path}"  # ``path`` is absolute, so this has four slashes


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite URI with a file path, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].partition("?")[0]
    if not path or path == ":memory:":
        return None
    return Path(path)


def _mlflow_client(uri: str) -> MlflowClient:
    """An ``MlflowClient`` on ``uri``; importing mlflow here, with telemetry off."""
    # Telemetry writes under the home directory; a user who opted in keeps their choice.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    path = _sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _dist() -> Any | None:
    """``torch.distributed`` when a process group is running, else None (without importing torch)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def current_rank(rank: int | None = None) -> int:
    """This process's rank: torch.distributed's if a group is running, else ``rank`` (default 0).

    Example:
        >>> current_rank(3)   # no process group running
        3
    """
    dist = _dist()
    if dist is not None:
        return int(dist.get_rank())
    return 0 if rank is None else int(rank)


# ---------------------------------------------------------------------------------------
# Tags and params


def git_commit(repo: Path | None = None) -> str:
    """``git rev-parse HEAD`` of the repo holding recemb (or ``repo``), else ``"unknown"``."""
    root = repo or Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():  # installed from a wheel: an enclosing repo is not ours
        return "unknown"
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a run depends on (``"none"`` when absent)."""
    versions = {}
    for name, dists in _VERSIONED_PACKAGES.items():
        versions[name] = "none"
        for dist in dists:
            try:
                versions[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def flatten_config(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings to dotted keys with string values; lists (and empty dicts) as JSON.

    Example:
        >>> flatten_config({"train": {"batch_size": 512, "monitor": {"auc": 1.0}}, "tags": [1, 2]})
        {'train.batch_size': '512', 'train.monitor.auc': '1.0', 'tags': '[1, 2]'}
    """
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, (list, tuple, Mapping)):
            flat[name] = json.dumps(value, default=str)
        else:
            flat[name] = str(value)
    return flat


def _clean_key(key: str) -> str:
    """A key MLflow accepts: odd characters become ``_``, at most 250 characters."""
    return _BAD_KEY_CHARS.sub("_", key)[:_MAX_KEY_LENGTH]


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _limit(name: str, fallback: int) -> int:
    try:
        from mlflow.utils import validation

        return int(getattr(validation, name))
    except (ImportError, AttributeError):
        return fallback


def _chunks(items: list[Any], size: int = _BATCH) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ---------------------------------------------------------------------------------------
# The tracker


class Tracker:
    """One MLflow run, written through ``MlflowClient`` with an explicit run id.

    Only rank 0 (torch.distributed's rank when a group is running, else ``rank``) talks
    to MLflow; on other ranks every method returns at once, so the same code runs on
    every rank. ``experiment_name`` defaults to the config's ``dataset_id``.
    Metric logging never raises (a lost point must not kill a training run): failures
    are logged as warnings and counted in ``failed_logs``.

    Example:
        >>> with Tracker("sqlite:////tmp/m.db", rank=0) as tracker:          # doctest: +SKIP
        ...     tracker.start(cfg)
        ...     tracker.log_metrics(100, {"auc": 0.71, "logloss": 0.45}, split="valid")
    """

    def __init__(self, uri: str | None = None, *, rank: int | None = None,
                 experiment_name: str | None = None) -> None:
        self.uri = resolve_tracking_uri(uri)
        self.enabled = current_rank(rank) == 0
        self.experiment_name = experiment_name
        self.run_id: str | None = None
        self.failed_logs = 0
        self._client: MlflowClient | None = None

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, uri: str | None = None, *, rank: int | None = None,
                    experiment_name: str | None = None) -> Tracker:
        """A tracker on ``uri``, else ``cfg.cluster.mlflow_uri``, else the env/default URI."""
        return cls(uri or cfg.cluster.mlflow_uri or None, rank=rank, experiment_name=experiment_name)

    @property
    def client(self) -> MlflowClient:
        """The ``MlflowClient`` (created, and mlflow imported, on first use)."""
        if self._client is None:
            self._client = _mlflow_client(self.uri)
        return self._client

    def _run(self) -> str | None:
        """The run id to write to, or None on a non-zero rank or before ``start``."""
        if not self.enabled:
            return None
        if self.run_id is None:
            raise TrackingError("Tracker.start(cfg) must be called before logging")
        return self.run_id

    # -- lifecycle --------------------------------------------------------------------

    def start(self, cfg: ExperimentConfig, tags: Mapping[str, Any] | None = None,
              run_id: str | None = None) -> str:
        """Create a run named ``cfg.expid``, or resume ``run_id``; returns the run id.

        A resumed run (a restarted worker, a resumed training) is set back to RUNNING and
        keeps the tags it has; ``tags`` are always set. On a non-zero rank nothing is
        written and ``run_id or ""`` is returned.

        Example:
            >>> run_id = Tracker(uri).start(cfg, tags={"purpose": "baseline"})   # doctest: +SKIP
            >>> Tracker(uri).start(cfg, run_id=run_id)   # a restarted worker   # doctest: +SKIP
        """
        if not self.enabled:
            self.run_id = run_id
            return run_id or ""
        client = self.client
        defaults = self._default_tags(cfg)
        if run_id:
            from mlflow.exceptions import MlflowException

            try:
                run = client.get_run(run_id)
            except MlflowException as exc:
                raise TrackingError(f"no MLflow run {run_id!r} in {self.uri}: {exc.message}") from None
            if run.info.lifecycle_stage == "deleted":
                raise TrackingError(f"MLflow run {run_id!r} is deleted; restore it or start a new run")
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            existing = run.data.tags
            new_tags = {k: v for k, v in defaults.items() if k not in existing}
            new_tags[TAG_RESUMES] = str(int(existing.get(TAG_RESUMES, "0")) + 1)
        else:
            experiment_id = self.experiment_id(self.experiment_name or cfg.dataset_id)
            run = client.create_run(experiment_id, run_name=cfg.expid)
            run_id = run.info.run_id
            new_tags = defaults
        self.run_id = run_id
        self.set_tags({**new_tags, **(tags or {})})
        return run_id

    def end(self, status: RunStatus = "FINISHED") -> None:
        """Mark the run ``FINISHED``, ``FAILED`` or ``KILLED`` (a no-op before ``start``)."""
        if not self.enabled or self.run_id is None:
            return
        self.client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED")
        else:
            self.end("FAILED")

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created (artifacts next to a sqlite file) if missing."""
        from mlflow.exceptions import MlflowException

        client = self.client
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return client.create_experiment(name, artifact_location=self._artifact_location(name))
            except MlflowException:  # another process created it in the meantime
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment {name!r} is deleted in {self.uri}; restore it "
                "(mlflow experiments restore) or choose another experiment name"
            )
        return experiment.experiment_id

    def _artifact_location(self, experiment_name: str) -> str | None:
        """``<db folder>/mlartifacts/<name>`` for a sqlite store; the server's default otherwise.

        Without it, a sqlite store puts artifacts under ``./mlruns`` of whatever directory
        the process happens to run in (a Ray worker's is a temporary one).
        """
        db = _sqlite_path(self.uri)
        if db is None:
            return None
        return (db.parent / ARTIFACTS_DIR_NAME / _clean_key(experiment_name).replace("/", "_")).as_uri()

    def _default_tags(self, cfg: ExperimentConfig) -> dict[str, str]:
        dist = _dist()
        commit = git_commit()
        tags = {
            TAG_GIT_COMMIT: commit,
            "mlflow.source.git.commit": commit,
            TAG_VARIANT: cfg.embedding.kind,
            TAG_EXPID: cfg.expid,
            TAG_MODEL: cfg.model.name,
            TAG_DATASET: cfg.dataset_id,
            TAG_HOST: socket.gethostname(),
            TAG_WORLD_SIZE: str(dist.get_world_size() if dist is not None else cfg.cluster.workers),
        }
        try:
            tags["mlflow.user"] = getpass.getuser()
        except (OSError, KeyError):
            pass
        tags.update({f"{TAG_VERSION_PREFIX}{k}": v for k, v in package_versions().items()})
        return tags

    # -- logging ----------------------------------------------------------------------

    def log_params_from_config(self, cfg: ExperimentConfig, artifact: str | None = "config.json") -> None:
        """Log the resolved config as params (dotted keys, values cut to MLflow's limit).

        The whole config is also logged as the JSON artifact ``artifact`` (params may be
        truncated). On a resumed run, params already logged are skipped; a value that
        changed (MLflow params are immutable) is recorded as a ``recemb.param_changed.*`` tag.

        Example:
            >>> tracker.log_params_from_config(cfg)   # params: train.batch_size=4096, ...  # doctest: +SKIP
        """
        run_id = self._run()
        if run_id is None:
            return
        from mlflow.entities import Param

        data = cfg.to_dict()
        limit = _limit("MAX_PARAM_VAL_LENGTH", _FALLBACK_MAX_PARAM_VAL)
        params = {_clean_key(k): _truncate(v, limit) for k, v in flatten_config(data).items()}
        logged = self.client.get_run(run_id).data.params
        changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
        fresh = [Param(k, v) for k, v in params.items() if k not in logged]
        for chunk in _chunks(fresh):
            self.client.log_batch(run_id, params=chunk)
        if changed:
            log.warning("run %s: params changed since the run started, kept as tags: %s",
                        run_id, ", ".join(sorted(changed)))
            self.set_tags({f"{TAG_PARAM_CHANGED_PREFIX}{k}": v for k, v in changed.items()})
        if artifact:
            self.client.log_dict(run_id, data, artifact)

    def log_metrics(self, step: int, metrics: Mapping[str, Any], split: str | None = None) -> None:
        """Log finite numeric ``metrics`` at ``step``, named ``<split>_<name>`` when ``split`` is given.

        ``step`` in ``metrics`` is dropped and ``epoch`` is logged without prefix (the
        training loop's evaluation dicts carry both); NaN/inf and non-numbers are skipped.

        Example:
            >>> tracker.log_metrics(200, {"auc": 0.74, "logloss": float("nan")}, split="valid")  # doctest: +SKIP
            >>> # logs valid_auc=0.74 at step 200; the NaN logloss is skipped
        """
        run_id = self._run()
        if run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = []
        for name, value in metrics.items():
            if name in _DROPPED_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            key = name if split is None or name in _UNPREFIXED_METRICS else f"{split}_{name}"
            points.append(Metric(_clean_key(key), float(value), now, int(step)))
        try:
            for chunk in _chunks(points, 1000):
                self.client.log_batch(run_id, metrics=chunk)
        except Exception as exc:  # tracking must never end a training run
            self.failed_logs += 1
            log.warning("run %s: could not log metrics at step %d: %s", run_id, step, exc)

    def metrics_hook(self, split: str = "valid") -> MetricsHook:
        """A ``train(..., on_metrics=...)`` hook logging each evaluation under ``split``.

        Example:
            >>> train(cfg, on_metrics=tracker.metrics_hook("valid"))   # doctest: +SKIP
        """

        def hook(step: int, metrics: dict[str, float]) -> None:
            self.log_metrics(step, metrics, split=split)

        return hook

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values stringified and cut to MLflow's limit).

        Example:
            >>> tracker.set_tags({TAG_EMBEDDING_BYTES: 1_048_576, TAG_CHECKPOINT_DIR: "runs/x"})  # doctest: +SKIP
        """
        run_id = self._run()
        if run_id is None or not tags:
            return
        from mlflow.entities import RunTag

        limit = _limit("MAX_TAG_VAL_LENGTH", _FALLBACK_MAX_TAG_VAL)
        items = [RunTag(_clean_key(str(k)), _truncate(str(v), limit)) for k, v in tags.items()]
        for chunk in _chunks(items):
            self.client.log_batch(run_id, tags=chunk)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file (or a folder's contents) into the run's artifacts, under ``artifact_path``.

        Example:
            >>> tracker.log_artifact("runs/deepfm_synthetic_ctr/results.csv")   # doctest: +SKIP
        """
        run_id = self._run()
        if run_id is None:
            return
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(run_id, str(path), artifact_path)
        else:
            raise TrackingError(f"cannot log artifact {path}: no such file or folder")

    def log_dict(self, data: Mapping[str, Any] | list[Any], name: str) -> None:
        """Write ``data`` as the artifact ``name`` (``.json`` or ``.yaml``/``.yml``).

        Example:
            >>> tracker.log_dict(result.to_dict(), "result.json")   # doctest: +SKIP
        """
        run_id = self._run()
        if run_id is None:
            return
        self.client.log_dict(run_id, data, name)


# ---------------------------------------------------------------------------------------
# Reading runs back


def _store_exists(uri: str) -> bool:
    """False for a sqlite file that does not exist yet (reading must not create one)."""
    path = _sqlite_path(uri)
    return path is None or path.is_file()


def list_runs(uri: str | None = None, max_results: int = 20) -> list[dict[str, Any]]:
    """The most recent runs over all experiments, newest first, as plain rows.

    Each row: ``run_id``, ``name``, ``experiment``, ``status``, ``start_time`` (ISO, UTC),
    ``variant``, ``embedding_bytes`` (int or None), ``best_valid_auc`` and ``test_auc`` (or None).
    ``best_valid_auc`` is the validation AUC of the run's best evaluation by its monitored
    score (``best_valid_auc``, logged when the run finishes: the checkpoint the test metrics
    come from); for a run without it (still running, or stopped) the highest ``valid_auc``
    logged so far. A sqlite store that does not exist yet has no runs.

    Example:
        >>> print(format_runs_table(list_runs("sqlite:////tmp/m.db")))   # doctest: +SKIP
    """
    uri = resolve_tracking_uri(uri)
    if not _store_exists(uri):
        return []
    client = _mlflow_client(uri)
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    if not experiments:
        return []
    runs = client.search_runs(
        list(experiments), max_results=max_results, order_by=["attributes.start_time DESC"],
    )
    rows = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        size = tags.get(TAG_EMBEDDING_BYTES)
        rows.append({
            "run_id": run.info.run_id,
            "name": run.info.run_name or tags.get("mlflow.runName", ""),
            "experiment": experiments.get(run.info.experiment_id, run.info.experiment_id),
            "status": run.info.status,
            "start_time": datetime.datetime.fromtimestamp(
                (run.info.start_time or 0) / 1000, tz=datetime.UTC).isoformat(timespec="seconds"),
            "variant": tags.get(TAG_VARIANT),
            "embedding_bytes": int(size) if size and size.isdigit() else None,
            "best_valid_auc": _best_valid_auc(client, run.info.run_id, metrics),
            "test_auc": metrics.get("test_auc"),
        })
    return rows


def _best_valid_auc(client: Any, run_id: str, metrics: dict[str, float]) -> float | None:
    if "best_valid_auc" in metrics:
        return metrics["best_valid_auc"]
    if "valid_auc" not in metrics:
        return None
    history = [m.value for m in client.get_metric_history(run_id, "valid_auc") if math.isfinite(m.value)]
    return max(history) if history else None


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # unreachable; keeps type checkers content


def format_runs_table(rows: list[dict[str, Any]]) -> str:
    """``list_runs`` rows as a fixed-width text table (full run ids, to copy into commands).

    Example:
        >>> print(format_runs_table([{"run_id": "ab12", "name": "deepfm_x", "experiment": "x",
        ...     "status": "FINISHED", "start_time": "2026-01-01T00:00:00+00:00", "variant": "full",
        ...     "embedding_bytes": 2048, "best_valid_auc": 0.75, "test_auc": None}]))
        run_id  name      experiment  status    variant  bytes    best_valid_auc  test_auc  started
        ab12    deepfm_x  x           FINISHED  full     2.0 KiB  0.7500          -         2026-01-01T00:00:00+00:00
    """
    if not rows:
        return "no runs"

    def auc(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    header = ["run_id", "name", "experiment", "status", "variant", "bytes", "best_valid_auc", "test_auc", "started"]
    table = [header] + [
        [str(r["run_id"]), str(r["name"]), str(r["experiment"]), str(r["status"]), str(r["variant"] or "-"),
         _human_bytes(r["embedding_bytes"]), auc(r["best_valid_auc"]), auc(r["test_auc"]), str(r["start_time"])]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in table)


def resolve_run(uri: str | None, run_id: str) -> dict[str, Any]:
    """Everything a command needs about one run: ids, status, tags, params, metrics,
    ``artifact_uri`` and ``checkpoint_dir`` (from the ``recemb.checkpoint_dir`` tag, or None).

    Example:
        >>> resolve_run(None, "4f1c...")["checkpoint_dir"]   # doctest: +SKIP
        'runs/deepfm_synthetic_ctr/checkpoints'
    """
    uri = resolve_tracking_uri(uri)
    if not _store_exists(uri):
        raise TrackingError(f"no MLflow store at {uri} (set --mlflow-uri or MLFLOW_TRACKING_URI)")
    from mlflow.exceptions import MlflowException

    client = _mlflow_client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise TrackingError(f"no MLflow run {run_id!r} in {uri}; `recemb runs list` shows recent runs") from None
    experiment = client.get_experiment(run.info.experiment_id)
    return {
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "experiment_id": run.info.experiment_id,
        "experiment": experiment.name,
        "status": run.info.status,
        "tags": dict(run.data.tags),
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "artifact_uri": run.info.artifact_uri,
        "checkpoint_dir": run.data.tags.get(TAG_CHECKPOINT_DIR),
    }
