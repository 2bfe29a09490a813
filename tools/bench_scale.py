"""Single-process training vs 1 and 2 Ray Train workers on the same data, in one run.

Each setting trains the same experiment (same prepared data, epochs, seed and
global batch size) and reports: wall time of the whole call, startup (call start
to the first training step done inside the worker), steady-state samples/s
(training time only, evaluations excluded) and test AUC. Ratios are against the
single-process run. On a 2-core machine no speed-up is expected; the point is
what Ray and sharding cost. Beside them, Ray Train's own floor: the same
``TorchTrainer`` set-up with a function that returns at once (``ray_floor``),
timed on the Ray the runs warmed.

Example:
    python tools/bench_scale.py --rows 400000 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def prepare(rows: int, work: Path) -> Path:
    """Generate and prepare the synthetic CTR data once; return the prepared folder."""
    from recemb.data.preprocess import prepare_dataset
    from recemb.data.schema import load_dataset_config
    from recemb.data.synthetic import CtrSynthConfig, generate_ctr

    raw = work / "ctr.tsv"
    generate_ctr(CtrSynthConfig(rows=rows, seed=0, vocab_scale=0.1), raw)
    cfg = load_dataset_config(CONFIGS / "datasets" / "synthetic_ctr.yaml",
                              {"paths": [str(raw)], "output": str(work / "prepared")})
    prepare_dataset(cfg, overwrite=True)
    return work / "prepared"


def run(workers: int, data: Path, work: Path, model: str, epochs: int, batch: int, sharding: str) -> dict:
    """Train once with ``workers`` (0 = in this process); return the figures."""
    import torch.distributed as dist

    from pipelines.train import run_train
    from recemb.config.experiment import load_experiment

    per_worker = batch // max(workers, 1)
    cfg = load_experiment(CONFIGS / "experiments" / f"{model}_synthetic_ctr.yaml", [
        f"data_dir={data}", f"train.output_dir={work / f'w{workers}'}", f"train.epochs={epochs}",
        f"train.batch_size={per_worker}", "train.progress=false", f"embedding.sharding={sharding}",
    ])
    t0 = time.perf_counter()
    result = run_train(cfg, workers=workers, mlflow_uri=f"sqlite:///{work / 'mlruns.db'}")
    wall = time.perf_counter() - t0
    if dist.is_initialized():
        dist.destroy_process_group()
    inner_start = wall - result.seconds  # Ray/driver time before the worker's train() began
    return {
        "workers": workers, "wall_s": wall, "startup_s": inner_start + result.first_step_seconds,
        "samples_per_s": result.samples_per_s, "test_auc": result.test.get("auc"),
        "test_logloss": result.test.get("logloss"), "steps": result.steps,
    }


def _floor_loop(config: dict) -> None:
    """A Ray Train worker that does nothing: rank 0 writes when it was entered (Ray Train V2 keeps
    no metrics reported without a checkpoint) and returns."""
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        Path(config["entered"]).write_text(repr(time.time()))


def ray_floor(workers: int, work: Path, model: str) -> dict:
    """Ray Train's own start-up on this machine, as ``run`` starts it (the same scaling, backend and
    worker environment) with a function that returns at once: seconds from ``fit()`` to the
    function's entry and to ``fit()``'s return. What no change inside ``_worker_loop`` can remove."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.ray_runtime import init_ray, worker_env
    from recemb.config.experiment import load_experiment

    cfg = load_experiment(CONFIGS / "experiments" / f"{model}_synthetic_ctr.yaml")
    init_ray(cfg.cluster.address)
    entered = work / "floor-entered"
    trainer = TorchTrainer(
        _floor_loop,
        train_loop_config={"entered": str(entered)},
        scaling_config=ScalingConfig(num_workers=workers,
                                     resources_per_worker={"CPU": cfg.cluster.cpus_per_worker}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=f"floor-{time.time_ns()}", storage_path=str(work / "ray-floor"),
                             worker_runtime_env={"env_vars": worker_env()}),
    )
    t0 = time.time()
    trainer.fit()
    done = time.time()
    return {"workers": workers, "entered_s": float(entered.read_text()) - t0, "fit_s": done - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4096, help="global batch size")
    parser.add_argument("--model", default="deepfm")
    parser.add_argument("--sharding", default="table_wise")
    parser.add_argument("--out", type=Path, default=Path("bench-out/bench_scale.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recemb-bench-scale-"))
    data = prepare(args.rows, work)
    rows = [run(w, data, work, args.model, args.epochs, args.batch, args.sharding) for w in (0, 1, 2)]
    floor = ray_floor(2, work, args.model)
    base = rows[0]
    print(f"load average at the end: {os.getloadavg()}")
    print(f"Ray Train's floor, x2 workers that do nothing (warm Ray): function entered {floor['entered_s']:.1f} s "
          f"after fit(), fit() returned after {floor['fit_s']:.1f} s")
    print(f"{'setting':<16}{'wall s':>9}{'startup s':>11}{'samples/s':>12}{'ratio':>8}{'test AUC':>10}")
    for r in rows:
        name = "single process" if r["workers"] == 0 else f"ray x{r['workers']}"
        ratio = r["samples_per_s"] / base["samples_per_s"]
        r["ratio_to_single"] = ratio
        print(f"{name:<16}{r['wall_s']:>9.1f}{r['startup_s']:>11.1f}{r['samples_per_s']:>12.0f}"
              f"{ratio:>8.2f}{r['test_auc']:>10.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows, "ray_floor": floor},
                                   indent=2))


if __name__ == "__main__":
    main()
