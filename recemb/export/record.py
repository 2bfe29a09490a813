"""An export recorded in its source run's MLflow store: the manifest as an artifact, the path as a tag.

When an export knows the MLflow run its checkpoint came from (the run id was given, the
run folder's ``result.json`` names it, or a run of the store carries the checkpoint's
folder in its ``recemb.checkpoint_dir`` tag), the bundle's ``manifest.json`` and
``manifest.json.sha256`` are logged as artifacts of that run under ``export/<dtype>/``
and the run is tagged ``recemb.bundle.<dtype> = <absolute bundle path>``. Tracking never
fails an export: an unreachable or missing store is a one-line warning on stderr.

Example:
    >>> record_export(Path("bundles/deepfm"), "4f1c...", "sqlite:////tmp/m.db", "int8")  # doctest: +SKIP
    True
"""

from __future__ import annotations

import sys
from pathlib import Path

from recemb.export.format import MANIFEST, MANIFEST_DIGEST

TAG_BUNDLE_PREFIX = "recemb.bundle."
ARTIFACT_DIR = "export"


def _warn(message: str) -> None:
    line = " ".join(message.split())
    print(f"[mlflow] warning: {line if len(line) <= 400 else line[:397] + '...'}", file=sys.stderr, flush=True)


def find_source_run(uri: str | None, checkpoint: Path) -> str | None:
    """The run of ``uri``'s store whose ``recemb.checkpoint_dir`` tag is ``checkpoint``'s folder, if one is.

    Only an existing store is searched (a sqlite file that is not there is not created), and a
    store that cannot be read is a warning, not an error: the export then just names no run.
    """
    from recemb.tracking import TAG_CHECKPOINT_DIR, Tracker

    try:
        tracker = Tracker(uri, rank=0)
        if tracker.uri.startswith("sqlite:///") and not Path(tracker.uri[len("sqlite:///"):].partition("?")[0]).is_file():
            return None
        client = tracker.client
        folder = str(checkpoint.resolve().parent).replace("'", "\\'")
        experiments = [e.experiment_id for e in client.search_experiments()]
        if not experiments:
            return None
        runs = client.search_runs(experiments, filter_string=f"tags.`{TAG_CHECKPOINT_DIR}` = '{folder}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
    except Exception as e:  # tracking never fails an export
        _warn(f"could not search the MLflow store for the run of {checkpoint} ({type(e).__name__}: {e})")
        return None
    return runs[0].info.run_id if runs else None


def record_export(bundle: Path, run_id: str, uri: str | None, dtype: str) -> bool:
    """Log ``bundle``'s manifest and its sha256 under ``export/<dtype>/`` of ``run_id`` and tag the run with
    the bundle's path; ``False`` (and a one-line warning) when the store cannot be written."""
    from recemb.tracking import Tracker, resolve_run

    try:
        resolve_run(uri, run_id)  # the store exists and holds the run
        tracker = Tracker(uri, rank=0)
        tracker.run_id = run_id  # an existing run: written to, not restarted
        for name in (MANIFEST, MANIFEST_DIGEST):
            tracker.log_artifact(bundle / name, f"{ARTIFACT_DIR}/{dtype}")
        tracker.set_tags({f"{TAG_BUNDLE_PREFIX}{dtype}": str(bundle.resolve())})
    except Exception as e:  # tracking never fails an export
        _warn(f"bundle {bundle} written, but not recorded in MLflow run {run_id} ({type(e).__name__}: {e})")
        return False
    return True


__all__ = ["ARTIFACT_DIR", "TAG_BUNDLE_PREFIX", "find_source_run", "record_export"]
