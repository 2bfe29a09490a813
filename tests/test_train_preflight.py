"""Config errors are refused before a run exists: by ``recemb config show`` and by ``recemb train``
before an MLflow run or a run folder is created, each naming what to change (and, for a budget
too small for one block of the model, the block and the smallest budget that builds)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pipelines.train import run_train
from recemb.cli import main
from recemb.config.experiment import ExperimentConfig
from recemb.data.schema import FeatureMap
from recemb.errors import ConfigError
from recemb.models.ctr.registry import smallest_budget
from recemb.models.registry import build_model, model_entry
from recemb.tracking import list_runs
from recemb.train.preflight import check_run

MakeExperiment = Callable[..., ExperimentConfig]  # the conftest fixture

REFUSED = [
    (["embedding.kind=bogus"], r"embedding\.kind 'bogus' is unknown \(known: .*full"),
    (["embedding.optimizer=adam"], r"embedding\.optimizer=adam: FBGEMM's fused Adam runs on GPU only"),
    (["embedding.optimizer=exact_sgd", "embedding.initial_accumulator=0.1"],
     r"initial_accumulator=0\.1 needs an Adagrad optimizer"),
    (["embedding.weight_decay=0.1"], r"CPU row-wise Adagrad kernel ignores weight decay; use embedding\.l2"),
    (["embedding.kind=tt", "embedding.budget=5000", "model.params.first_order=table"],  # a block of its own
     r"^the first-order tables \(tt, 4 wide, its budget 1,666 bytes\): embedding\.kind=tt: rank 1 takes 1,904 "
     r"bytes, over the budget of 1,666 bytes; .*; the smallest embedding\.budget this model \(deepfm\) builds "
     r"with is 5,712 bytes$"),
    (["embedding.kind=hashed", "embedding.budget=100"],
     r"^the main embedding tables \(hashed, 8 wide, its budget 100 bytes\): budget of 3 rows is below one row per "
     r"feature \(26 features\); the smallest embedding\.budget this model \(deepfm\) builds with is 832 bytes$"),
    (["embedding.groups=[{features: [C1, C2], kind: tt, budget: 64}]"],
     r"^the main embedding tables \(full, 8 wide\): embedding\.groups\[0\] \(C1, C2\): embedding\.kind=tt: .*over "
     r"the budget of 64 bytes"),
]
if not torch.cuda.is_available():
    REFUSED.append((["train.device=cuda"], r"train\.device=cuda but no CUDA device is visible"))


@pytest.mark.parametrize(("overrides", "message"), REFUSED)
def test_train_refuses_before_a_run_exists(make_experiment: MakeExperiment, tmp_path: Path,
                                           overrides: list[str], message: str) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = make_experiment("deepfm", *overrides)
    with pytest.raises(ConfigError, match=message):
        run_train(cfg, mlflow_uri=uri)
    assert list_runs(uri) == []  # no run left FAILED
    assert not (Path(cfg.train.output_dir) / cfg.expid).exists()


def test_config_show_refuses_what_train_refuses(prepared_ctr: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "deepfm_synthetic_ctr.yaml"
    common = ["config", "show", "--config", str(config), f"data_dir={prepared_ctr}", "embedding.dim=8"]
    assert main([*common, "embedding.kind=bogus"]) == 2
    assert "embedding.kind 'bogus' is unknown" in capsys.readouterr().err
    table = "model.params.first_order=table"  # first-order tables: a block of their own
    assert main([*common, "embedding.kind=tt", "embedding.budget=5000", table]) == 2
    assert "the first-order tables (tt, 4 wide" in capsys.readouterr().err
    assert main([*common, "embedding.kind=tt", "embedding.budget=5712", table]) == 0
    assert "kind: tt" in capsys.readouterr().out


def test_the_smallest_budget_is_the_smallest_that_builds(make_experiment: MakeExperiment,
                                                         prepared_ctr: Path) -> None:
    fm = FeatureMap.load(prepared_ctr)
    for kind, budget in [("tt", 5000.0), ("hashed", 100.0), ("hashed", 0.0001)]:
        cfg = make_experiment("deepfm", f"embedding.kind={kind}", f"embedding.budget={budget}",
                              "model.params.first_order=table")
        params = model_entry("deepfm").params(**cfg.model.params)
        smallest = smallest_budget("deepfm", params, fm, cfg.embedding)
        assert smallest is not None and smallest > budget
        below = smallest - 1 if smallest > 1 else smallest - 1e-4
        for value, ok in [(smallest, True), (below, False)]:
            trial = make_experiment("deepfm", f"embedding.kind={kind}", f"embedding.budget={value}",
                                    "model.params.first_order=table")
            if ok:
                check_run(trial, fm)
                build_model(trial.model, fm, trial.embedding, device=torch.device("meta"))
            else:
                with pytest.raises(ConfigError):
                    check_run(trial, fm)
