"""Tests for recemb.train: end-to-end ``train()``, exact resume, checkpoints, early stopping.

``train()`` starts a one-rank gloo process group when none exists and leaves it
running; these tests destroy it after every call, so runs in one process start
alike (a repeated run reproduces its metrics exactly). All runs use the small
session dataset of ``conftest.py`` (31 steps an epoch at batch size 512).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import yaml
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recemb.config.experiment import EmbeddingConfig, ExperimentConfig, ModelConfig
from recemb.data.batch import Batch, epoch_steps
from recemb.data.schema import FeatureInfo, FeatureMap
from recemb.embeddings.sharding import ensure_process_group, local_pieces, shard_model, table_optimizer
from recemb.errors import ConfigError, DataError
from recemb.models.ctr.registry import LINEAR_DIM
from recemb.models.registry import build_model
from recemb.train.checkpoint import (
    RESUME_AT_EPOCH_END_KEYS,
    RESUME_SAFE_KEYS,
    TrainState,
    assemble_full,
    check_resume,
    config_changes,
    fill_model_params,
    load_checkpoint,
    read_meta,
    rows_in_epoch,
    save_checkpoint,
)
from recemb.train.loop import TrainModel, TrainResult, dense_optimizer, train

MakeExperiment = Callable[..., ExperimentConfig]  # the conftest fixture
TRAIN_ROWS = 16030  # training rows of the session dataset
# 31 batches of 512: the last 158 rows (under half a batch) join the 31st, so every row trains.
STEPS_PER_EPOCH = epoch_steps(TRAIN_ROWS, 512)


pytestmark = pytest.mark.usefixtures("no_process_group")  # each test starts and ends without a group


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: these tiny batches gain nothing from more, and on a busy
    2-core machine spinning OpenMP threads made the runs several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_train(cfg: ExperimentConfig, **kwargs: Any) -> TrainResult:
    """``train(cfg, **kwargs)``, then tear down the process group it started."""
    try:
        return train(cfg, **kwargs)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- end to end


def test_train_deepfm_writes_outputs_and_learns(make_experiment: MakeExperiment, tmp_path: Path) -> None:
    cfg = make_experiment("deepfm", "embedding.sharding=auto")
    result = run_train(cfg)
    out = tmp_path / "runs" / "deepfm_synthetic_ctr"
    assert result.output_dir == str(out)
    assert result.steps == STEPS_PER_EPOCH and result.epochs_run == 1
    assert result.test["auc"] > 0.55, result.test  # the planted signal; chance is 0.5
    assert result.test["count"] == 2005
    assert result.best_valid["step"] == STEPS_PER_EPOCH
    assert result.embedding_bytes == result.full_bytes > 0

    saved = json.loads((out / "result.json").read_text())
    assert saved["steps"] == result.steps and saved["test"]["auc"] == result.test["auc"]
    assert yaml.safe_load((out / "config.yaml").read_text()) == cfg.to_dict()

    plan = json.loads((out / "sharding_plan.json").read_text())
    assert sorted(plan) == ["model.embedding.ebc"]  # first_order: embedding, no first-order tables
    tables = plan["model.embedding.ebc"]
    assert sorted(tables) == sorted(f"t_C{i}" for i in range(1, 27))
    fm = FeatureMap.load(cfg.data_dir)
    for name, table in tables.items():
        rows = fm.feature(name.removeprefix("t_")).num_embeddings
        assert [s["sizes"] for s in table["shards"]] == [[rows, 8]]

    for name in ("best", "last"):
        meta = read_meta(out / "checkpoints" / name)
        assert (meta["step"], meta["epoch"], meta["world_size"]) == (STEPS_PER_EPOCH, 1, 1)
        assert meta["config"] == fill_model_params(cfg.to_dict(), saved=False)  # first_order written out

    with (tmp_path / "runs" / "results.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1
    assert rows[0]["expid"] == "deepfm_synthetic_ctr" and rows[0]["model"] == "deepfm"
    assert int(rows[0]["steps"]) == STEPS_PER_EPOCH
    assert float(rows[0]["test_auc"]) == pytest.approx(result.test["auc"])


@pytest.mark.parametrize("model", ["lr", "fm", "wdl", "dcnv2", "dlrm"])
def test_every_model_trains_and_learns(make_experiment: MakeExperiment, model: str) -> None:
    """The smoke config of each model learns the planted signal in two epochs (AUC 0.62-0.74 here)."""
    result = run_train(make_experiment(model, "train.epochs=2"))
    assert result.expid == f"{model}_synthetic_ctr"
    assert (result.steps, result.epochs_run) == (2 * STEPS_PER_EPOCH, 2)
    assert [h["step"] for h in result.history] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert result.test["auc"] > 0.58, result.test
    assert math.isfinite(result.test["logloss"]) and result.test["logloss"] < 0.65


@pytest.mark.parametrize("sharding", ["row_wise", "data_parallel"])
def test_resume_matches_an_uninterrupted_run(make_experiment: MakeExperiment, tmp_path: Path, sharding: str) -> None:
    """Stop mid-epoch twice (in epoch 0 and 1) and resume: every metric equals run A's.

    Dropout and batch norm make the run depend on the RNG state and model buffers;
    the stops fall between evaluations, so nothing but the resume checkpoint holds them.
    Row-wise tables keep their optimizer state in FBGEMM's fused kernels,
    data-parallel ones in an ordinary (unfused) optimizer.
    """
    settings = ["train.epochs=2", "train.batch_size=1024", "train.eval_every_steps=4",
                "model.params={mlp: [32, 16], dropout: 0.2, batch_norm: true}",
                f"embedding.sharding={sharding}"]
    per_epoch = epoch_steps(TRAIN_ROWS, 1024)  # 15 full batches and one of the last 670 rows
    stops = (6, per_epoch + 7)
    full = run_train(make_experiment("deepfm", *settings, output_dir=tmp_path / "a"))
    full_steps = [int(h["step"]) for h in full.history]
    assert full.steps == 2 * per_epoch == 32
    assert full_steps == [4, 8, 12, 16, 20, 24, 28, 32]

    cfg = make_experiment("deepfm", *settings, output_dir=tmp_path / "b")
    run_dir = tmp_path / "b" / cfg.expid
    evaluated: list[list[int]] = []

    def part(**kwargs: Any) -> TrainResult:
        steps: list[int] = []
        evaluated.append(steps)
        return run_train(cfg, on_metrics=lambda step, metrics: steps.append(step), **kwargs)

    first = part(stop_after_steps=stops[0])
    assert first.steps == stops[0] and first.test == {}
    assert read_meta(run_dir / "checkpoints" / "last")["extra"]["rows_in_epoch"] == stops[0] * 1024
    second = part(resume=run_dir, stop_after_steps=stops[1])
    assert second.steps == stops[1]
    assert read_meta(run_dir / "checkpoints" / "last")["extra"]["rows_in_epoch"] == 7 * 1024
    last = part(resume=run_dir)

    # Each part went on from where the previous one stopped.
    assert evaluated == [[s for s in full_steps if s <= stops[0]],
                         [s for s in full_steps if stops[0] < s <= stops[1]],
                         [s for s in full_steps if s > stops[1]]]
    assert (last.steps, last.epochs_run) == (full.steps, full.epochs_run)
    assert len(last.history) == len(full.history)
    for mine, theirs in zip(last.history, full.history, strict=True):
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert abs(mine[key] - theirs[key]) < 1e-6, (key, mine, theirs)
    assert last.best_valid == pytest.approx(full.best_valid, abs=1e-6)
    for key in ("auc", "logloss", "ne", "calibration"):
        assert abs(last.test[key] - full.test[key]) < 1e-6, (key, last.test, full.test)
    # The final weights and optimizer states too, not only what the metrics see.
    a_state = assemble_full(tmp_path / "a" / cfg.expid / "checkpoints" / "last")
    b_state = assemble_full(run_dir / "checkpoints" / "last")
    assert a_state.keys() == b_state.keys()
    for key in a_state:
        torch.testing.assert_close(b_state[key], a_state[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_when_validation_does_not_improve(
    make_experiment: MakeExperiment, tmp_path: Path, patience: int
) -> None:
    """A monitor weighting AUC by 0 scores every evaluation 0, so only the first one improves:
    ``train.patience=p`` stops at the p-th evaluation that does not improve (1 + p in all).

    (``count`` is no longer a metric ``train.monitor`` may name, so the constant score comes from a zero weight.)
    """
    cfg = make_experiment("lr", "train.eval_every_steps=1", "train.max_steps=1000", "train.epochs=5",
                          f"train.patience={patience}", "train.monitor={auc: 0}")
    result = run_train(cfg)
    assert result.steps == patience + 1
    assert [h["step"] for h in result.history] == list(range(1, patience + 2))
    assert result.best_valid["step"] == 1
    out = Path(result.output_dir) / "checkpoints"
    assert read_meta(out / "best")["step"] == 1
    assert read_meta(out / "last")["step"] == patience + 1
    assert read_meta(out / "last")["extra"]["bad_evals"] == patience

    # Resuming a run that stopped early trains no further and reports the same result.
    again = run_train(cfg, resume=result.output_dir)
    assert again.steps == result.steps
    assert again.history == result.history
    assert again.test == pytest.approx(result.test, abs=1e-9)


def test_fused_adam_on_cpu_is_a_config_error(make_experiment: MakeExperiment) -> None:
    cfg = make_experiment("deepfm", "embedding.optimizer=adam")
    with pytest.raises(ConfigError, match=r"embedding\.optimizer=adam: .*GPU only.*exact_rowwise_adagrad"):
        run_train(cfg)


# ----------------------------------------------------------------------------- resuming under another config


def test_resume_with_more_epochs_matches_an_uninterrupted_run(make_experiment: MakeExperiment,
                                                              tmp_path: Path) -> None:
    """train.epochs may change on resume: one epoch, then resumed to two, is the two-epoch run."""
    full = run_train(make_experiment("deepfm", "train.epochs=2", output_dir=tmp_path / "a"))
    run_train(make_experiment("deepfm", "train.epochs=1", output_dir=tmp_path / "b"))
    cfg = make_experiment("deepfm", "train.epochs=2", output_dir=tmp_path / "b")
    resumed = run_train(cfg, resume=tmp_path / "b" / cfg.expid)
    assert (resumed.steps, resumed.epochs_run) == (full.steps, full.epochs_run) == (2 * STEPS_PER_EPOCH, 2)
    assert [h["step"] for h in resumed.history] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    for mine, theirs in zip(resumed.history, full.history, strict=True):
        assert mine == pytest.approx(theirs, abs=1e-6)
    assert resumed.test == pytest.approx(full.test, abs=1e-6)


def test_resume_mid_epoch_with_another_batch_size_is_refused(make_experiment: MakeExperiment) -> None:
    """The global batch fixes the epoch's row order: 5 batches of 512 are no place in an epoch of 1024s
    (before, the run skipped 5 batches of 1024, and 2,560 rows of epoch 0 were never trained)."""
    first = run_train(make_experiment("deepfm"), stop_after_steps=5)
    with pytest.raises(ConfigError, match=r"stopped 2,560 rows into epoch 0.*train\.batch_size: 512 -> 1024; "
                                          r"ranks: 1 -> 1; resume with train\.batch_size=512 on 1 rank"):
        run_train(make_experiment("deepfm", "train.batch_size=1024"), resume=first.output_dir)


def test_resume_at_an_epoch_end_with_another_batch_size_trains_every_row(make_experiment: MakeExperiment) -> None:
    first = run_train(make_experiment("deepfm"))
    rows: dict[int, int] = {}
    cfg = make_experiment("deepfm", "train.epochs=2", "train.batch_size=1024")
    result = run_train(cfg, resume=first.output_dir,
                       on_epoch_end=lambda epoch, step, path, metrics: rows.update({epoch: metrics["train_rows"]}))
    assert rows == {1: TRAIN_ROWS}
    assert result.steps == STEPS_PER_EPOCH + epoch_steps(TRAIN_ROWS, 1024)
    assert result.trained_rows == [TRAIN_ROWS]
    assert read_meta(Path(result.output_dir) / "checkpoints" / "last")["config"]["train"]["batch_size"] == 1024


def test_resume_with_another_model_is_refused_naming_every_key(make_experiment: MakeExperiment) -> None:
    first = run_train(make_experiment("deepfm"), stop_after_steps=3)
    changed = make_experiment("deepfm", "model.params={mlp: [64]}", "train.seed=1", "train.dense_lr=0.01",
                              "train.epochs=3")
    with pytest.raises(ConfigError) as excinfo:
        run_train(changed, resume=first.output_dir)
    message = str(excinfo.value)
    assert "cannot resume with a changed config (model.params.mlp: [32, 16] -> [64]; train.dense_lr: 0.001 -> " \
           "0.01; train.seed: 0 -> 1)" in message
    assert "train.epochs" not in message and "\n" not in message


def test_a_checkpoint_saved_before_first_order_was_written_rebuilds_its_tables(make_experiment: MakeExperiment) -> None:
    """Runs saved before ``first_order: embedding`` became the default hold no ``first_order`` and
    were trained with first-order tables: they load and export as such, a resume that would build
    the new default names the key, and new checkpoints write the param out."""
    from recemb.train.checkpoint import write_meta
    from recemb.train.restore import load_trained_model

    cfg = make_experiment("deepfm", "model.params.first_order=table")
    first = run_train(cfg, stop_after_steps=3)
    last = Path(first.output_dir) / "checkpoints" / "last"
    meta = json.loads((last / "meta.json").read_text(encoding="utf-8"))
    assert meta["config"]["model"]["params"]["first_order"] == "table"
    del meta["config"]["model"]["params"]["first_order"]  # as a run saved before the change
    write_meta(last, meta)
    model, loaded = load_trained_model(last)
    assert loaded.model.params["first_order"] == "table" and hasattr(model, "linear")
    with pytest.raises(ConfigError, match=r"model\.params\.first_order: 'table' -> 'embedding'"):
        run_train(make_experiment("deepfm"), resume=first.output_dir)
    fresh = run_train(make_experiment("deepfm", "expid=fresh"), stop_after_steps=3)
    saved = read_meta(Path(fresh.output_dir) / "checkpoints" / "last")["config"]["model"]["params"]
    assert saved["first_order"] == "embedding"
    run_train(make_experiment("deepfm", "expid=fresh"), resume=fresh.output_dir)  # the same config resumes


def test_resume_from_a_damaged_checkpoint_is_refused(make_experiment: MakeExperiment) -> None:
    """A flipped byte in a tensor used to resume and train on (test logloss 1.04 instead of 0.51)."""
    from recemb.train.restore import load_trained_model

    cfg = make_experiment("deepfm", "train.eval_every_steps=3")
    first = run_train(cfg, stop_after_steps=3)
    last = Path(first.output_dir) / "checkpoints" / "last"
    part = last / "rank-0.safetensors"
    data = bytearray(part.read_bytes())
    data[-5] ^= 0x40
    part.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"checkpoints/last/rank-0\.safetensors: checksum mismatch"):
        run_train(cfg, resume=first.output_dir)
    with pytest.raises(DataError, match=r"checkpoints/last/rank-0\.safetensors: checksum mismatch"):
        load_trained_model(last)
    load_trained_model(Path(first.output_dir) / "checkpoints" / "best")  # the other checkpoint is intact


def resume_meta(cfg: ExperimentConfig, rows: int = 0, world_size: int = 1) -> dict[str, Any]:
    """The parts of a checkpoint's meta that ``check_resume`` reads (the config as a checkpoint saves it)."""
    from recemb.train.checkpoint import fill_model_params

    return {"config": fill_model_params(cfg.to_dict(), saved=False), "world_size": world_size, "epoch": 0,
            "extra": {"rows_in_epoch": rows}}


def test_patience_counts_epochs_and_zero_never_stops(make_experiment: MakeExperiment) -> None:
    """At the end of epochs as within them: ``patience=1`` stops at the first epoch that does not
    improve; ``patience=0`` trains until ``max_steps`` (or the last epoch) whatever the scores."""
    one = run_train(make_experiment("lr", "train.epochs=4", "train.patience=1", "train.monitor={auc: 0}"))
    assert [h["epoch"] for h in one.history] == [0, 1] and one.epochs_run == 2
    never = run_train(make_experiment("lr", "train.eval_every_steps=1", "train.max_steps=4", "train.epochs=5",
                                      "train.patience=0", "train.monitor={auc: 0}", "expid=never"))
    assert never.steps == 4 and len(never.history) == 4


def test_resume_rules_name_real_config_keys(make_experiment: MakeExperiment) -> None:
    """A typo in the table would silently refuse (or allow) nothing."""
    keys = config_changes({}, make_experiment("deepfm").to_dict())
    for prefix in RESUME_SAFE_KEYS | RESUME_AT_EPOCH_END_KEYS:
        assert any(k == prefix or k.startswith(prefix + ".") for k in keys), prefix


def test_resume_rules_on_config_dicts(make_experiment: MakeExperiment, prepared_ctr: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    base = make_experiment("deepfm")
    safe = make_experiment("deepfm", "train.epochs=9", "train.max_steps=5", "train.patience=0",
                           "train.eval_every_steps=2", "train.eval_batch_size=7", "train.progress=true",
                           "train.output_dir=elsewhere", "train.device=cpu", "cluster.workers=2", "expid=other",
                           "search.population=3")
    check_resume("ck", resume_meta(base, rows=4096), safe.to_dict(), 1)
    # The global batch may be split over other ranks mid-epoch (512 x 2 = 1024 x 1), not changed.
    check_resume("ck", resume_meta(base, rows=4096, world_size=2), make_experiment(
        "deepfm", "train.batch_size=1024").to_dict(), 1)
    with pytest.raises(ConfigError, match=r"train\.batch_size: 512 -> 512; ranks: 2 -> 1"):
        check_resume("ck", resume_meta(base, rows=4096, world_size=2), base.to_dict(), 1)
    check_resume("ck", resume_meta(base, rows=0, world_size=2), base.to_dict(), 1)  # at an epoch's end: any
    # The same data folder, named relative to the working directory.
    monkeypatch.chdir(prepared_ctr.parent)
    check_resume("ck", resume_meta(base), make_experiment("deepfm", f"data_dir={prepared_ctr.name}").to_dict(), 1)
    for override, key in [("train.shuffle_rows=7", "train.shuffle_rows"), ("train.monitor={logloss: -1}",
                          "train.monitor"), ("embedding.lr=0.5", "embedding.lr"),
                          ("train.clip_grad_norm=1.0", "train.clip_grad_norm"), ("data_dir=/elsewhere", "data_dir")]:
        with pytest.raises(ConfigError, match=rf"changed config \((.*; )?{re.escape(key)}[.:]"):
            check_resume("ck", resume_meta(base), make_experiment("deepfm", override).to_dict(), 1)
    unknown = dict(base.to_dict(), future_block={"knob": 1})  # a key nobody listed is refused
    with pytest.raises(ConfigError, match=r"future_block\.knob: \(unset\) -> 1"):
        check_resume("ck", resume_meta(base), unknown, 1)


def test_format_1_position_in_batches_converts_to_rows(make_experiment: MakeExperiment) -> None:
    meta = {"config": make_experiment("deepfm").to_dict(), "world_size": 2, "extra": {"batches_in_epoch": 3}}
    assert rows_in_epoch(meta) == 3 * 512 * 2
    assert rows_in_epoch({**meta, "extra": {}}) == 0


# ----------------------------------------------------------------------------- checkpoints

TABLES = {"a": 20, "tags": 13}
DIM = 4


def small_state(sharding: str = "row_wise") -> tuple[TrainState, FeatureMap]:
    """A sharded DeepFM over two small tables with its optimizers, one step trained.

    Row-wise tables have fused (in-backward) optimizers, data-parallel ones an unfused one.
    """
    fm = FeatureMap(dataset_id="t", label="label", features=[
        FeatureInfo(name="d0", kind="dense", source="d0"),
        FeatureInfo(name="a", kind="sparse", source="a", num_embeddings=TABLES["a"]),
        FeatureInfo(name="tags", kind="multihot", source="tags", num_embeddings=TABLES["tags"]),
    ])
    # first_order: table, so the checkpoint holds a second (first-order) layer of tables too.
    cfg = ExperimentConfig(dataset_id="t", data_dir="unused",
                           model=ModelConfig("deepfm", {"mlp": [8], "first_order": "table"}),
                           embedding=EmbeddingConfig(dim=DIM, sharding=sharding))
    torch.manual_seed(0)
    pg = ensure_process_group()
    model = TrainModel(build_model(cfg.model, fm, cfg.embedding, device=torch.device("meta")))
    sharded = shard_model(model, cfg.embedding, torch.device("cpu"), pg, batch_size=4)
    opt = dense_optimizer(sharded.model, cfg.train)
    table_opt = table_optimizer(sharded.model, cfg.embedding)
    assert (table_opt is None) == (sharding != "data_parallel")
    batch = Batch(
        dense=torch.tensor([[0.1], [0.2], [-0.3], [1.0]]),
        sparse=KeyedJaggedTensor.from_lengths_sync(
            keys=["a", "tags"], values=torch.tensor([1, 5, 5, 19, 0, 3, 12]),
            lengths=torch.tensor([1, 1, 1, 1, 2, 0, 1, 0])),
        labels=torch.tensor([1.0, 0.0, 1.0, 0.0]),
    )
    loss, _ = sharded.model(batch)
    optimizers = [o for o in (opt, table_opt) if o is not None]
    for o in optimizers:
        o.zero_grad()
    loss.backward()
    for o in optimizers:
        o.step()
    return TrainState(sharded.model, opt, sharded.model.fused_optimizer, table_opt), fm


def snapshot(state: TrainState) -> dict[str, torch.Tensor]:
    """Full copies of every checkpointed tensor (one rank: the local pieces are whole)."""
    out = {}
    for key, value in state.tensors().items():
        (pieces,) = local_pieces(value)
        out[key] = pieces[1].detach().clone()
    return out


@pytest.mark.parametrize("sharding", ["row_wise", "data_parallel"])
def test_checkpoint_round_trip(tmp_path: Path, sharding: str) -> None:
    state, _ = small_state(sharding)
    before = snapshot(state)
    table_state = "fused/" if sharding == "row_wise" else "table/"
    assert any(k.startswith(table_state) for k in before), sorted(before)
    assert any(k.startswith("dense/") and k.endswith("exp_avg") for k in before)
    assert before["dense/0/step"].item() == 1  # the dense optimizer has state to restore

    save_checkpoint(tmp_path / "ck", state, step=7, epoch=2, config={"x": 1}, extra={"note": "hi"})
    draws = torch.rand(5)
    with torch.no_grad():
        for value in state.tensors().values():
            for _, piece in local_pieces(value):
                piece.add_(1.5)
    perturbed = snapshot(state)
    assert all(not torch.equal(perturbed[k], before[k]) for k in before), "perturbing must reach every tensor"

    meta = load_checkpoint(tmp_path / "ck", state)
    assert (meta["step"], meta["epoch"], meta["config"], meta["extra"]) == (7, 2, {"x": 1}, {"note": "hi"})
    after = snapshot(state)
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(after[key], before[key]), key
    assert torch.equal(torch.rand(5), draws)  # the RNG state at save time is restored


def test_assemble_full_gives_whole_tables(tmp_path: Path) -> None:
    state, _ = small_state()
    before = snapshot(state)
    save_checkpoint(tmp_path / "ck", state, step=1, epoch=0, config={})
    full = assemble_full(tmp_path / "ck")
    assert full.keys() == before.keys()
    for key in full:
        assert torch.equal(full[key], before[key]), key
    prefix = "model/model.embedding.ebc.embedding_bags"
    lin = "model/model.linear.ebc.embedding_bags"
    for name, rows in TABLES.items():
        assert full[f"{prefix}.t_{name}.weight"].shape == (rows, DIM)
        assert full[f"{lin}.lin_t_{name}.weight"].shape == (rows, LINEAR_DIM)
        momentum = f"fused/model.embedding.ebc.embedding_bags.t_{name}.weight/t_{name}.momentum1"
        assert full[momentum].shape == (rows,)
        assert not math.isclose(float(full[momentum].sum()), 0.0)  # rows seen in the step have momentum
