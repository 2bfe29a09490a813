"""A training run's console carries our lines, not the known-harmless torch/torchrec/FBGEMM/MLflow
warnings; each is dropped by its category (or logger) and message only, so others still show."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from recemb.train.quiet import KNOWN_LOG_RECORDS, KNOWN_WARNINGS, quiet_known_warnings

ROOT = Path(__file__).resolve().parents[1]


def test_known_warnings_are_dropped_and_others_kept() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        for category, message, _ in KNOWN_WARNINGS:
            warnings.warn(message + " (and the rest of the library's text)", category, stacklevel=1)
        warnings.warn("`broadcast_buffers` is deprecated", UserWarning, stacklevel=1)  # another category
        warnings.warn("a new FutureWarning of torchrec", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["`broadcast_buffers` is deprecated", "a new FutureWarning of torchrec"]


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_known_log_records_are_dropped_and_others_kept() -> None:
    quiet_known_warnings()
    quiet_known_warnings()  # twice: one filter per logger
    for name, prefixes in KNOWN_LOG_RECORDS.items():
        logger = logging.getLogger(name)
        assert len(logger.filters) == 1
        keep = _Keep()
        logger.addHandler(keep)
        try:
            for prefix in prefixes:
                logger.warning("%s and more", prefix)
            logger.warning("something else went wrong")
        finally:
            logger.removeHandler(keep)
        assert keep.messages == ["something else went wrong"], name


@pytest.mark.usefixtures("no_process_group")
def test_a_training_run_prints_no_library_warnings(prepared_ctr: Path, tmp_path: Path) -> None:
    config = ROOT / "configs" / "experiments" / "deepfm_synthetic_ctr.yaml"
    cmd = [sys.executable, "-m", "recemb.cli", "train", "--config", str(config), f"data_dir={prepared_ctr}",
           f"train.output_dir={tmp_path / 'runs'}", "train.max_steps=2", "train.batch_size=512",
           "embedding.dim=8", "model.params={mlp: [16]}", "train.progress=false",
           "--mlflow-uri", f"sqlite:///{tmp_path / 'mlruns.db'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.strip() == "", done.stderr[-3000:]
    assert "[metrics] split=test" in done.stdout
