"""Experiment tracking: MLflow runs written from rank 0, a no-op on every other rank.

Importing this package does not import mlflow (that happens on first use), so the
command line stays fast. See ``recemb.tracking.mlflow_tracker`` for the details.
"""

from recemb.tracking.mlflow_tracker import (
    TAG_CHECKPOINT_DIR,
    TAG_EMBEDDING_BYTES,
    TAG_FULL_BYTES,
    TAG_GIT_COMMIT,
    TAG_VARIANT,
    TAG_WORLD_SIZE,
    MetricsHook,
    RunStatus,
    Tracker,
    TrackingError,
    current_rank,
    flatten_config,
    format_runs_table,
    list_runs,
    resolve_run,
    resolve_tracking_uri,
)

__all__ = [
    "TAG_CHECKPOINT_DIR",
    "TAG_EMBEDDING_BYTES",
    "TAG_FULL_BYTES",
    "TAG_GIT_COMMIT",
    "TAG_VARIANT",
    "TAG_WORLD_SIZE",
    "MetricsHook",
    "RunStatus",
    "Tracker",
    "TrackingError",
    "current_rank",
    "flatten_config",
    "format_runs_table",
    "list_runs",
    "resolve_run",
    "resolve_tracking_uri",
]
