"""Ray faults: no silent hang, no leftover processes, no shared temp folder.

- A run the local cluster cannot schedule (``--workers 3`` on 2 cores) is refused at
  once; before, Ray Data's read tasks never got a CPU and the run waited forever.
- A driver killed with SIGKILL leaves no Ray process of its own running 30 s later
  (Ray's agents used to outlive it by 45-75 s).
- Ray's files live in a folder only the user can enter; one owned by someone else
  or planted as a symlink is refused.
- The driver prints progress, and says when nothing moves, instead of waiting silently.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.ray_progress import ProgressWatch, start_board
from pipelines.ray_reaper import _alive, descendants, process_table, terminate
from pipelines.ray_runtime import check_train_resources, private_dir
from pipelines.train import run_train
from recemb.errors import ConfigError, RecembError
from recemb.tracking import list_runs

ROOT = Path(__file__).resolve().parents[1]


def test_unschedulable_worker_count_is_refused_at_once(ray_local: object, make_experiment,
                                                       tmp_path: Path) -> None:
    import ray

    cpus = ray.cluster_resources()["CPU"]
    workers = int(cpus / 0.5)  # every CPU taken by workers: nothing left for Ray Data's reads
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    start = time.monotonic()
    with pytest.raises(ConfigError, match="Ray cannot schedule this run") as err:
        run_train(make_experiment("lr"), workers=workers, mlflow_uri=uri)
    assert time.monotonic() - start < 60
    assert f"{workers} workers x 0.5 CPU" in str(err.value)
    assert "use at most" in str(err.value)
    assert list_runs(uri) == []  # refused before it was tracked


def test_resource_check_passes_what_fits_and_warns_on_remote(ray_local: object,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import ray

    cpus = ray.cluster_resources()["CPU"]
    check_train_resources(1, 0.5, gpus=False, local=True)
    check_train_resources(int(cpus), 1.0, gpus=False, local=False)  # a remote cluster may autoscale
    assert "cannot schedule this run now" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="need a GPU each"):
        check_train_resources(1, 0.5, gpus=True, local=True)
    # recemb evaluate's scoring actors are checked the same way.
    with pytest.raises(ConfigError, match=r"scoring actors x 0.5 CPU .* use at most \d+ scoring actors \(--workers\)$"):
        check_train_resources(int(cpus / 0.5), 0.5, gpus=False, local=True, what="scoring actors", knob="")


def test_private_dir_is_0700_and_refuses_links_and_files(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    assert private_dir(folder) == folder
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    fresh = private_dir(tmp_path / "fresh" / "deeper")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    link = tmp_path / "planted"
    link.symlink_to(folder)
    with pytest.raises(RecembError, match="found a link or file"):
        private_dir(link)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RecembError, match="found a link or file"):
        private_dir(tmp_path / "afile")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to create a folder owned by another user")
def test_private_dir_refuses_a_folder_of_another_user(tmp_path: Path) -> None:
    other = tmp_path / "theirs"
    other.mkdir(mode=0o700)
    os.chown(other, 12345, 12345)
    with pytest.raises(RecembError, match="owned by uid 12345"):
        private_dir(other)


def test_local_ray_temp_folder_is_private(ray_local: object) -> None:
    import tempfile

    base = Path(tempfile.gettempdir()) / f"recemb-{os.getuid()}"
    assert (base / "ray").is_dir()
    assert stat.S_IMODE(base.stat().st_mode) == 0o700


_DRIVER = """
import os, sys, time
sys.path.insert(0, {root!r})
from pipelines.ray_runtime import init_ray
init_ray()
import ray

@ray.remote(num_cpus=0.25)
def sleeper():
    time.sleep(600)

@ray.remote(num_cpus=0.25)
class Holder:
    def ping(self):
        return 1

holder = Holder.remote()
ray.get(holder.ping.remote())
task = sleeper.remote()
time.sleep(2)
print("READY", flush=True)
time.sleep(600)
"""


def test_sigkilled_driver_leaves_no_ray_process_behind(tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER.format(root=str(ROOT)))
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, start_new_session=True)
    try:
        assert driver.stdout is not None
        line = driver.stdout.readline()
        assert line.strip() == "READY", f"driver did not start Ray: {line!r}"
        table = process_table()
        ours = descendants(driver.pid, table)
        names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in ours}
        assert any(b"raylet" in n for n in names.values()) and any(b"ray::" in n for n in names.values())
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=10)
        deadline = time.monotonic() + 30
        alive = dict(ours)
        while alive and time.monotonic() < deadline:
            now = process_table()
            alive = {p: s for p, s in alive.items() if p in now and now[p][1] == s}
            time.sleep(0.5)
        left = {p: names[p][:80] for p in alive}
        assert not left, f"Ray processes still running 30 s after the driver was killed: {left}"
    finally:
        if driver.poll() is None:
            driver.kill()


def test_progress_watch_reports_moves_and_stalls(ray_local: object) -> None:
    board = start_board()
    watch = ProgressWatch(board, workers=2, cpus_per_worker=0.5, every_s=0.5, stall_s=1.0)
    watch.start()
    try:
        time.sleep(2.5)  # nothing posted: a stall line, with the cluster's free CPUs
        board.update.remote(0, 4096, 4096)
        time.sleep(1.5)
        board.update.remote(0, 8192, 8192)
        time.sleep(1.5)
    finally:
        watch.stop()
    assert any(line.startswith("[ray] no training step yet for") and "free of" in line for line in watch.lines)
    assert any(line.startswith("[ray] epoch 0:") and "rows trained on rank 0" in line for line in watch.lines)


def test_reaper_never_signals_a_process_that_reused_a_pid() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = process_table()[sleeper.pid][1]
        assert _alive(sleeper.pid, start)
        # A recorded start time that differs is another process that got the same pid: left alone.
        assert terminate({sleeper.pid: start + 1}, grace_s=0.2) == []
        assert sleeper.poll() is None
        assert terminate({sleeper.pid: start}, grace_s=2.0) == [sleeper.pid]
        assert sleeper.wait(timeout=5) is not None
    finally:
        if sleeper.poll() is None:
            sleeper.kill()


def test_rank0_records_reach_the_drivers_mlflow_run_through_the_board(ray_local: object, make_experiment,
                                                                      tmp_path: Path) -> None:
    """What rank 0 would have written to MLflow arrives in the driver's run, in order; a write that fails
    comes back from ``stop`` instead of being lost."""
    import ray

    from pipelines.ray_progress import BoardTracker, TrackingRelay
    from recemb.tracking import Tracker, resolve_run

    cfg = make_experiment("dcnv2", "train.epochs=1")
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlruns.db'}", rank=0)
    run_id = tracker.start(cfg)
    board = start_board()
    relay = TrackingRelay(board, tracker, cfg, every_s=0.2)
    relay.start()

    @ray.remote(num_cpus=0)
    def rank0(board: object) -> None:
        posted = BoardTracker(board)
        posted.resumed()
        posted.set_tags({"recemb.restored_from": "/x/last"})
        for step in (10, 20):
            posted.log_metrics(step, {"auc": step / 100}, split="valid")
        posted.log_dict({"steps": 20}, "result_worker.json")
        posted.flush()

    ray.get(rank0.remote(board))
    BoardTracker(None).log_metrics(1, {"auc": 9.0})  # other ranks post nothing
    assert relay.stop() is None
    run = resolve_run(tracker.uri, run_id)
    assert run["tags"]["recemb.restored_from"] == "/x/last"
    assert run["tags"]["recemb.resumes"] == "1"
    history = tracker.client.get_metric_history(run_id, "valid_auc")
    assert [(m.step, m.value) for m in history] == [(10, 0.1), (20, 0.2)]
    assert "result_worker.json" in {a.path for a in tracker.client.list_artifacts(run_id)}
    # A record the driver cannot write is returned by stop(), not dropped.
    broken = TrackingRelay(board, None, cfg)
    ray.get(board.post.remote(("tags", {"a": "b"})))
    assert isinstance(broken.stop(), AttributeError)
    ray.kill(board)
