"""``recemb prepare`` on a local Ray (one task per input file) against the single-process path.

Three synthetic Criteo files, one with bad lines, prepared both ways: the feature map
(vocabularies, ids, moments, rows per split) and stats must be identical, the prepared
rows the same set, the rejects the same lines in file order; only shard names differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.prepare import _map_in_order, run_prepare
from recemb.data.schema import FeatureMap, load_dataset_config
from recemb.data.sources import resolve_paths
from recemb.data.synthetic import CtrSynthConfig, generate_ctr
from recemb.errors import DataError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "datasets" / "synthetic_ctr.yaml"
ROWS = 3000
BAD_LINES = {7: "1\t2\t3", 1500: "", 2999: "x" + "\t" * 39}  # 1-based lines of the second file


@pytest.fixture(scope="module")
def raw_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("raw")
    paths = []
    for seed in range(3):
        path = root / f"day_{seed}.tsv"
        generate_ctr(CtrSynthConfig(rows=ROWS, seed=seed, vocab_scale=0.001), path)
        paths.append(path)
    lines = paths[1].read_text().split("\n")
    for line, content in BAD_LINES.items():
        lines[line - 1] = content
    paths[1].write_text("\n".join(lines))
    return paths


def _overrides(paths: list[Path], *extra: str) -> list[str]:
    return [f"paths=[{', '.join(str(p) for p in paths)}]", "shard_rows=1000", *extra]


def _rows(out: Path, fm: FeatureMap, split: str) -> pa.Table:
    table = pa.concat_tables([pq.read_table(out / f) for f in fm.shards[split]])
    return table.sort_by([(name, "ascending") for name in table.column_names])


def test_ray_prepare_equals_local(ray_local: Any, raw_files: list[Path], tmp_path: Path) -> None:
    local = run_prepare(CONFIG, _overrides(raw_files), output=tmp_path / "local")
    dist = run_prepare(CONFIG, _overrides(raw_files), output=tmp_path / "ray", workers=2)
    assert ray_local.is_initialized()  # the module's Ray was reused, not shut down
    assert dist.rows_in == local.rows_in == 3 * ROWS
    assert dist.rows_out == local.rows_out and dist.rejected == local.rejected
    assert local.rows_rejected == len(BAD_LINES)

    a, b = (json.loads((tmp_path / d / "feature_map.json").read_text()) for d in ("local", "ray"))
    a_shards, b_shards = a.pop("shards"), b.pop("shards")
    assert a == b
    assert a_shards["train"][0] == "train/part-00000.parquet"
    assert b_shards["train"][:2] == ["train/part-00000-00000.parquet", "train/part-00000-00001.parquet"]
    for files in b_shards.values():  # listed in file order, then shard order
        assert files == sorted(files) and {f.split("-")[1] for f in files} == {"00000", "00001", "00002"}

    fm_a, fm_b = FeatureMap.load(tmp_path / "local"), FeatureMap.load(tmp_path / "ray")
    for split in ("train", "valid", "test"):
        rows_a, rows_b = _rows(tmp_path / "local", fm_a, split), _rows(tmp_path / "ray", fm_b, split)
        assert rows_a.num_rows == rows_b.num_rows == fm_a.rows[split] > 0
        assert rows_a.equals(rows_b), split

    for info in fm_a.features:
        if info.vocab_file:
            assert pq.read_table(tmp_path / "local" / info.vocab_file).equals(
                pq.read_table(tmp_path / "ray" / info.vocab_file))

    sa, sb = (json.loads((tmp_path / d / "stats.json").read_text()) for d in ("local", "ray"))
    for s in (sa, sb):
        del s["seconds"], s["output"]
    assert sa == sb and sb["rows_rejected"] == len(BAD_LINES)
    rejects = [(tmp_path / d / "rejects" / "rejects.csv").read_bytes() for d in ("local", "ray")]
    assert rejects[0] == rejects[1] and rejects[1].count(b"\n") == 1 + len(BAD_LINES)
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == sorted(p.name for p in (tmp_path / "local").iterdir())
    assert [p.name for p in (tmp_path / "ray" / "rejects").iterdir()] == ["rejects.csv"]
    assert not list(tmp_path.glob(".ray.tmp*"))


def test_ray_prepare_reject_fraction_leaves_no_output(ray_local: Any, raw_files: list[Path], tmp_path: Path) -> None:
    with pytest.raises(DataError, match="3 of 9000 rows rejected") as e:
        run_prepare(CONFIG, _overrides(raw_files, "max_reject_fraction=0.0001"), output=tmp_path / "o", workers=2)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp*"))


def test_task_user_error_is_reraised_as_itself(ray_local: Any, raw_files: list[Path]) -> None:
    ok, missing = (load_dataset_config(CONFIG, {"paths": [str(p)]}) for p in (raw_files[0], raw_files[0].with_name("nope")))
    task = ray_local.remote(num_cpus=0.5, max_retries=0)(resolve_paths)
    assert _map_in_order(task.remote, [(ok,), (ok,)], 1) == [resolve_paths(ok)] * 2
    with pytest.raises(DataError, match="nope: file not found") as e:
        _map_in_order(task.remote, [(ok,), (missing,), (ok,)], 2)
    assert type(e.value) is DataError  # not Ray's wrapper: the CLI prints it as one line
