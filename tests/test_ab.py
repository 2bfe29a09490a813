"""Offline A/B: the statistics against direct computations and simulations, the report's structure, and
``run_ab`` end to end on two tiny trained runs and an int8 bundle, tracked in a real sqlite MLflow store.

Figures (coverage, p-value spread, timings) go to stdout: run with ``-s`` to see them.
"""

from __future__ import annotations

import doctest
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from recemb.errors import DataError
from recemb.eval import ab as ab_module
from recemb.eval import stats
from recemb.eval.ab import ArmScores, EvalRows, compare, frequency_classes, row_classes
from recemb.eval.metrics import auc as exact_auc
from recemb.eval.report import to_html, write_report
from recemb.eval.stats import bootstrap_weights, delong, group_auc, holm, paired_bootstrap


def test_docstring_examples() -> None:
    for module in (stats, ab_module):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0, module.__name__


# ----------------------------------------------------------------------------- DeLong, Holm, group AUC


def test_delong_covariance_equals_the_direct_quadratic_computation() -> None:
    rng = np.random.default_rng(3)
    y = rng.random(60) < 0.4
    scores = np.stack([y + rng.normal(size=60), np.round(y * 0.5 + rng.normal(size=60), 1), rng.normal(size=60)])
    got = delong(scores, y)
    x, z = scores[:, y], scores[:, ~y]
    # psi[a, i, j] = 1 if positive i outscores negative j, 1/2 on a tie: O(n^2) pairs.
    psi = (x[:, :, None] > z[:, None, :]) + 0.5 * (x[:, :, None] == z[:, None, :])
    v10, v01 = psi.mean(2), psi.mean(1)
    direct = np.cov(v10) / x.shape[1] + np.cov(v01) / z.shape[1]
    np.testing.assert_allclose(got.aucs, psi.mean((1, 2)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.cov, direct, rtol=1e-10, atol=1e-15)
    for a in range(3):
        assert got.aucs[a] == pytest.approx(exact_auc(torch.tensor(scores[a]), torch.tensor(y.astype(float))))


def test_holm_on_a_hand_example() -> None:
    # sorted p: .005 (x4 = .02), .01 (x3 = .03), .03 (x2 = .06), .04 (x1 = .04 -> raised to .06: monotone)
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, np.nan, 0.01]), [0.5, np.nan, 0.02])
    assert holm([0.9, 0.8]).tolist() == [1.0, 1.0]  # 0.8 x 2 caps at 1; 0.9 x 1 may not fall below it


def test_group_auc_is_the_impression_weighted_mean_of_per_group_aucs() -> None:
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 40, 3000)
    y = rng.random(3000) < 0.3
    s = np.round(y + rng.normal(size=3000), 1)  # ties inside groups
    got = group_auc(s, y, groups)
    per, weights = [], []
    for g in np.unique(groups):
        m = groups == g
        if 0 < y[m].sum() < m.sum():
            per.append(exact_auc(torch.tensor(s[m]), torch.tensor(y[m].astype(float))))
            weights.append(m.sum())
    assert got.value == pytest.approx(np.average(per, weights=weights), abs=1e-12)


# ----------------------------------------------------------------------------- the bootstrap


def test_bootstrap_replicates_equal_the_metrics_of_the_weighted_rows() -> None:
    """Each replicate is the metric of the resampled rows: rows repeated by their weights."""
    rng = np.random.default_rng(1)
    n, b = 400, 5
    y = rng.random(n) < 0.35
    s = np.stack([y + rng.normal(size=n), np.round(y + rng.normal(size=n), 1)])  # arm 1 has ties
    out = paired_bootstrap(y, s, resamples=b, seed=7, block=b)
    drawn = bootstrap_weights(np.random.default_rng(7), b, n).astype(np.int64)
    w = np.empty_like(drawn)
    w[:, stats.resample_order(y)] = drawn  # the p-th weight of a resample belongs to row resample_order[p]
    for r in range(b):
        rows = np.repeat(np.arange(n), w[r])
        ya = torch.tensor(y[rows].astype(float))
        auc = [exact_auc(torch.tensor(s[a][rows]), ya) for a in range(2)]
        assert out.replicates[0]["auc"][r] == pytest.approx(auc[1] - auc[0], abs=1e-6)  # float32 weighted sums
        x = np.clip(s[:, rows], -36, 36)
        loss = (np.logaddexp(0, x) - y[rows] * x).mean(1)
        assert out.replicates[0]["logloss"][r] == pytest.approx(loss[1] - loss[0], abs=1e-6)


def test_aa_trials_cover_zero_at_the_nominal_rate_and_delong_p_values_are_uniform() -> None:
    """200 synthetic A/A trials: two arms of equal quality (independent noise on the same signal)."""
    rng = np.random.default_rng(2024)
    trials, n = 200, 600
    covered = {m: 0 for m in stats.CTR_METRICS}
    pvalues = []
    for t in range(trials):
        y = rng.random(n) < 0.3
        s = np.stack([y + rng.normal(size=n), y + rng.normal(size=n)])
        out = paired_bootstrap(y, s, resamples=400, seed=t)
        for m in covered:
            covered[m] += out.low[0][m] <= 0 <= out.high[0][m]
        pvalues.append(delong(s, y).diff(1, 0)[3])
    coverage = {m: c / trials for m, c in covered.items()}
    deciles = np.histogram(pvalues, bins=10, range=(0, 1))[0]
    ks = np.max(np.abs(np.sort(pvalues) - (np.arange(1, trials + 1) - 0.5) / trials))
    print(f"\n[aa] coverage of 0 by the 95% bootstrap interval over {trials} trials: {coverage}; "
          f"DeLong p deciles {deciles.tolist()}, KS distance {ks:.3f}")
    assert 0.93 <= coverage["auc"] <= 0.97, coverage
    assert 0.93 <= coverage["logloss"] <= 0.97, coverage
    assert all(0.90 <= c <= 0.98 for c in coverage.values()), coverage
    assert ks < 1.36 / math.sqrt(trials)  # KS test at 5%
    assert deciles.min() >= 8


def _synthetic_arms(n: int = 8000, gain: float = 0.3, seed: int = 0) -> tuple[list[ArmScores], EvalRows]:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    keys = np.arange(n, dtype=np.int64)
    control = y + rng.normal(size=n)
    better = (1 + gain) * y + rng.normal(size=n)
    shuffled = rng.permutation(n)  # arms may return rows in any order: paired by key
    arms = [ArmScores("control", "run", "a", keys, control, "fp", 4000),
            ArmScores("same", "run", "a", keys, control.copy(), "fp", 4000),
            ArmScores("better", "bundle", "b", keys[shuffled], better[shuffled], "fp", 40)]
    freq = {"C1": rng.integers(0, 3, n).astype(np.int8)}
    rows = EvalRows(keys, y.astype(int), "fp", columns={"hour": rng.integers(0, 4, n)}, frequency=freq,
                    group=rng.integers(0, 300, n))
    return arms, rows


def test_planted_better_treatment_is_found_and_aa_is_indistinguishable() -> None:
    arms, rows = _synthetic_arms()
    result = compare(arms, "control", rows, slices=["hour"], group="g", resamples=500)
    verdicts = {(v.treatment, v.metric): v for v in result.verdicts}
    for v in result.verdicts:
        print(v.text)
    assert all(v.verdict == "indistinguishable" and v.delta == 0 for v in result.verdicts if v.treatment == "same")
    assert verdicts[("better", "auc")].verdict == "better"
    assert verdicts[("better", "logloss")].verdict == "better"
    assert verdicts[("better", "gauc")].verdict == "better"
    assert verdicts[("better", "auc")].low > 0
    assert {s.slice for s in result.slices} == {"freq:C1", "hour"}
    assert [s.value for s in result.slices if s.slice == "freq:C1"] == ["head", "torso", "tail"]
    assert re.match(r"better vs control: auc better at 95% \(Holm\), by \+0\.\d+ \(CI \+0\.\d+\.\.\+0\.\d+",
                    verdicts[("better", "auc")].text)


def test_arms_that_score_other_rows_or_another_feature_map_are_refused() -> None:
    arms, rows = _synthetic_arms(n=500)
    arms[2].keys = arms[2].keys[:-1]
    arms[2].scores = arms[2].scores[:-1]
    with pytest.raises(DataError, match="scored 499 rows, the data has 500: 1 rows missing"):
        compare(arms, "control", rows, resamples=10)
    arms, rows = _synthetic_arms(n=500)
    arms[1].fingerprint = "other"
    with pytest.raises(DataError, match="arm 'same'.*does not encode the data"):
        compare(arms, "control", rows, resamples=10)


def test_frequency_classes_cut_training_occurrences_at_half_and_nine_tenths() -> None:
    # 100 occurrences: id 1 (50) is head, ids 2 and 3 (30, 10) torso (before them: 50, 80 < 90), the rest tail.
    assert frequency_classes(np.array([0, 50, 30, 10, 6, 4])).tolist() == [2, 0, 1, 1, 2, 2]
    cls = frequency_classes(np.array([0, 50, 30, 10, 6, 4]))
    assert row_classes(cls, np.array([1, 2, 5, 0, 99])).tolist() == [0, 1, 2, 2, 2]
    # multi-hot: the rarest id of the row; an empty row is tail
    assert row_classes(cls, np.array([1, 2, 1, 4]), np.array([2, 0, 2])).tolist() == [1, 2, 2]


# ----------------------------------------------------------------------------- the report


def test_html_report_is_self_contained_with_every_figure_embedded(tmp_path: Path) -> None:
    arms, rows = _synthetic_arms(n=3000)
    result = compare(arms, "control", rows, slices=["hour"], resamples=100)
    files = write_report(result, tmp_path / "report")
    page = files.html.read_text(encoding="utf-8")
    images = re.findall(r'<img id="fig-([a-z_]+)"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(name for name, _ in images) == sorted(["roc", "calibration", "deltas", "frequency", "auc_vs_bytes"])
    import base64

    for _, data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "http://" not in page and "https://" not in page
    assert "<script" not in page
    md = files.markdown.read_text()
    assert "better vs control: auc better at 95%" in md and "| C1 | tail |" in md
    import json

    data = json.loads(files.json.read_text())
    assert sorted(data["figures"]) == sorted(name for name, _ in images)
    assert data["figures"]["auc_vs_bytes"]["better"]["embedding_bytes"] == 40
    assert to_html(result, {}).count("<img") == 0


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(prepared_ctr: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny DeepFM runs (full, hashed at 1/10) and an int8 bundle of the full one."""
    import torch.distributed as dist
    from conftest import experiment_config

    from recemb.export import export_bundle
    from recemb.train.loop import train

    root = tmp_path_factory.mktemp("ab_runs")
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind, extra in (("full", []), ("hashed", ["embedding.budget=0.1"])):
            cfg = experiment_config("deepfm", prepared_ctr, root / "runs",
                                    [f"embedding.kind={kind}", f"expid=deepfm_{kind}", "train.max_steps=20", *extra])
            out[kind] = Path(train(cfg).output_dir)
            if dist.is_initialized():
                dist.destroy_process_group()
    finally:
        torch.set_num_threads(threads)
    out["int8"] = export_bundle(out["full"], root / "bundle_int8", dtype="int8")
    return out


@pytest.mark.slow  # three run arms through Ray Data: about 90 s here
def test_run_ab_end_to_end_with_mlflow_parent_and_child_runs(trained: dict[str, Path], prepared_ctr: Path,
                                                             tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines.ab import run_ab

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = run_ab(str(trained["full"]), [str(trained["full"]), str(trained["hashed"]), str(trained["int8"])],
                 prepared_ctr, out=tmp_path / "ab", mlflow_uri=uri, resamples=300, slices=["C1"], workers=1,
                 speed_batches=5)
    result = run.result
    names = [a.name for a in result.arms]
    assert names == ["deepfm_full", "deepfm_full#2", "deepfm_hashed", "deepfm_full@int8"]
    for v in result.verdicts:
        print(v.text)
    aa = [v for v in result.verdicts if v.treatment == "deepfm_full#2"]
    assert aa and all(v.verdict == "indistinguishable" and v.delta == 0 for v in aa)
    int8 = {v.metric: v for v in result.verdicts if v.treatment == "deepfm_full@int8"}
    assert abs(int8["auc"].delta) < 2e-3
    full, hashed, bundle = result.arm("deepfm_full"), result.arm("deepfm_hashed"), result.arm("deepfm_full@int8")
    assert hashed.embedding_bytes < full.embedding_bytes and bundle.embedding_bytes < full.embedding_bytes
    assert all(a.speed is not None and a.speed.rows_per_s > 0 and a.speed.p99_ms >= a.speed.p50_ms
               for a in result.arms)
    assert {s.slice for s in result.slices} >= {"freq:C1", "C1"}
    assert run.files.html.is_file() and run.files.markdown.is_file() and run.files.json.is_file()

    client = MlflowClient(uri)
    parent = client.get_run(run.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["control"] == "deepfm_full"
    assert {f.path for f in client.list_artifacts(run.parent_run_id, "ab")} == {"ab/report.html", "ab/report.md",
                                                                               "ab/report.json"}
    assert set(run.child_run_ids) == set(names)
    for name, child_id in run.child_run_ids.items():
        child = client.get_run(child_id)
        assert child.data.tags["mlflow.parentRunId"] == run.parent_run_id
        assert child.data.metrics["auc"] == pytest.approx(result.arm(name).metrics["auc"])
        assert child.info.run_name == name


def test_run_ab_refuses_an_arm_whose_feature_map_differs(trained: dict[str, Path], prepared_ctr: Path,
                                                          tmp_path: Path) -> None:
    import json
    import shutil

    from pipelines.ab import run_ab

    other = tmp_path / "data"
    shutil.copytree(prepared_ctr, other)
    fm = json.loads((other / "feature_map.json").read_text())
    fm["features"][-1]["num_embeddings"] += 1
    (other / "feature_map.json").write_text(json.dumps(fm))
    with pytest.raises(DataError, match=r"does not fit the data .*num_embeddings"):
        run_ab(str(trained["full"]), [str(trained["int8"])], other, out=tmp_path / "ab", track=False)


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_frequency_chart_keeps_its_width_and_slice_deltas_are_a_holm_family(tmp_path: Path) -> None:
    """30 features: the chart stays as wide as the page column (it grows down instead), and the slice deltas'
    Holm family is stated and applied apart from the headline one."""
    import base64

    from recemb.eval.report import FIGURE_DPI, MAX_FIGURE_INCHES

    arms, rows = _synthetic_arms(n=4000)
    rng = np.random.default_rng(1)
    widths, heights = [], []
    for features in (3, 30):
        rows.frequency = {f"C{i}": rng.integers(0, 3, len(rows.keys)).astype(np.int8) for i in range(features)}
        result = compare(arms, "control", rows, slices=["hour"], resamples=100)
        files = write_report(result, tmp_path / str(features))
        page = files.html.read_text(encoding="utf-8")
        png = re.search(r'<img id="fig-frequency"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
        assert png is not None
        width, height = _png_size(base64.b64decode(png.group(1)))
        widths.append(width)
        heights.append(height)
        for other in re.findall(r'<img id="fig-[a-z_]+"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page):
            assert _png_size(base64.b64decode(other))[0] <= MAX_FIGURE_INCHES * FIGURE_DPI * 1.05
        # 2 treatments x (features x 3 classes + 4 hour values) slices x (auc, logloss)
        assert result.slice_tests == 2 * (features * 3 + 4) * 2
        deltas = [d for s in result.slices for per in s.deltas.values() for d in per.values()]
        assert all(d.p_holm >= d.p for d in deltas) and max(d.p_holm for d in deltas) <= 1
        assert {d.verdict for d in deltas if d.p_holm >= 0.05} <= {"indistinguishable"}
        assert f"second Holm family of their own ({result.slice_tests} tests" in page
        assert 'id="slice-holm"' in page and page.count('<div class="wide"><table>') >= 3
        assert "Slice deltas form a second Holm family" in files.markdown.read_text()
    assert widths[1] <= MAX_FIGURE_INCHES * FIGURE_DPI * 1.05 and abs(widths[1] - widths[0]) < 60
    assert heights[1] > 3 * heights[0]
    better = [s for s in result.slices if s.deltas["better"]["auc"].verdict == "better"]
    assert better and all(s.deltas["same"]["auc"].verdict == "indistinguishable" for s in result.slices)
