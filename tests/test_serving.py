"""The serving runtime: a bundle refused when damaged, looked up without torch, raw values and
unknown counts, score on dicts/tables/prepared rows, and concurrent use from threads.

One small DeepFM (hashed tables, so hashing rules are exercised too) is trained in this
process and exported once per module; each tamper case works on its own copy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, experiment_config
from dist_utils import in_process_run

from recemb.data.schema import FeatureMap
from recemb.errors import DataError
from recemb.export import export_bundle
from recemb.export.format import MANIFEST, MANIFEST_DIGEST
from recemb.integrity import file_sha256
from recemb.serving.bundle import Bundle
from recemb.train.loop import train


@pytest.fixture(scope="module")
def bundle_dir(prepared_ctr: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serving")
    cfg = experiment_config("deepfm", prepared_ctr, root / "runs",
                            ["embedding.kind=hashed", "embedding.budget=0.1", "train.max_steps=12",
                             "model.params.first_order=table"])  # a bundle with a "linear" layer too
    with in_process_run():
        result = train(cfg)
    return export_bundle(result.output_dir, root / "bundle", dtype="int8")


@pytest.fixture
def copy(bundle_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(bundle_dir, out)
    return out


def _resign(folder: Path, edit: dict) -> None:
    """Edit the manifest and write a matching sidecar (a deliberate, consistent edit)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest.update(edit)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    (folder / MANIFEST_DIGEST).write_text(f"{file_sha256(folder / MANIFEST)}  {MANIFEST}\n")


def _one_table(folder: Path) -> Path:
    return sorted((folder / "tables").iterdir())[0]


# ----------------------------------------------------------------------------- refused bundles


def test_flipped_byte_is_refused_naming_the_file(copy: Path) -> None:
    part = _one_table(copy)
    data = bytearray(part.read_bytes())
    data[-1] ^= 0x01
    part.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{part.name}: checksum mismatch") as info:
        Bundle.open(copy)
    assert "\n" not in str(info.value)


def test_truncated_file_is_refused(copy: Path) -> None:
    part = copy / "dense.safetensors"
    part.write_bytes(part.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"dense\.safetensors: size mismatch"):
        Bundle.open(copy)


def test_missing_file_is_refused(copy: Path) -> None:
    vocab = copy / "data" / "vocab" / "C7.parquet"
    vocab.unlink()
    with pytest.raises(DataError, match=r"C7\.parquet: missing"):
        Bundle.open(copy)


def test_edited_manifest_is_refused(copy: Path) -> None:
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["dtype"] = "fp32"  # would read int8 rows as floats
    (copy / MANIFEST).write_text(json.dumps(manifest, indent=2))
    with pytest.raises(DataError, match=r"manifest\.json: checksum mismatch"):
        Bundle.open(copy)
    (copy / MANIFEST_DIGEST).unlink()
    with pytest.raises(DataError, match=r"manifest\.json\.sha256: missing"):
        Bundle.open(copy)


def test_newer_format_is_refused(copy: Path) -> None:
    _resign(copy, {"format_version": 99})
    with pytest.raises(DataError, match=r"manifest\.json: bundle format 99 is newer than this recemb reads"):
        Bundle.open(copy)


def test_paths_escaping_the_bundle_are_refused(copy: Path, tmp_path: Path) -> None:
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    manifest = json.loads((copy / MANIFEST).read_text())
    table = next(iter(manifest["tables"].values()))
    table["pieces"][0]["file"] = "../outside.safetensors"
    _resign(copy, {"tables": manifest["tables"]})
    with pytest.raises(DataError, match=r"manifest\.json: file path '\.\./outside\.safetensors' leads outside"):
        Bundle.open(copy)
    files = manifest["files"]
    files["../outside.safetensors"] = {"size": 1, "sha256": file_sha256(tmp_path / "outside.safetensors")}
    _resign(copy, {"files": files})
    with pytest.raises(DataError, match=r"'\.\./outside\.safetensors' leads outside"):
        Bundle.open(copy)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not an export bundle"):
        Bundle.open(tmp_path)


# ----------------------------------------------------------------------------- without torch

_NO_TORCH = """
import sys
sys.modules["torch"] = None  # `import torch` now fails
from recemb.serving.bundle import Bundle
bundle = Bundle.open(sys.argv[1])
vectors = bundle.lookup("C1", ["a", None, "b"])
linear = bundle.lookup("C2", ["x"], layer="linear")
print(vectors.shape, linear.shape, bundle.unknown_counts["C1"], bundle.missing_counts["C1"])
try:
    bundle.score([{"C1": "a"}])
except ImportError:
    print("score needs torch")
assert sys.modules["torch"] is None
"""


def test_lookups_run_where_torch_cannot_be_imported(bundle_dir: Path) -> None:
    out = subprocess.run([sys.executable, "-c", _NO_TORCH, str(bundle_dir)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["(3, 8) (1, 4) 2 1", "score needs torch"]


# ----------------------------------------------------------------------------- raw values and scores


def test_unknown_values_take_the_oov_row_and_are_counted(bundle_dir: Path) -> None:
    bundle = Bundle.open(bundle_dir)
    oov = bundle.lookup_ids("C1", np.array([0]))
    got = bundle.lookup("C1", ["never-seen", None, 12345])
    np.testing.assert_array_equal(got, np.repeat(oov, 3, axis=0))
    assert (bundle.unknown_counts["C1"], bundle.missing_counts["C1"], bundle.value_counts["C1"]) == (2, 1, 3)
    assert bundle.unknown_share()["C1"] == pytest.approx(2 / 3)
    assert bundle.rules["C1"]["kind"] == "vocab" and bundle.rules["C1"]["oov_id"] == 0


def _raw_rows(prepared: Path, n: int) -> list[dict[str, object]]:
    """The first ``n`` rows of the raw TSV behind the session's prepared data, as dicts of strings."""
    cols = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    rows = []
    with open(prepared.parent / "ctr.tsv", encoding="utf-8") as fh:
        for line, _ in zip(fh, range(n), strict=False):
            fields = line.rstrip("\n").split("\t")
            rows.append({c: (v if v != "" else None) for c, v in zip(cols, fields, strict=True)})
    return rows


def test_score_takes_dicts_or_a_table_and_numbers_as_numbers(bundle_dir: Path, prepared_ctr: Path) -> None:
    bundle = Bundle.open(bundle_dir)
    rows = _raw_rows(prepared_ctr, 50)
    probs = bundle.score(rows)
    assert probs.shape == (50,) and probs.dtype == np.float32 and ((probs > 0) & (probs < 1)).all()
    table = pa.table({k: [r[k] for r in rows] for k in rows[0]})
    np.testing.assert_array_equal(bundle.score(table), probs)
    as_numbers = [{k: (float(v) if k.startswith("I") and v is not None else v) for k, v in r.items()} for r in rows]
    np.testing.assert_array_equal(bundle.score(as_numbers), probs)
    with pytest.raises(DataError, match=r"feature 'I1' \(column 'I1'\): row 1 holds 'abc', not a finite number"):
        bundle.score([rows[0], {**rows[1], "I1": "abc"}])


def test_concurrent_lookups_and_scores_match_sequential(bundle_dir: Path, prepared_ctr: Path) -> None:
    bundle = Bundle.open(bundle_dir)
    fm = FeatureMap.load(prepared_ctr)
    table = pq.read_table(prepared_ctr / fm.shards["test"][0])
    chunks = [table.slice(i, 100) for i in range(0, 800, 100)]
    want = [bundle.score_prepared(c) for c in chunks]
    want_c5 = [bundle.lookup_ids("C5", c.column("C5").to_numpy()) for c in chunks]
    before = dict(bundle.value_counts)
    rows = _raw_rows(prepared_ctr, 40)
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(bundle.score_prepared, chunks))
        got_c5 = list(pool.map(lambda c: bundle.lookup_ids("C5", c.column("C5").to_numpy()), chunks))
        list(pool.map(bundle.score, [rows] * 8))
    for a, b in zip(got + got_c5, want + want_c5, strict=True):
        np.testing.assert_array_equal(a, b)
    assert bundle.value_counts["C1"] == before["C1"] + 8 * 40  # no count lost between threads
