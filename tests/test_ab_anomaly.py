"""Offline A/B of anomaly models: AUC and AP with the anomaly as positive, paired bootstrap and DeLong on
anomaly scores, refusals of mixed families, and ``run_ab`` on APE bundles over the raw labelled events file.

Figures (intervals, verdicts) go to stdout: run with ``-s`` to see them.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS
from dist_utils import in_process_run

from pipelines.evaluate import ScoreTask
from recemb.data.schema import FeatureMap
from recemb.errors import DataError
from recemb.eval.ab import ArmScores, EvalRows, compare
from recemb.eval.metrics import auc as exact_auc
from recemb.eval.metrics import average_precision
from recemb.eval.report import write_report
from recemb.eval.stats import bootstrap_weights, paired_bootstrap, resample_order


def _anomaly_arms(n: int = 6000, seed: int = 0) -> tuple[list[ArmScores], EvalRows]:
    """A control, its A/A copy, an arm as good with independent noise, and a planted worse arm."""
    rng = np.random.default_rng(seed)
    anomaly = rng.random(n) < 0.07
    keys = np.arange(n, dtype=np.int64)
    control = 1.5 * anomaly + rng.normal(size=n)
    arms = [ArmScores("ape", "run", "a", keys, control, "fp", 1000, task="anomaly"),
            ArmScores("ape_again", "run", "a", keys, control.copy(), "fp", 1000, task="anomaly"),
            ArmScores("ape_seed2", "run", "a", keys, 1.5 * anomaly + rng.normal(size=n), "fp", 1000, task="anomaly"),
            ArmScores("ape_worse", "bundle", "b", keys, 0.7 * anomaly + rng.normal(size=n), "fp", 250, task="anomaly")]
    rows = EvalRows(keys, anomaly.astype(np.int8), "fp", frequency={"user": rng.integers(0, 3, n).astype(np.int8)})
    return arms, rows


def test_ap_replicates_equal_the_average_precision_of_the_resampled_rows() -> None:
    rng = np.random.default_rng(4)
    n, b = 500, 4
    y = rng.random(n) < 0.1
    s = np.stack([y + rng.normal(size=n), np.round(y + rng.normal(size=n), 1)])  # arm 1 has ties
    out = paired_bootstrap(y, s, resamples=b, seed=3, block=b, task="anomaly")
    drawn = bootstrap_weights(np.random.default_rng(3), b, n).astype(np.int64)
    w = np.empty_like(drawn)
    w[:, resample_order(y)] = drawn
    for r in range(b):
        rows = np.repeat(np.arange(n), w[r])
        ya = torch.tensor(y[rows].astype(float))
        ap = [average_precision(torch.tensor(s[a][rows]), ya) for a in range(2)]
        auc = [exact_auc(torch.tensor(s[a][rows]), ya) for a in range(2)]
        assert out.replicates[0]["ap"][r] == pytest.approx(ap[1] - ap[0], abs=1e-6)
        assert out.replicates[0]["auc"][r] == pytest.approx(auc[1] - auc[0], abs=1e-6)
    assert out.metrics == ("auc", "ap")


def test_aa_is_indistinguishable_and_a_planted_worse_anomaly_arm_is_found() -> None:
    arms, rows = _anomaly_arms()
    result = compare(arms, "ape", rows, resamples=500)
    for v in result.verdicts:
        print(v.text)
    verdicts = {(v.treatment, v.metric): v for v in result.verdicts}
    assert {m for _, m in verdicts} == {"auc", "ap"}
    assert all(verdicts[("ape_again", m)].verdict == "indistinguishable" and verdicts[("ape_again", m)].delta == 0
               for m in ("auc", "ap"))
    assert all(verdicts[("ape_seed2", m)].verdict == "indistinguishable" for m in ("auc", "ap"))
    worse_auc, worse_ap = verdicts[("ape_worse", "auc")], verdicts[("ape_worse", "ap")]
    assert worse_auc.verdict == "worse" and worse_auc.high < 0 and worse_auc.test == "DeLong"
    assert worse_ap.verdict == "worse" and worse_ap.high < 0 and worse_ap.test == "paired bootstrap"
    control = result.arm("ape").metrics
    assert set(control) >= {"auc", "ap", "anomaly_rate"} and "logloss" not in control
    assert result.task == "anomaly" and result.slice_tests == 3 * 3  # user: head/torso/tail x 3 treatments x auc


def test_anomaly_report_has_precision_recall_instead_of_calibration(tmp_path: Path) -> None:
    arms, rows = _anomaly_arms(n=2000)
    files = write_report(compare(arms, "ape", rows, resamples=100), tmp_path)
    page = files.html.read_text(encoding="utf-8")
    assert sorted(re.findall(r'<img id="fig-([a-z_]+)"', page)) == ["auc_vs_bytes", "deltas", "frequency", "pr", "roc"]
    assert "ROC AUC and average precision with the anomaly as positive" in page
    assert "| arm | kind | auc | ap |" in files.markdown.read_text()


def test_arms_of_different_families_are_refused() -> None:
    arms, rows = _anomaly_arms(n=500)
    arms[2].task = "ctr"
    with pytest.raises(DataError, match=r"different model families.*ape_seed2 \(ctr\)"):
        compare(arms, "ape", rows, resamples=10)

    from pipelines.ab import Arm, _check_families
    from recemb.eval.metrics import AnomalyLabels

    fm = FeatureMap(dataset_id="x", label="label", features=[])
    ape, ctr = ScoreTask("anomaly", AnomalyLabels()), ScoreTask("ctr")
    with pytest.raises(DataError, match=r"different model families cannot be compared: a \(anomaly\), b \(ctr\)"):
        _check_families([Arm("a", "run", "x", fm, ape), Arm("b", "bundle", "y", fm, ctr)])
    other = ScoreTask("anomaly", AnomalyLabels(normal=0.5, anomaly=2.0))
    with pytest.raises(DataError, match="read labels differently"):
        _check_families([Arm("a", "run", "x", fm, ape), Arm("b", "bundle", "y", fm, other)])


# ----------------------------------------------------------------------------- end to end on APE bundles


@pytest.fixture(scope="module")
def ape_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic events prepared from their given splits; APE trained by its recipe (20 epochs, about 8 s;
    "good") and for 2 steps ("poor"), each exported as an fp32 bundle; the raw labelled test file."""
    from recemb.config.experiment import load_experiment
    from recemb.data.preprocess import prepare_dataset
    from recemb.data.schema import load_dataset_config
    from recemb.data.synthetic import EventSynthConfig, generate_events
    from recemb.export import export_bundle
    from recemb.train.loop import train

    root = tmp_path_factory.mktemp("ab_ape")
    generate_events(EventSynthConfig(train_events=20_000, test_events=4_000, seed=5), root / "raw")
    data = root / "prepared"
    prepare_dataset(load_dataset_config(CONFIGS / "datasets" / "synthetic_events.yaml", {
        "split": {"files": {"train": [str(root / "raw" / "train.csv")], "test": [str(root / "raw" / "test.csv")]}},
        "output": str(data)}))
    out: dict[str, Path] = {"data": data, "raw": root / "raw" / "test.csv"}
    for name, extra in (("good", []), ("poor", ["train.max_steps=2"])):
        cfg = load_experiment(CONFIGS / "experiments" / "ape_synthetic_events.yaml",
                              [f"data_dir={data}", f"train.output_dir={root / 'runs'}", f"expid=ape_{name}",
                               "train.progress=false", "embedding.dim=8", *extra])
        with in_process_run():
            run = Path(train(cfg).output_dir)
        out[name] = export_bundle(run, root / f"bundle_{name}", dtype="fp32")
    return out


def test_run_ab_on_ape_bundles_over_the_raw_labelled_file(ape_bundles: dict[str, Path], tmp_path: Path) -> None:
    from pipelines.ab import run_ab

    good, poor = str(ape_bundles["good"]), str(ape_bundles["poor"])
    run = run_ab(good, [good, poor], ape_bundles["raw"], out=tmp_path / "ab", resamples=300, track=False,
                 speed_batches=2)
    result = run.result
    for v in result.verdicts:
        print(v.text)
    assert result.task == "anomaly" and [a.name for a in result.arms] == ["ape_good@fp32", "ape_good@fp32#2",
                                                                          "ape_poor@fp32"]
    assert result.data is not None and result.data.kind == "raw" and result.data.rows == result.rows
    fm = FeatureMap.load(ape_bundles["data"])
    assert result.rows == fm.rows["test"]  # every labelled row of test.csv, as prepare encoded it
    aa = [v for v in result.verdicts if v.treatment == "ape_good@fp32#2"]
    assert {v.metric for v in aa} == {"auc", "ap"}
    assert all(v.verdict == "indistinguishable" and v.delta == 0 for v in aa)
    poor_auc = next(v for v in result.verdicts if v.treatment == "ape_poor@fp32" and v.metric == "auc")
    assert poor_auc.verdict == "worse", poor_auc.text
    good_metrics = result.arm("ape_good@fp32").metrics
    assert good_metrics["auc"] > 0.8 and 0 < good_metrics["anomaly_rate"] < 0.2
    assert {s.slice for s in result.slices} == {f"freq:{f}" for f in fm.sparse_features}
    assert "ROC AUC and average precision" in run.files.markdown.read_text()
