"""``recemb ab --data <raw file>``: the file is encoded through the arms' feature map exactly as preparation
would, and the comparison equals the one on the prepared split of the same rows; rejected rows are counted.

The arms are bundles (fp32 and int8 of one tiny DeepFM run) so no Ray starts; the run arm's Ray path over
the encoded split is checked too, marked slow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import experiment_config
from dist_utils import in_process_run

from recemb.data.encode import encode_file, raw_config
from recemb.data.hashing import row_uniform
from recemb.data.schema import FeatureMap, load_dataset_config
from recemb.errors import DataError

BAD_LINES = ["1\tonly-two-fields", "x" + "\t1" * 13 + "\tabc" * 26]  # wrong field count; unparseable label


def _test_lines(prepared: Path) -> list[str]:
    """The raw lines preparation sent to the test split, in file order."""
    cfg = load_dataset_config(prepared / "dataset_config.yaml")
    lines = Path(cfg.paths[0]).read_text().splitlines()
    u = row_uniform(0, np.arange(1, len(lines) + 1), cfg.split.seed)
    return [line for line, x in zip(lines, u, strict=True) if x >= cfg.split.train + cfg.split.valid]


@pytest.fixture(scope="module")
def raw_test(prepared_ctr: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test split's raw lines, two bad lines between them."""
    lines = _test_lines(prepared_ctr)
    path = tmp_path_factory.mktemp("raw") / "test.tsv"
    path.write_text("\n".join([*lines[:10], BAD_LINES[0], *lines[10:], BAD_LINES[1]]) + "\n")
    return path


@pytest.fixture(scope="module")
def arms(prepared_ctr: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny DeepFM run and its fp32 and int8 bundles."""
    from recemb.export import export_bundle
    from recemb.train.loop import train

    root = tmp_path_factory.mktemp("ab_raw")
    cfg = experiment_config("deepfm", prepared_ctr, root / "runs", ["expid=deepfm_raw", "train.max_steps=20"])
    with in_process_run():
        run = Path(train(cfg).output_dir)
    return {"run": run, "fp32": export_bundle(run, root / "fp32", dtype="fp32"),
            "int8": export_bundle(run, root / "int8", dtype="int8")}


def test_encoded_raw_file_equals_the_prepared_test_split(prepared_ctr: Path, raw_test: Path, tmp_path: Path) -> None:
    fm = FeatureMap.load(prepared_ctr)
    out = encode_file(fm, raw_config(fm, raw_test), tmp_path / "enc")
    encoded = pa.concat_tables([pq.read_table(p) for p in out.shards])
    prepared = pa.concat_tables([pq.read_table(prepared_ctr / s) for s in fm.shards["test"]])
    assert encoded.schema == prepared.schema
    assert encoded.equals(prepared)  # same ids (vocabulary, OOV), same standardised dense values, same order
    assert out.rows_in == fm.rows["test"] + 2 and out.rows == fm.rows["test"]
    assert out.rejected == {"unparseable label 'label'": 1, "wrong number of fields: expected 40, got 2": 1}
    assert out.examples[0].endswith(":11: wrong number of fields: expected 40, got 2")
    assert set(out.unseen) == set(fm.sparse_features) and 0 < max(out.unseen.values()) < 1


def test_raw_data_gives_the_comparison_of_the_prepared_split(arms: dict[str, Path], prepared_ctr: Path,
                                                            raw_test: Path, tmp_path: Path) -> None:
    from pipelines.ab import run_ab

    kwargs = {"resamples": 200, "slices": ["C1"], "track": False, "speed_batches": 2}
    raw = run_ab(str(arms["fp32"]), [str(arms["int8"])], raw_test, out=tmp_path / "raw", **kwargs).result
    split = run_ab(str(arms["fp32"]), [str(arms["int8"])], prepared_ctr, out=tmp_path / "split", **kwargs).result
    assert raw.rows == split.rows == FeatureMap.load(prepared_ctr).rows["test"]
    for a, b in zip(raw.arms, split.arms, strict=True):
        assert a.name == b.name
        assert a.metrics == pytest.approx(b.metrics, rel=0, abs=1e-12)
    for a, b in zip(raw.verdicts, split.verdicts, strict=True):
        assert (a.treatment, a.metric, a.verdict) == (b.treatment, b.metric, b.verdict)
        assert (a.delta, a.low, a.high, a.p) == pytest.approx((b.delta, b.low, b.high, b.p), abs=1e-12)
    assert [(s.slice, s.value, s.rows) for s in raw.slices] == [(s.slice, s.value, s.rows) for s in split.slices]
    assert raw.data is not None and raw.data.kind == "raw" and raw.data.rows_in == raw.rows + 2
    assert sum(raw.data.rejected.values()) == 2
    assert split.data is not None and split.data.kind == "prepared" and not split.data.rejected
    md = (tmp_path / "raw" / "report.md").read_text()
    assert f"{raw.rows + 2:,} rows read, {raw.rows:,} kept, 2 rejected by the reader" in md
    assert not any(p.name.startswith(".data-") for p in (tmp_path / "raw").iterdir())  # the temporary split is gone


def test_raw_file_without_rows_is_refused(arms: dict[str, Path], tmp_path: Path) -> None:
    from pipelines.ab import run_ab

    bad = tmp_path / "bad.tsv"
    bad.write_text("\n".join(BAD_LINES) + "\n")
    with pytest.raises(DataError, match="no row left to encode"):
        run_ab(str(arms["fp32"]), [str(arms["int8"])], bad, out=tmp_path / "ab", track=False)


@pytest.mark.slow
def test_run_arm_scores_the_encoded_split_through_ray(arms: dict[str, Path], raw_test: Path, tmp_path: Path) -> None:
    from pipelines.ab import run_ab

    result = run_ab(str(arms["run"]), [str(arms["fp32"])], raw_test, out=tmp_path / "ab", resamples=100,
                    track=False, workers=1, speed_batches=2).result
    fp32 = {v.metric: v for v in result.verdicts}
    assert result.data is not None and result.data.kind == "raw"
    assert abs(fp32["auc"].delta) < 1e-6 and fp32["auc"].verdict == "indistinguishable"  # the run and its bundle
    run_metrics, bundle_metrics = (a.metrics for a in result.arms)
    assert run_metrics["auc"] == pytest.approx(bundle_metrics["auc"], abs=1e-6)
