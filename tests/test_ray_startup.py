"""The Ray start-up line: stage seconds from the driver's and rank 0's marks, and the import
boundary that keeps the CLI light (torch, torchrec and Ray load only for the commands using them)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.ray_progress import ProgressBoard, StartupClock, process_start_time
from pipelines.train import run_train
from recemb.errors import ConfigError


def test_startup_line_gives_each_stage_and_the_total_to_the_first_step() -> None:
    clock = StartupClock(start=100.0)
    for name, at in (("imported", 101.5), ("config", 102.0), ("ray", 104.0), ("mlflow", 104.5),
                     ("data", 105.0)):
        clock.mark(name, at)
    clock.mark("data", 999.0)  # the first mark of a name counts
    board = ProgressBoard()
    for name, at in (("wimported", 108.0), ("worker", 108.5), ("model", 109.0), ("batch", 109.2),
                     ("step", 109.8)):
        board.mark(name, at)
    board.mark("worker", 200.0)  # a restarted worker group keeps the first start-up's marks
    assert clock.line(board.read_marks()) == (
        "[ray] start-up: 9.8 s to the first step (imports 1.5 s, config 0.5 s, ray.init 2.0 s, "
        "mlflow run 0.5 s, data open 0.5 s, workers up 3.0 s, fn call 0.5 s, model+plan 0.5 s, "
        "first batch 0.2 s, first step 0.6 s)")


def test_startup_line_without_a_second_batch_names_the_last_stage_seen() -> None:
    clock = StartupClock(start=10.0)
    clock.mark("imported", 11.0)
    clock.mark("ray", 13.0)
    assert clock.line({"batch": 14.0}) == \
        "[ray] start-up: 4.0 s to the last stage seen (imports 1.0 s, ray.init 2.0 s, first batch 1.0 s)"


def test_process_start_time_is_before_now_and_recent() -> None:
    started = process_start_time()
    assert started <= time.time() + 0.05
    assert time.time() - started < 24 * 3600


def test_cli_import_loads_neither_torch_nor_ray() -> None:
    code = ("import sys, recemb.cli; "
            "print(sorted(m for m in ('torch', 'torchrec', 'ray', 'mlflow', 'pyarrow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_config_error_while_ray_starts_is_raised_and_leaves_ray_as_it_was(prepared_ctr: Path,
                                                                          tmp_path: Path) -> None:
    """With ``--workers`` Ray starts while the config loads; a config error still wins, and a Ray
    started for the run is shut down again (as when the config was checked before Ray)."""
    import ray

    before = ray.is_initialized()
    with pytest.raises(ConfigError, match="bogus"):
        run_train("configs/experiments/deepfm_synthetic_ctr.yaml",
                  [f"data_dir={prepared_ctr}", f"train.output_dir={tmp_path}", "embedding.kind=bogus"],
                  workers=2, mlflow_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    assert ray.is_initialized() == before
    assert not (tmp_path / "mlruns.db").exists()  # nothing was tracked
