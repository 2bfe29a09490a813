"""Shared fixtures: a small prepared synthetic CTR dataset and experiment configs over it.

The dataset (20k rows, vocabularies shrunk by ``vocab_scale``) is generated and
prepared once per session, in about a second, and carries the planted signal of
``generate_ctr`` so a model trained on it for an epoch beats chance clearly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from recemb.config.experiment import ExperimentConfig, load_experiment
from recemb.data.preprocess import prepare_dataset
from recemb.data.schema import load_dataset_config
from recemb.data.synthetic import CtrSynthConfig, generate_ctr

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SYNTH_ROWS = 20_000
SYNTH_VOCAB_SCALE = 0.002

# Small and fast settings for end-to-end runs on a CPU (16k training rows -> 31 steps an epoch).
# A fixed sharding type spares the planner its search (2 s of every run); ``auto`` picks it too.
# One epoch unless a test asks for more: base.yaml trains up to 20 with early stopping.
SMALL_RUN = [
    "train.progress=false",
    "train.epochs=1",
    "train.batch_size=512",
    "train.eval_batch_size=4096",
    "embedding.dim=8",
    "embedding.sharding=row_wise",
]
SMALL_MODEL_PARAMS = {
    "lr": "{}",
    "fm": "{}",
    "deepfm": "{mlp: [32, 16]}",
    "wdl": "{mlp: [32, 16]}",
    "dcnv2": "{mlp: [32, 16], cross_layers: 2}",
    "dlrm": "{bottom_mlp: [16], top_mlp: [32, 16]}",
}

MakeExperiment = Callable[..., ExperimentConfig]


@pytest.fixture(scope="session")
def prepared_ctr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a prepared synthetic CTR dataset (``feature_map.json`` and Parquet shards)."""
    root = tmp_path_factory.mktemp("synthetic_ctr")
    raw = root / "ctr.tsv"
    generate_ctr(CtrSynthConfig(rows=SYNTH_ROWS, vocab_scale=SYNTH_VOCAB_SCALE, seed=0), raw)
    cfg = load_dataset_config(
        CONFIGS / "datasets" / "synthetic_ctr.yaml",
        {"paths": [str(raw)], "output": str(root / "prepared")},
    )
    prepare_dataset(cfg)
    return root / "prepared"


def experiment_config(model: str, data_dir: str | Path, output_dir: str | Path,
                      overrides: list[str] | None = None) -> ExperimentConfig:
    """``configs/experiments/<model>_synthetic_ctr.yaml`` over ``data_dir``, small and quiet.

    ``overrides`` (``key.sub=value``) come after the small-run defaults, so they win.
    """
    return load_experiment(
        CONFIGS / "experiments" / f"{model}_synthetic_ctr.yaml",
        [
            f"data_dir={data_dir}",
            f"train.output_dir={output_dir}",
            *SMALL_RUN,
            f"model.params={SMALL_MODEL_PARAMS[model]}",
            *(overrides or []),
        ],
    )


@pytest.fixture
def make_experiment(prepared_ctr: Path, tmp_path: Path) -> MakeExperiment:
    """``make_experiment(model="deepfm", *overrides, output_dir=tmp_path / "runs")``."""

    def make(model: str = "deepfm", *overrides: str, output_dir: Path | None = None) -> ExperimentConfig:
        return experiment_config(model, prepared_ctr, output_dir or tmp_path / "runs", list(overrides))

    return make


@pytest.fixture(scope="session")
def ray_local() -> Iterator[Any]:
    """A quiet local Ray, started once for the whole test session."""
    from pipelines.ray_runtime import init_ray

    init_ray()
    import ray

    yield ray
    ray.shutdown()


@pytest.fixture
def no_process_group() -> Iterator[None]:
    """The test starts and ends without a default process group (in-process ``train`` leaves one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """The module's tests run with one torch thread (exact comparisons, steadier timing on 2 cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def _no_stray_process_group() -> Iterator[None]:
    """In-process ``train`` calls leave a one-rank gloo group; drop it after each test module
    so a later module (e.g. a Ray driver that tags its run's world size) starts clean."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
