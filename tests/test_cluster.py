"""The cluster path as the README writes it: a Ray head started here (``ray start --head``), then
``recemb train --workers 2`` against it by GCS address and by Ray Client (``ray://``), and
``ray job submit`` of the same command. Slow (three Ray starts)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def head() -> Iterator[dict[str, str]]:
    """A Ray head of its own (``ray start --head --block`` in a new session), killed by session id
    at the end: ``ray stop`` would stop every Ray on the machine. The temp dir is short because
    Ray's socket paths must stay under the OS limit."""
    gcs, client, dash = _free_port(), _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
                             f"--ray-client-server-port={client}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", "--num-cpus=2", f"--temp-dir={temp}",
                             "--disable-usage-stats"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([str(BIN / "ray"), "status", f"--address=127.0.0.1:{gcs}"], env=env,
                             capture_output=True).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(2)
        yield {"gcs": f"127.0.0.1:{gcs}", "client": f"ray://127.0.0.1:{client}", "dashboard": f"http://127.0.0.1:{dash}"}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def _data(tmp: Path) -> Path:
    from recemb.data.preprocess import prepare_dataset
    from recemb.data.schema import load_dataset_config
    from recemb.data.synthetic import CtrSynthConfig, generate_ctr

    generate_ctr(CtrSynthConfig(rows=8_000, seed=1, vocab_scale=0.02), tmp / "ctr.tsv")
    cfg = load_dataset_config(REPO / "configs" / "datasets" / "synthetic_ctr.yaml",
                              {"paths": [str(tmp / "ctr.tsv")], "output": str(tmp / "prepared")})
    prepare_dataset(cfg)
    return tmp / "prepared"


@pytest.mark.slow
def test_train_against_a_started_head(tmp_path: Path, head: dict[str, str]) -> None:
    data = _data(tmp_path)
    common = ["--config", str(REPO / "configs" / "experiments" / "deepfm_synthetic_ctr.yaml"), "--workers", "2",
              "--mlflow-uri", f"sqlite:///{tmp_path / 'mlruns.db'}", f"data_dir={data}",
              f"train.output_dir={tmp_path / 'runs'}", "train.progress=false", "train.batch_size=1024"]
    for address in (head["gcs"], head["client"]):
        out = subprocess.run([str(BIN / "recemb"), "train", "--address", address, *common, f"expid=via_{address[:3]}"],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        assert '"auc"' in out.stdout
    job = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", head["dashboard"], "--working-dir",
                          str(tmp_path / "prepared"), "--", str(BIN / "recemb"), "train", *common, "expid=via_job"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout.lower()
