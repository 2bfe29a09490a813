"""Learning-rate schedules (``train.lr_schedule``): the formulas, FBGEMM's fused kernels following
the rate, every optimizer of a run on one rank and on two, and exact resume.

Runs use the session dataset of ``conftest.py`` (16,030 training rows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_utils import in_process_run, run_ranks
from test_sharding import MODEL, feature_map, local_batch
from torch import nn

from recemb.config.experiment import EmbeddingConfig, ExperimentConfig, LrSchedule, TrainConfig
from recemb.config.loader import from_dict
from recemb.data.batch import epoch_steps
from recemb.embeddings.sharding import ensure_process_group, local_pieces, shard_model
from recemb.errors import ConfigError
from recemb.models.registry import build_model
from recemb.train.loop import TrainResult, patience_spent, run_steps, train
from recemb.train.schedule import LrScheduler, optimizer_rates, run_rates, self_updating_rates

MakeExperiment = Callable[..., ExperimentConfig]  # the conftest fixture
TRAIN_ROWS = 16_030
DENSE_LR = 1e-3  # base.yaml
EMB_LR = 0.01

pytestmark = pytest.mark.usefixtures("no_process_group")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_train(cfg: ExperimentConfig, **kwargs: Any) -> TrainResult:
    with in_process_run():
        return train(cfg, **kwargs)


def kernel_rates(model: nn.Module) -> list[float]:
    """The learning rate inside every FBGEMM kernel of a sharded model (what the fused update uses).

    The kernels are not submodules; torchrec's fused optimizers hold them (``_emb_module``, private,
    read here only to check what the kernel got).
    """
    out: list[float] = []
    todo = [model.fused_optimizer]
    while todo:
        opt = todo.pop()
        if hasattr(opt, "optimizers"):
            todo.extend(o for _, o in opt.optimizers)
        elif hasattr(opt, "_emb_module"):
            out.append(opt._emb_module.get_learning_rate())
    return out


def linear(base: float, done: int, total: int, final: float) -> float:
    return base * (1 - (1 - final) * done / total)


# ----------------------------------------------------------------------------- the schedule alone


def sgd(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def test_linear_rates_by_step() -> None:
    dense, tables = sgd(0.1), sgd(0.5)
    rates = optimizer_rates("dense", dense) + optimizer_rates("embedding", tables)
    schedule = LrScheduler(LrSchedule(kind="linear", final_fraction=0.2), total_steps=8, rates=rates)
    for step in (0, 1, 5, 8, 20):
        schedule.apply(step)
        frac = 1 - 0.8 * min(step, 8) / 8
        assert dense.param_groups[0]["lr"] == pytest.approx(0.1 * frac, rel=1e-12)
        assert tables.param_groups[0]["lr"] == pytest.approx(0.5 * frac, rel=1e-12)
        assert schedule.current() == pytest.approx({"lr_dense": 0.1 * frac, "lr_embedding": 0.5 * frac})
    assert not schedule.observe(0.0)  # evaluations do not move a linear schedule


def test_plateau_drops_after_patience_evaluations_down_to_min_lr() -> None:
    dense, tables = sgd(1e-3), sgd(1e-1)
    schedule = LrScheduler(LrSchedule(kind="plateau", factor=0.1, patience=2, min_lr=1e-3),
                           total_steps=0, rates=optimizer_rates("dense", dense) + optimizer_rates("embedding", tables))
    drops = [schedule.observe(s) for s in (0.70, 0.72, 0.71, 0.72, 0.73, 0.73, 0.60)]
    # 0.71 and 0.72 do not beat 0.72 (two in a row: drop); 0.73 does; 0.73 and 0.60 do not (drop).
    assert drops == [False, False, False, True, False, False, True]
    schedule.apply(step=123)
    assert schedule.scale == pytest.approx(0.01)
    assert tables.param_groups[0]["lr"] == pytest.approx(1e-3)  # 0.1 x 0.01, at min_lr
    assert dense.param_groups[0]["lr"] == pytest.approx(1e-3)   # started at min_lr: stays there
    assert schedule.observe(0.5) is False and schedule.observe(0.5) is True
    schedule.apply(step=124)
    assert tables.param_groups[0]["lr"] == pytest.approx(1e-3)  # not below min_lr


@pytest.mark.parametrize("patience", [1, 2, 3])
def test_plateau_and_early_stopping_count_evaluations_alike(patience: int) -> None:
    """``lr_schedule.patience=p`` drops the rates at the p-th evaluation in a row without improvement,
    where ``train.patience=p`` would stop the run (neither one evaluation later)."""
    opt = sgd(1.0)
    schedule = LrScheduler(LrSchedule(kind="plateau", factor=0.5, patience=patience), total_steps=0,
                           rates=optimizer_rates("dense", opt))
    assert schedule.observe(0.7) is False  # the first evaluation improves on nothing
    assert [schedule.observe(0.6) for _ in range(patience)] == [False] * (patience - 1) + [True]
    assert [patience_spent(bad, patience) for bad in range(1, patience + 1)] == [False] * (patience - 1) + [True]


def test_none_leaves_every_rate_alone() -> None:
    opt = sgd(0.3)
    schedule = LrScheduler(LrSchedule(kind="none"), total_steps=0, rates=optimizer_rates("dense", opt))
    opt.param_groups[0]["lr"] = 0.25  # whatever set it, a schedule of kind none does not touch it
    schedule.apply(step=5)
    assert opt.param_groups[0]["lr"] == 0.25 and not schedule.active


def test_lr_schedule_config() -> None:
    cfg = from_dict(TrainConfig, {"lr_schedule": {"kind": "linear"}})
    assert cfg.lr_schedule == LrSchedule(kind="linear", final_fraction=0.0)
    # The default: decay on plateau (x0.1 at the first evaluation without improvement, down to 1e-6).
    assert TrainConfig().lr_schedule == LrSchedule(kind="plateau", factor=0.1, patience=1, min_lr=1e-6)
    assert from_dict(TrainConfig, {"lr_schedule": {"kind": "none"}}).lr_schedule.kind == "none"
    for bad, message in [({"kind": "cosine"}, r"'lr_schedule\.kind' must be one of"),
                         ({"factor": 1.0}, r"factor must be in \(0, 1\)"),
                         ({"final_fraction": 1.5}, r"final_fraction must be in \[0, 1\]"),
                         ({"patience": 0}, r"patience must be >= 1"),
                         ({"min_lr": -1.0}, r"min_lr must be >= 0"),
                         ({"warmup": 3}, r"unknown key 'lr_schedule\.warmup'")]:
        with pytest.raises(ConfigError, match=message):
            from_dict(TrainConfig, {"lr_schedule": bad})


def test_run_steps_counts_epochs_and_caps_at_max_steps() -> None:
    per_epoch = epoch_steps(TRAIN_ROWS, 512, 1)
    assert run_steps(TrainConfig(epochs=3, batch_size=512), TRAIN_ROWS, 1) == 3 * per_epoch
    assert run_steps(TrainConfig(epochs=3, batch_size=512, max_steps=40), TRAIN_ROWS, 1) == 40
    assert run_steps(TrainConfig(epochs=2, batch_size=256), TRAIN_ROWS, 2) == 2 * epoch_steps(TRAIN_ROWS, 256, 2)


# ----------------------------------------------------------------------------- FBGEMM's fused kernels


def test_fused_sgd_update_scales_with_the_scheduled_rate() -> None:
    """A loss linear in the pooled embeddings has the same gradient at every step, so FBGEMM's
    fused SGD moves each looked-up row by ``lr x`` that gradient: the moves of two steps are in
    the ratio of the two scheduled rates, and a rate of 0 leaves the tables still."""
    ensure_process_group()
    try:
        torch.manual_seed(0)
        cfg = EmbeddingConfig(dim=8, sharding="table_wise", optimizer="exact_sgd", lr=0.4)
        dmp = shard_model(build_model(MODEL, feature_map(), cfg, device=torch.device("meta")), cfg,
                          torch.device("cpu")).model
        rates, push = run_rates(dmp, sgd(1.0), None, dmp.fused_optimizer)
        assert [r.base for r in rates if r.name == "embedding"] == pytest.approx([0.4] * (len(rates) - 1))
        schedule = LrScheduler(LrSchedule(kind="linear", final_fraction=0.0), total_steps=4, rates=rates,
                               after_set=push)
        batch = local_batch(0, 0)
        weight = torch.randn(1)

        def tables() -> torch.Tensor:
            return torch.cat([piece.detach().flatten().clone() for key, value in dmp.state_dict().items()
                              if "embedding_bags" in key for _, piece in local_pieces(value)])

        def step(done: int) -> torch.Tensor:
            schedule.apply(done)
            before = tables()
            module = dmp.module
            pooled = module.embedding(batch.sparse).values()
            (pooled.sum() * weight).sum().backward()
            return tables() - before

        first = step(0)   # rate 0.4
        assert kernel_rates(dmp) and all(r == pytest.approx(0.4) for r in kernel_rates(dmp))
        second = step(3)  # rate 0.4 x (1 - 3/4) = 0.1
        assert all(r == pytest.approx(0.1) for r in kernel_rates(dmp))
        assert first.abs().max() > 0
        torch.testing.assert_close(second, first * 0.25, rtol=1e-5, atol=1e-7)
        assert step(4).abs().max() == 0  # rate 0 at the end of the run
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- whole runs


LINEAR = ["train.lr_schedule={kind: linear, final_fraction: 0.25}", "train.epochs=2", "train.eval_every_steps=5"]


def check_linear_history(history: list[dict[str, float]], total: int) -> None:
    """Each evaluation after ``s`` steps reports the rates of step ``s`` (set after ``s - 1`` steps)."""
    assert history
    for entry in history:
        done = int(entry["step"]) - 1
        assert entry["lr_dense"] == pytest.approx(linear(DENSE_LR, done, total, 0.25), rel=1e-9)
        assert entry["lr_embedding"] == pytest.approx(linear(EMB_LR, done, total, 0.25), rel=1e-6)  # fp32 in FBGEMM


@pytest.mark.parametrize("sharding", ["row_wise", "data_parallel"])
def test_linear_schedule_sets_dense_and_table_rates_on_one_rank(make_experiment: MakeExperiment,
                                                                sharding: str) -> None:
    """Fused (row-wise, FBGEMM) and unfused (data-parallel, torch) tables both follow the schedule."""
    cfg = make_experiment("deepfm", *LINEAR, f"embedding.sharding={sharding}")
    total = 2 * epoch_steps(TRAIN_ROWS, 512, 1)
    seen: dict[str, Any] = {}
    kernels: list[tuple[int, list[float]]] = []

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        kernels.append((step, kernel_rates(seen["model"])))

    result = run_train(cfg, on_start=lambda model, step: seen.update(model=model), on_metrics=on_metrics)
    assert result.steps == total
    check_linear_history(result.history, total)
    for step, rates in kernels:
        expected = linear(EMB_LR, step - 1, total, 0.25)
        if sharding == "row_wise":
            assert rates and all(r == pytest.approx(expected, rel=1e-6) for r in rates), (step, rates)
        else:
            assert rates == []  # data-parallel tables run no FBGEMM kernel; the history checked their optimizer


def test_constant_rates_keep_the_history_as_before(make_experiment: MakeExperiment) -> None:
    result = run_train(make_experiment("lr", "train.max_steps=3", "train.lr_schedule={kind: none}"))
    assert not any(k.startswith("lr_") for k in result.history[-1])
    # The default (plateau) records the rates each evaluation ran at.
    result = run_train(make_experiment("lr", "train.max_steps=3", "expid=plateau"))
    assert result.history[-1]["lr_dense"] == pytest.approx(1e-3)
    assert result.history[-1]["lr_embedding"] == pytest.approx(0.01)


def lr_worker(rank: int, world_size: int, cfg_data: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    cfg = from_dict(ExperimentConfig, cfg_data)
    seen: dict[str, Any] = {}
    kernels: list[tuple[int, list[float]]] = []
    result = train(cfg, on_start=lambda model, step: seen.update(model=model),
                   on_metrics=lambda step, metrics: kernels.append((step, kernel_rates(seen["model"]))))
    return {"steps": result.steps, "history": result.history, "kernels": kernels}


def test_linear_schedule_on_two_ranks(make_experiment: MakeExperiment) -> None:
    """Both ranks run the same rates: the total steps count the global batch (512 x 2)."""
    cfg = make_experiment("deepfm", *LINEAR, "embedding.sharding=table_wise")
    total = 2 * epoch_steps(TRAIN_ROWS, 512, 2)
    results = run_ranks(lr_worker, 2, cfg.to_dict())
    for result in results:
        assert result["steps"] == total
        check_linear_history(result["history"], total)
        for step, rates in result["kernels"]:
            assert all(r == pytest.approx(linear(EMB_LR, step - 1, total, 0.25), rel=1e-6) for r in rates)
    # Table-wise tables sit on one rank or the other: between them, both ranks ran kernels.
    assert all(any(rates for _, rates in r["kernels"]) for r in results)


@pytest.mark.parametrize("schedule", ["linear", "plateau"])
def test_resume_gives_the_same_rates_and_metrics(make_experiment: MakeExperiment, tmp_path: Path,
                                                 schedule: str) -> None:
    """Stopped mid-run and resumed, the rates (and so the metrics) equal an uninterrupted run's.

    The plateau run weights AUC by 0, so no evaluation improves on the first: the rates drop at
    every second evaluation, and the stop falls between drops (the count of bad evaluations
    lives only in the checkpoint).
    """
    settings = {"linear": LINEAR,
                "plateau": ["train.lr_schedule={kind: plateau, factor: 0.5, patience: 2}", "train.epochs=2",
                            "train.eval_every_steps=4", "train.monitor={auc: 0}", "train.patience=100"]}[schedule]
    full = run_train(make_experiment("deepfm", *settings, output_dir=tmp_path / "a"))
    cfg = make_experiment("deepfm", *settings, output_dir=tmp_path / "b")
    run_dir = tmp_path / "b" / cfg.expid
    first = run_train(cfg, stop_after_steps=13)
    assert first.steps == 13
    last = run_train(cfg, resume=run_dir)
    assert [h["step"] for h in last.history] == [h["step"] for h in full.history]
    for mine, theirs in zip(last.history, full.history, strict=True):
        assert mine == pytest.approx(theirs, abs=1e-7)
    assert last.test == pytest.approx(full.test, abs=1e-6)
    if schedule == "plateau":
        rates = [h["lr_dense"] for h in full.history]
        # The first evaluation sets the best score; then every 2nd one halves the rates, which the
        # next evaluation reports (each reports the rate of the steps before it).
        assert rates == pytest.approx([DENSE_LR * 0.5 ** max(0, (i - 1) // 2) for i in range(len(rates))])
    else:
        check_linear_history(full.history, 2 * epoch_steps(TRAIN_ROWS, 512, 1))


def test_resume_of_a_linear_schedule_over_other_total_steps_is_refused(make_experiment: MakeExperiment,
                                                                       tmp_path: Path) -> None:
    cfg = make_experiment("deepfm", *LINEAR)
    run_train(cfg, stop_after_steps=3)
    longer = make_experiment("deepfm", *LINEAR, "train.epochs=3")
    with pytest.raises(ConfigError, match=r"kind=linear decays over the run's total steps, 62 when it started "
                                          r"and 93 now"):
        run_train(longer, resume=Path(cfg.train.output_dir) / cfg.expid)
    # The plateau knobs may change on resume; the kind may not.
    other = make_experiment("deepfm", "train.lr_schedule={kind: plateau}", "train.epochs=2",
                            "train.eval_every_steps=5")
    with pytest.raises(ConfigError, match=r"train\.lr_schedule\.kind: 'linear' -> 'plateau'"):
        run_train(other, resume=Path(cfg.train.output_dir) / cfg.expid)



def test_docstring_examples() -> None:
    import doctest

    import recemb.train.schedule

    result = doctest.testmod(recemb.train.schedule)
    assert result.attempted and result.failed == 0


def test_tables_that_update_themselves_follow_the_schedule() -> None:
    """lowprec tables run their own row update with their own ``lr``: the schedule sets it too."""
    from recemb.embeddings.registry import build_embedding_layer

    layer = build_embedding_layer(feature_map(), EmbeddingConfig(kind="lowprec", dim=8, lr=0.2))
    rates = self_updating_rates(layer)
    assert [(r.name, r.base) for r in rates] == [("embedding", 0.2)]
    LrScheduler(LrSchedule(kind="linear", final_fraction=0.5), total_steps=10, rates=rates).apply(step=10)
    assert layer.lr == pytest.approx(0.1)
