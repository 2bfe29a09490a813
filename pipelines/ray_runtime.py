"""Starting (or joining) Ray quietly and safely for this machine or a cluster.

Local default: ``ray.init`` on 127.0.0.1 with no dashboard, no usage stats, a small
object store and a temp dir inside a folder private to the user (Ray makes its own
temp dir world-writable), with fractional CPUs per train worker so Ray Data's read
tasks always find a CPU (on 2 cores whole-CPU workers deadlock), and a reaper
(``pipelines.ray_reaper``) that stops what Ray leaves running if the driver is killed.
A cluster: ``--address`` or ``RAY_ADDRESS``. ``check_train_resources`` refuses a run
the cluster cannot schedule instead of letting it wait forever.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from recemb.errors import ConfigError, RecembError

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
    """Environment for Ray workers (runtime_env): quiet logs, loopback only, and the heap settings
    of ``recemb.heap`` (glibc reads them when a worker process starts)."""
    from recemb.heap import heap_env

    return {**QUIET_ENV, **heap_env()}


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
    temp = private_dir(Path(tempfile.gettempdir()) / f"recemb-{os.getuid()}") / "ray"
    ray.init(
        num_cpus=num_cpus or max(os.cpu_count() or 2, 2),
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=object_store_mb << 20,
        _temp_dir=str(temp),
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": worker_env()},
    )
    _start_reaper()
    return "local"


def is_local(address: str = "") -> bool:
    """Whether ``init_ray(address)`` means a Ray on this machine (no address, no ``RAY_ADDRESS``)."""
    return not (address or os.environ.get("RAY_ADDRESS", ""))


def private_dir(path: Path) -> Path:
    """``path`` as a folder only this user can enter (mode 0700), created if missing.

    Refused (``RecembError``) when it is a symlink, not a folder, or owned by another user:
    a predictable name in a shared temp folder could be planted by someone else.
    """
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise RecembError(f"{path}: expected a folder for Ray's files, found a link or file; remove it")
    if info.st_uid != os.getuid():
        raise RecembError(f"{path}: owned by uid {info.st_uid}, not by you (uid {os.getuid()}); "
                          f"remove it or set TMPDIR to a folder of your own")
    if stat.S_IMODE(info.st_mode) != 0o700:
        path.chmod(0o700)
    return path


_reaper: subprocess.Popen[bytes] | None = None


def _start_reaper() -> None:
    """Start ``pipelines.ray_reaper`` for this process (once; Linux only).

    Its stdin is a pipe whose only writer is this process: when this process dies, however,
    the reaper reads EOF and stops the Ray processes this process left behind.
    """
    global _reaper
    if _reaper is not None and _reaper.poll() is None or not Path("/proc/self/stat").exists():
        return
    _reaper = subprocess.Popen(
        [sys.executable, "-m", "pipelines.ray_reaper", str(os.getpid())],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parents[1], start_new_session=True,
    )


# Ray Data's read tasks ask for one CPU each; a run whose train workers leave less than that
# free never reads a row, and Ray waits silently (seen with 3 workers x 0.5 CPU on 2 cores).
DATA_READ_CPUS = 1.0


def check_train_resources(workers: int, cpus_per_worker: float, gpus: bool, local: bool,
                          what: str = "workers", knob: str = "cluster.cpus_per_worker") -> None:
    """Refuse (``ConfigError``) a Ray run the connected cluster cannot schedule.

    It needs ``workers * cpus_per_worker`` CPUs for the workers (Train workers, or the scoring
    actors of ``recemb evaluate``: ``what``), ``DATA_READ_CPUS`` more for Ray Data's read tasks,
    and a GPU per worker when ``gpus``. On a remote cluster (which may autoscale) a shortfall
    is a warning on stderr instead. ``knob`` names the setting that lowers the CPUs per worker.
    """
    import ray

    total = ray.cluster_resources()
    have_cpu, have_gpu = float(total.get("CPU", 0.0)), float(total.get("GPU", 0.0))
    need_cpu = workers * cpus_per_worker + DATA_READ_CPUS
    problems = []
    if need_cpu > have_cpu + 1e-9:
        most = int((have_cpu - DATA_READ_CPUS) / cpus_per_worker + 1e-9)
        problems.append(
            f"{workers} {what} x {cpus_per_worker:g} CPU + {DATA_READ_CPUS:g} CPU for Ray Data's reads = "
            f"{need_cpu:g} CPUs, but the cluster has {have_cpu:g}; use at most {max(most, 0)} {what} "
            f"(--workers)" + (f" or fewer CPUs each ({knob})" if knob else ""))
    if gpus and workers > have_gpu:
        problems.append(f"{workers} {what} need a GPU each, but the cluster has {have_gpu:g}")
    if not problems:
        return
    message = "; ".join(problems)
    if local:
        raise ConfigError(f"Ray cannot schedule this run (it would wait forever): {message}")
    print(f"[ray] warning: the cluster cannot schedule this run now (it waits until it can): {message}",
          file=sys.stderr, flush=True)
