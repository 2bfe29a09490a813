"""``recemb prepare``: a dataset YAML to Parquet shards, feature map and stats.

``workers=0`` prepares in this process (streaming, bounded memory). ``workers=N`` fans the
per-file stages out as Ray tasks, at most N at a time: one ``fit_into`` per input file (its
``PartialStats`` come back to the driver, which merges them in file order: the vocabulary
fit is a reduce over per-file counts), then one ``transform_into`` per file writing shards
with a per-file prefix. Planning, finalizing and the commit are the local path's own code,
so the feature map, rows and stats equal the single-process ones; only shard names differ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from recemb.config.loader import parse_overrides
from recemb.data.preprocess import (
    FittedFeatures,
    PartialStats,
    PrepareReport,
    SplitPlan,
    TransformStats,
    fit_into,
    join_rejects,
    join_shards,
    prepare_dataset,
    prepare_with_runner,
    transform_into,
)
from recemb.data.schema import DatasetConfig, load_dataset_config
from recemb.data.sources import SourceFile
from recemb.errors import ConfigError, RecembError

# Per task: reading, parsing and Parquet encoding are mostly one core each; fractional CPUs
# let a 2-core node run the N tasks and anything else Ray schedules (see STACK.md).
TASK_CPUS = 0.5


class RayRunner:
    """Per-file fit and transform as Ray tasks, at most ``workers`` in flight, results in file order.

    Ray is joined (``init_ray(address)``) on the first stage, so a prepare that fails its
    checks starts nothing; ``close`` shuts down a Ray this runner started. The temp output
    (spills, per-file rejects, shards) is written by the tasks, so on a cluster the output
    folder must be on a filesystem every node shares.

    Example:
        >>> runner = RayRunner(workers=2)                                  # doctest: +SKIP
        >>> try:                                                           # doctest: +SKIP
        ...     prepare_with_runner(cfg, runner, "out")
        ... finally:
        ...     runner.close()
    """

    def __init__(self, workers: int, address: str = "", task_cpus: float = TASK_CPUS) -> None:
        self.workers, self.address, self.task_cpus = workers, address, task_cpus
        self._started: bool | None = None

    def _remote(self, fn: Callable[..., Any]) -> Any:
        from pipelines.ray_runtime import init_ray  # before ray: it sets Ray's quiet environment

        if self._started is None:
            self._started = init_ray(self.address) != "existing"
        import ray

        return ray.remote(num_cpus=self.task_cpus, max_retries=0)(fn)

    def close(self) -> None:
        """Shut down the local Ray this runner started (a Ray that was running is left alone)."""
        if self._started:
            import ray

            ray.shutdown()
        self._started = None

    def fit(self, cfg: DatasetConfig, plan: SplitPlan, sources: Sequence[SourceFile],
            tmp: Path) -> list[PartialStats]:
        fit = self._remote(fit_into)
        import ray

        cfg_ref, plan_ref = ray.put(cfg), ray.put(plan)
        parts = _map_in_order(fit.remote, [(cfg_ref, plan_ref, s, tmp) for s in sources], self.workers)
        join_rejects(tmp, sources)
        return parts

    def transform(self, cfg: DatasetConfig, fitted: FittedFeatures, plan: SplitPlan,
                  sources: Sequence[SourceFile], tmp: Path) -> tuple[dict[str, list[str]], TransformStats]:
        transform = self._remote(transform_into)
        import ray

        for name in fitted.vocabs:
            fitted.index(name)  # built once here and shared read-only, not once per task
        refs = ray.put(cfg), ray.put(fitted), ray.put(plan)
        outs = _map_in_order(transform.remote, [(*refs, s, tmp) for s in sources], self.workers)
        tstats = TransformStats()
        for _, ts in outs:
            tstats.merge(ts)
        return join_shards(cfg, fitted, tmp, [shards for shards, _ in outs]), tstats


def _map_in_order(submit: Callable[..., Any], calls: Sequence[tuple[Any, ...]], window: int) -> list[Any]:
    """Run ``submit(*args)`` for each call with at most ``window`` in flight; results in call order.

    On the first failure no new task starts and those in flight are waited for (they write
    into the temp output the caller is about to remove); a ``RecembError`` raised in a task
    is re-raised as itself, so the CLI prints it as one line. In-flight tasks are not
    cancelled: in Ray 2.60 ``ray.cancel`` on a task whose reply is already on its way aborts
    the driver (``Check failed: ... Tried to complete task that was not pending``, exit 1
    with nothing on stderr; seen here in this function's test). On Ctrl-C nothing is waited
    for: the tasks die with the driver's Ray.
    """
    import ray
    from ray.exceptions import RayTaskError

    results: list[Any] = [None] * len(calls)
    running: dict[Any, int] = {}
    todo = iter(range(len(calls)))
    try:
        while True:
            for k in todo:
                running[submit(*calls[k])] = k
                if len(running) >= window:
                    break
            if not running:
                return results
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                try:
                    results[running.pop(ref)] = ray.get(ref)
                except RayTaskError as exc:
                    if isinstance(exc.cause, RecembError):
                        raise exc.cause from None
                    raise
    except Exception:
        if running:
            ray.wait(list(running), num_returns=len(running))
        raise


def run_prepare(
    config: str | Path,
    overrides: list[str] | None = None,
    output: str | Path | None = None,
    overwrite: bool = False,
    max_reject_fraction: float | None = None,
    workers: int = 0,
    address: str = "",
) -> PrepareReport:
    """Load the dataset YAML (with ``key=value`` overrides) and prepare it.

    ``workers=0`` runs in this process; ``workers=N`` runs N per-file Ray tasks at a time on
    the cluster at ``address`` (or ``RAY_ADDRESS``), else on a local Ray started (and shut
    down) here unless one is already running.

    Example:
        >>> run_prepare("configs/datasets/criteo.yaml", ["paths=[day_*.tsv]"], workers=4)  # doctest: +SKIP
    """
    if workers < 0:
        raise ConfigError(f"workers must be >= 0 (0 = in this process), got {workers}")
    cfg = load_dataset_config(config, parse_overrides(overrides or [], where=str(config)))
    if workers == 0:
        return prepare_dataset(cfg, output=output, overwrite=overwrite, max_reject_fraction=max_reject_fraction)
    runner = RayRunner(workers, address)
    try:
        return prepare_with_runner(cfg, runner, output=output, overwrite=overwrite,
                                   max_reject_fraction=max_reject_fraction)
    finally:
        runner.close()
