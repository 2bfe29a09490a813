"""Starting (or joining) Ray quietly and safely for this machine or a cluster.

Local default: ``ray.init`` on 127.0.0.1 with no dashboard, no usage stats, a small
object store and an explicit temp dir, with fractional CPUs per train worker so
Ray Data's read tasks always find a CPU (on 2 cores whole-CPU workers deadlock).
A cluster: ``--address`` or ``RAY_ADDRESS``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_TRAIN_V2_ENABLED": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PYTHONWARNINGS": "ignore",
}


def apply_quiet_env() -> None:
    """Set the quiet/loopback variables unless the user set them (before ``import ray``:
    Ray reads some of them, e.g. the loopback switch, when it is imported)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


apply_quiet_env()


def worker_env() -> dict[str, str]:
    """Environment for Ray workers (runtime_env): quiet logs, loopback only."""
    return dict(QUIET_ENV)


def init_ray(address: str = "", num_cpus: int | None = None, object_store_mb: int = 512) -> str:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a quiet local Ray.

    Returns the address it is connected to. Idempotent: an initialised Ray is reused.
    """
    apply_quiet_env()
    import ray

    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": worker_env()})
        return address
    temp = Path(tempfile.gettempdir()) / f"recemb-ray-{os.getuid()}"
    temp.mkdir(parents=True, exist_ok=True)
    ray.init(
        num_cpus=num_cpus or max(os.cpu_count() or 2, 2),
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=object_store_mb << 20,
        _temp_dir=str(temp),
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": worker_env()},
    )
    return "local"
