"""Export bundles from trained runs: parity per variant, quantised bounds and AUC, bytes, shard-by-shard
export on two ranks, atomic writes, ``--features`` and the ``export``/``score`` verbs.

A tiny DeepFM per variant is trained in this process (one per module, on the session's
synthetic data) and exported. The fp32 bundle, looked up from RAW values (the vocabulary
strings of the test split's ids), must give the trained model's embedding-layer outputs,
and its scores ``load_trained_model`` + forward (what ``recemb evaluate`` computes).
Figures go to stdout (run with ``-s`` to see them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
from conftest import experiment_config
from dist_utils import in_process_run, run_ranks

from recemb.cli import main
from recemb.config.experiment import ExperimentConfig
from recemb.config.loader import from_dict
from recemb.data.batch import arrow_to_batch
from recemb.data.hashing import row_uniform
from recemb.data.preprocess import load_vocab
from recemb.data.schema import FeatureMap
from recemb.embeddings.pruned import FeaturePruning, PruningPlan, remap_from_mask, save_pruning
from recemb.errors import ConfigError, DataError, OutputExistsError
from recemb.eval.metrics import compute_metrics
from recemb.export import export_bundle
from recemb.export import writer as export_writer
from recemb.export.format import MANIFEST, row_bound
from recemb.export.materialize import computes_rows
from recemb.models.registry import embedding_layers
from recemb.serving import bundle as bundle_module
from recemb.serving.bundle import Bundle, StoredTable
from recemb.train.loop import train
from recemb.train.restore import load_trained_model, resolve_checkpoint

# Variant -> overrides of the small DeepFM run. Gather variants must match exactly.
VARIANTS: dict[str, list[str]] = {
    "full": [],
    "hashed": ["embedding.budget=0.1"],
    "qr": ["embedding.budget=0.1"],
    "unified": ["embedding.budget=0.1"],
    "robe": ["embedding.budget=0.1"],
    "mde": ["embedding.budget=0.1"],
    "hybrid": ["embedding.budget=0.1"],
    "tt": ["embedding.budget=0.1"],
    "dhe": ["embedding.budget=0.1"],
    "lowprec": [],
    "optembed": [],
    "pruned": [],  # embedding.params: the pruning folder Runs writes (pruning_folder), a learned OOV vector
}
GATHER = {"full", "hashed", "unified", "hybrid"}
RUN = ["train.max_steps=12"]  # a few steps move every table off its init; `full` trains a whole epoch (AUC checks)
UNSEEN = "__never_seen_in_training__"


def pruning_folder(data_dir: Path, path: Path) -> Path:
    """A hand-made OptEmbed result over the synthetic features: about 60% of each feature's rows kept
    (id 1 always, the OOV id 0 never, so unseen values take the learned OOV vector), C2 at dim 4, C3 pruned whole."""
    fm = FeatureMap.load(data_dir)
    rng = np.random.default_rng(0)
    features = {}
    for f in fm.sparse_features:
        n = fm.feature(f).num_embeddings
        keep = np.zeros(n, bool) if f == "C3" else rng.random(n) < 0.6
        keep[0], keep[1] = False, f != "C3"  # id 1 kept: every other feature keeps rows (some have 2 ids)
        features[f] = FeaturePruning(remap_from_mask(keep), dim=4 if f == "C2" else 8)
    return save_pruning(path, PruningPlan(full_dim=8, features=features))


class Runs:
    """Trains each variant once per module (in this process) and keeps its run folder."""

    def __init__(self, data_dir: Path, root: Path) -> None:
        self.data_dir, self.root = data_dir, root
        self.done: dict[str, Any] = {}

    def __call__(self, kind: str) -> Any:
        if kind not in self.done:
            extra = []
            if kind == "pruned":
                folder = pruning_folder(self.data_dir, self.root / "pruning")
                extra = [f"embedding.params={{path: '{folder}', pruned_vector: oov}}"]
            # first_order: table, so every variant's bundle holds first-order (lin_) tables too.
            cfg = experiment_config("deepfm", self.data_dir, self.root / "runs",
                                    [f"embedding.kind={kind}", f"expid=deepfm_{kind}", "model.params.first_order=table",
                                     *([] if kind == "full" else RUN), *VARIANTS[kind], *extra])
            with in_process_run():
                self.done[kind] = train(cfg)
        return self.done[kind]


@pytest.fixture(scope="module")
def runs(prepared_ctr: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(prepared_ctr, tmp_path_factory.mktemp("export_runs"))


def load_test_split(data_dir: str | Path) -> tuple[FeatureMap, pa.Table]:
    fm = FeatureMap.load(Path(data_dir))
    return fm, pa.concat_tables([pq.read_table(Path(data_dir) / s) for s in fm.shards["test"]])


def raw_values(fm: FeatureMap, data_dir: str | Path, table: pa.Table) -> dict[str, np.ndarray]:
    """The raw strings behind each sparse column's ids (id 0, the OOV id: a string never seen)."""
    out = {}
    for f in fm.sparse_features:
        info = fm.feature(f)
        vocab = load_vocab(Path(data_dir) / info.vocab_file).sort_by("id").column("value").to_numpy(zero_copy_only=False)
        ids = table.column(f).to_numpy()
        out[f] = np.where(ids == 0, UNSEEN, vocab[np.maximum(ids - 1, 0)]).astype(object)
    return out


def reference(checkpoint: Path) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray, pa.Table, Any]:
    """The trained model's layer outputs and logits on the test split (``load_trained_model``)."""
    model, cfg = load_trained_model(checkpoint)
    fm, table = load_test_split(cfg.data_dir)
    batch = arrow_to_batch(table, fm)
    with torch.no_grad():
        outs = {name: {f: v.numpy() for f, v in layer(batch.sparse).to_dict().items()}
                for name, layer in embedding_layers(model).items()}
        logits = model(batch).numpy()
    return outs, logits, table, cfg


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[f] - b[f]).max()) for f in a)


# ----------------------------------------------------------------------------- fp32 parity per variant


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_fp32_bundle_reproduces_the_trained_model(runs: Runs, kind: str, tmp_path: Path) -> None:
    result = runs(kind)
    checkpoint = resolve_checkpoint(result.output_dir)
    bundle = Bundle.open(export_bundle(result.output_dir, tmp_path / "bundle"))
    outs, logits, table, cfg = reference(checkpoint)
    fm = FeatureMap.load(cfg.data_dir)
    raw = raw_values(fm, cfg.data_dir, table)
    diffs = {}
    for name, per_feature in outs.items():
        got = {f: bundle.lookup(f, raw[f], layer=name) for f in per_feature}
        assert {f: v.shape for f, v in got.items()} == {f: v.shape for f, v in per_feature.items()}
        diffs[name] = max_diff(got, per_feature)
    probs = bundle.score_prepared(table)
    score_diff = float(np.abs(probs - torch.sigmoid(torch.from_numpy(logits)).numpy()).max())
    unseen = int((table.column("C1").to_numpy() == 0).sum())
    print(f"[parity] {kind}: lookup max|diff| {diffs}, score max|diff| {score_diff:.2e}, "
          f"unknown C1 values {bundle.unknown_counts['C1']}")
    assert bundle.unknown_counts["C1"] == unseen * len(outs)  # every layer looked C1 up once
    limit = 0.0 if kind in GATHER else 1e-6
    assert max(diffs.values()) <= limit, diffs
    assert score_diff <= 1e-6


def test_pruned_bundle_keeps_the_searched_layout_and_its_oov_vector(runs: Runs, tmp_path: Path) -> None:
    """``pruned``: compact tables at the searched dims (none for the fully pruned C3), remaps as plan
    arrays, the learned OOV vector for unseen values and pruned ids; int8 quantises the compact tables only."""
    result = runs("pruned")
    fp32 = Bundle.open(export_bundle(result.output_dir, tmp_path / "fp32"))
    fm = FeatureMap.load(runs.data_dir)
    tables = {n: t for n, t in fp32.manifest["tables"].items() if t["layer"] == "embedding"}
    assert sorted(tables) == sorted(f"p_{f}" for f in fm.sparse_features if f != "C3")
    assert tables["p_C2"]["dim"] == 4 and all(t["dim"] == 8 for n, t in tables.items() if n != "p_C2")
    layer = fp32.layer("embedding")
    plan = layer.parts["C1"].plan
    oov = layer.parts["C1"].dense["oov"]
    assert float(np.abs(oov).max()) > 0
    int8 = Bundle.open(export_bundle(result.output_dir, tmp_path / "int8", dtype="int8"))
    checked = 0
    for f in plan.features:
        lo = sum(plan.dims[g] for g in plan.features[: plan.features.index(f)])
        vector = oov[lo: lo + plan.dims[f]]
        proj = layer.projections.get(f)  # mixed dims: the model projects each feature to the common width
        vector = vector if proj is None else (vector @ proj.T).astype(np.float32)
        remap = plan.arrays[f"remap/{f}"]
        vocab = load_vocab(runs.data_dir / fm.feature(f).vocab_file).sort_by("id").column("value").to_pylist()
        pruned = [vocab[i - 1] for i in np.flatnonzero(remap < 0)[:5] if i > 0]
        kept = [vocab[i - 1] for i in np.flatnonzero(remap >= 0)[:50]]
        assert bool(kept) == (f != "C3"), f
        checked += len(pruned)
        for bundle in (fp32, int8):  # the OOV vector is a layer parameter: fp32 in every bundle
            got = bundle.lookup(f, [UNSEEN, *pruned])
            np.testing.assert_allclose(got, np.tile(vector, (1 + len(pruned), 1)), rtol=0, atol=1e-7)
        if kept:
            ids = remap[np.flatnonzero(remap >= 0)[:50]]
            err = np.abs(int8.lookup(f, kept) - fp32.lookup(f, kept)).max(axis=1)
            assert (err <= _stored_bound(int8.tables[f"p_{f}"])[ids]).all(), f
    assert checked > 20
    print(f"[pruned] {len(tables)} compact tables (C2 at dim 4, C3 pruned whole); unseen and pruned values read "
          f"the learned OOV vector (projected: within 1e-7), fp32 and int8")


@pytest.mark.parametrize("kind", ["tt", "dhe"])
def test_materialized_rows_serve_listed_values_and_the_rest_is_computed(
        runs: Runs, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--materialize``: half of the test split's distinct values of every TT/DHE feature (and an unseen one)
    precomputed; lookups of listed ids gather them (never computed), the others are computed; parity holds."""
    result = runs(kind)
    outs, logits, table, cfg = reference(resolve_checkpoint(result.output_dir))
    fm = FeatureMap.load(cfg.data_dir)
    raw = raw_values(fm, cfg.data_dir, table)
    plain = Bundle.open(export_bundle(result.output_dir, tmp_path / "plain"))
    served = sorted({f for layer in plain.layers.values() for f, part in layer.parts.items()
                     if computes_rows(part.plan)})
    assert served
    listed = {f: [str(v) for v in list(dict.fromkeys(raw[f].tolist()))[::2]] + [UNSEEN] for f in served}
    hot = tmp_path / "hot.json"
    hot.write_text(json.dumps(listed))
    assert main(["export", "--run", result.output_dir, "--out", str(tmp_path / "mat"), "--materialize", str(hot)]) == 0
    bundle = Bundle.open(tmp_path / "mat")
    entries = [part["materialized"] for layer in bundle.manifest["layers"] for part in layer["parts"]
               if part["materialized"]]
    assert entries and bundle.manifest["bytes"]["materialized"] > 0
    assert all(f.startswith("materialized/") for f in bundle.manifest["files"] if "materialized" in f)

    expected = {name: {f: plain.lookup(f, raw[f], layer=name) for f in per_feature}
                for name, per_feature in outs.items()}
    computed: dict[str, list[np.ndarray]] = {}
    real = bundle_module.plan_lookup

    def spy(plan: Any, tables: Any, dense: Any, feature: str, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        computed.setdefault(feature, []).append(np.asarray(values).copy())
        return real(plan, tables, dense, feature, values, lengths)

    monkeypatch.setattr(bundle_module, "plan_lookup", spy)
    trained, vs_computed = {}, {}
    for name, per_feature in outs.items():
        got = {f: bundle.lookup(f, raw[f], layer=name) for f in per_feature}
        trained[name] = max_diff(got, per_feature)
        vs_computed[name] = max_diff(got, expected[name])
    for f in served:
        listed_ids = bundle.ids(f, listed[f])[0]
        seen = np.concatenate(computed[f])
        assert not np.isin(seen, listed_ids).any(), f  # listed ids were gathered, not computed
        assert seen.size > 0, f  # and the values not listed were computed
    probs = bundle.score_prepared(table)
    score_diff = float(np.abs(probs - torch.sigmoid(torch.from_numpy(logits)).numpy()).max())
    rows = sum(n for e in entries for n in e["features"].values())
    print(f"[materialize] {kind}: {rows} rows of {len(served)} features precomputed; lookup max|diff| vs trained "
          f"{trained}, vs computed bundle {vs_computed}; score max|diff| {score_diff:.2e}")
    assert max(trained.values()) <= 1e-6 and max(vs_computed.values()) <= 1e-6 and score_diff <= 1e-6
    stored = tmp_path / "mat" / entries[0]["file"]  # checksummed like every other file
    stored.write_bytes(stored.read_bytes()[:-1])
    with pytest.raises(DataError, match=entries[0]["file"]):
        Bundle.open(tmp_path / "mat")

    with pytest.raises(ConfigError, match="not computed by a TT or DHE layer"):
        export_bundle(runs("hashed").output_dir, tmp_path / "x", materialize={"C1": ["a"]})
    with pytest.raises(ConfigError, match="unknown|not exported"):
        export_bundle(result.output_dir, tmp_path / "x", materialize={"C99": ["a"]})
    hot.write_text('{"C1": "not a list"}')
    with pytest.raises(ConfigError, match="should list its raw values"):
        export_bundle(result.output_dir, tmp_path / "x", materialize=hot)
    assert not (tmp_path / "x").exists()


def test_bundle_bytes_are_the_achieved_bytes(runs: Runs, tmp_path: Path) -> None:
    """fp32: the embedding arrays in the bundle are the run's achieved bytes (within 5%), vocabularies apart."""
    for kind in ("full", "hashed", "hybrid", "tt", "pruned"):
        result = runs(kind)
        path = export_bundle(result.output_dir, tmp_path / kind)
        sizes = json.loads((path / MANIFEST).read_text())["bytes"]
        payload = sizes["tables_payload"] + sizes["plans_payload"] + sizes["layers_payload"]
        files = sizes["tables"] + sizes["plans"] + sizes["layers"]
        print(f"[bytes] {kind} fp32: arrays {payload:,} (files {files:,}, with safetensors headers) vs achieved "
              f"{result.embedding_bytes:,} (ratio {payload / result.embedding_bytes:.4f}); vocab {sizes['vocab']:,}")
        assert sizes["achieved"] == result.embedding_bytes
        assert abs(payload - result.embedding_bytes) <= 0.05 * result.embedding_bytes


# ----------------------------------------------------------------------------- MLflow


def test_export_is_recorded_in_the_source_mlflow_run(runs: Runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A real sqlite store: the run found by its id, or by the checkpoint folder it is tagged with, gets the
    manifest and its sha256 under export/<dtype>/ and a recemb.bundle.<dtype> tag; a failing store warns."""
    from mlflow import MlflowClient

    from recemb.export import record as export_record
    from recemb.export.record import TAG_BUNDLE_PREFIX
    from recemb.tracking import TAG_CHECKPOINT_DIR, Tracker

    result = runs("hashed")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    tracker = Tracker(uri, rank=0)
    run_id = tracker.start(from_dict(ExperimentConfig, json.loads(
        (resolve_checkpoint(result.output_dir) / "meta.json").read_text())["config"]))
    tracker.set_tags({TAG_CHECKPOINT_DIR: str(Path(result.output_dir).resolve() / "checkpoints")})
    tracker.end("FINISHED")
    client = MlflowClient(uri)

    def artifact(dtype: str, name: str) -> bytes:
        return Path(client.download_artifacts(run_id, f"export/{dtype}/{name}", str(tmp_path / "dl"))).read_bytes()

    by_id = export_bundle(run_id, tmp_path / "fp32", mlflow_uri=uri)  # the run id names the checkpoint
    by_folder = export_bundle(result.output_dir, tmp_path / "int8", dtype="int8", mlflow_uri=uri)  # found by its tag
    tags = client.get_run(run_id).data.tags
    for bundle, dtype in ((by_id, "fp32"), (by_folder, "int8")):
        assert json.loads((bundle / MANIFEST).read_text())["source"]["run_id"] == run_id
        assert artifact(dtype, MANIFEST) == (bundle / MANIFEST).read_bytes()
        assert artifact(dtype, "manifest.json.sha256") == (bundle / "manifest.json.sha256").read_bytes()
        assert tags[f"{TAG_BUNDLE_PREFIX}{dtype}"] == str(bundle.resolve())
    assert "[mlflow] warning" not in capsys.readouterr().err

    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("connection refused\n(second line)")

    monkeypatch.setattr(Tracker, "log_artifact", unreachable)
    bundle = Bundle.open(export_bundle(result.output_dir, tmp_path / "fp16", dtype="fp16", mlflow_uri=uri))
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[mlflow] warning")]
    assert len(warning) == 1 and "not recorded in MLflow run" in warning[0] and "connection refused" in warning[0]
    assert bundle.dtype == "fp16" and f"{TAG_BUNDLE_PREFIX}fp16" not in client.get_run(run_id).data.tags
    # A store that is not there is never created: the export names no run and records nothing.
    missing = tmp_path / "nowhere" / "mlflow.db"
    assert export_record.find_source_run(f"sqlite:///{missing}", resolve_checkpoint(result.output_dir)) is None
    export_bundle(result.output_dir, tmp_path / "plain", mlflow_uri=f"sqlite:///{missing}")
    assert not missing.exists()


# ----------------------------------------------------------------------------- quantised


def _stored_bound(table: StoredTable) -> np.ndarray:
    """Per row, the stated bound of the piece that stores it (column pieces: the larger)."""
    bound = np.zeros(table.shape[0], np.float32)
    for p in table.pieces:
        r0, r1 = p.rows
        piece = row_bound(p.arrays, table.dtype, p.cols[1] - p.cols[0])
        bound[r0:r1] = np.maximum(bound[r0:r1], piece)
    return bound


def test_quantized_bundles_stay_within_the_stated_bound_and_auc(runs: Runs, tmp_path: Path) -> None:
    result = runs("full")
    fp32 = Bundle.open(export_bundle(result.output_dir, tmp_path / "fp32"))
    _, _, table, cfg = reference(resolve_checkpoint(result.output_dir))
    labels = torch.from_numpy(table.column("label").to_numpy().astype(np.float32))
    logits32 = fp32.logits_of(fp32.encode_prepared(table))
    auc32 = compute_metrics(torch.from_numpy(logits32), labels)["auc"]
    for dtype in ("fp16", "int8", "int4"):
        bundle = Bundle.open(export_bundle(result.output_dir, tmp_path / dtype, dtype=dtype))
        worst = 0.0
        for name, stored in bundle.tables.items():
            assert isinstance(stored, StoredTable) and stored.dtype == dtype
            exact = fp32.tables[name]
            bound = _stored_bound(stored)
            err = np.abs(stored.dequantized() - exact).max(axis=1)
            assert (err <= bound).all(), (dtype, name, float((err - bound).max()))
            worst = max(worst, float((err / np.maximum(bound, 1e-30)).max()))
        # Lookups of single ids are the rows: each within its row's bound.
        ids = table.column("C3").to_numpy()
        q, e = bundle.lookup_ids("C3", ids), fp32.lookup_ids("C3", ids)
        assert (np.abs(q - e).max(axis=1) <= _stored_bound(bundle.tables["t_C3"])[ids]).all()
        logits = bundle.logits_of(bundle.encode_prepared(table))
        auc = compute_metrics(torch.from_numpy(logits), labels)["auc"]
        sizes = bundle.manifest["bytes"]
        print(f"[quant] {dtype}: max err/bound {worst:.4f}; test AUC {auc:.5f} vs fp32 {auc32:.5f} "
              f"(diff {auc - auc32:+.5f}); table arrays {sizes['tables_payload']:,} bytes (files {sizes['tables']:,}) "
              f"vs achieved fp32 {sizes['achieved']:,}")
        assert abs(auc - auc32) <= 0.001
        expected = {"fp16": 2, "int8": 1, "int4": 0.5}[dtype]
        rows_dims = [(t["rows"], t["dim"]) for t in bundle.manifest["tables"].values()]
        scale_bias = 0 if dtype == "fp16" else 4
        assert sizes["tables_payload"] == sum(r * (math.ceil(d * expected) + scale_bias) for r, d in rows_dims)


# ----------------------------------------------------------------------------- two ranks, shard by shard


def export_worker(rank: int, world_size: int, cfg_data: dict[str, Any], checkpoint: str, out: str) -> dict[str, Any]:
    """Shard a DeepFM row-wise over the ranks, checkpoint it, and export each rank's own pieces."""
    torch.set_num_threads(1)
    from recemb.embeddings.sharding import shard_model
    from recemb.models.registry import build_model
    from recemb.train.checkpoint import TrainState, save_checkpoint
    from recemb.train.loop import TrainModel, dense_optimizer

    cfg = from_dict(ExperimentConfig, cfg_data)
    fm = FeatureMap.load(cfg.data_dir)
    torch.manual_seed(0)
    model = TrainModel(build_model(cfg.model, fm, cfg.embedding, device=torch.device("meta")))
    dmp = shard_model(model, cfg.embedding, torch.device("cpu")).model
    state = TrainState(model=dmp, dense_optimizer=dense_optimizer(dmp, cfg.train),
                       fused_optimizer=dmp.fused_optimizer)
    save_checkpoint(checkpoint, state, step=0, epoch=0, config=cfg.to_dict())
    if rank == 0:
        export_writer.prepare_staging(out)
    dist.barrier()
    mine = export_writer.export_rank_pieces(checkpoint, rank, out)
    dist.barrier()
    if rank == 0:
        export_writer.finish_bundle(checkpoint, out)
    dist.barrier()
    return {"largest_piece": mine.largest_piece, "pieces": mine.pieces}


@pytest.mark.usefixtures("no_process_group")
def test_two_ranks_export_their_own_row_wise_pieces(prepared_ctr: Path, tmp_path: Path) -> None:
    cfg = experiment_config("deepfm", prepared_ctr, tmp_path / "runs", ["embedding.sharding=row_wise"])
    checkpoint, out = tmp_path / "ckpt", tmp_path / "bundle"
    results = run_ranks(export_worker, 2, cfg.to_dict(), str(checkpoint), str(out))
    bundle = Bundle.open(out)
    tables = bundle.manifest["tables"]
    split = {name: t for name, t in tables.items() if len(t["pieces"]) > 1}
    assert split, "row-wise sharding should split tables over both ranks"
    for rank, got in enumerate(results):
        assert got["pieces"], f"rank {rank} wrote no pieces"
        for piece in got["pieces"]:
            t = tables[piece["table"]]
            if piece["table"] in split:  # a rank held only its own rows of a table sharded over ranks
                assert piece["rows"][1] - piece["rows"][0] < t["rows"]
        biggest = max(t["rows"] * t["dim"] for t in split.values())
        largest_split = max(t["rows"] * t["dim"] for t in tables.values())
        print(f"[two ranks] rank {rank}: largest table piece held {got['largest_piece']} values; largest table "
              f"{largest_split} values; {len(got['pieces'])} pieces")
        assert got["largest_piece"] < biggest
    for t in split.values():
        assert [p["rows"][0] for p in t["pieces"]] == sorted(p["rows"][0] for p in t["pieces"])
        assert t["pieces"][0]["rows"][0] == 0 and t["pieces"][-1]["rows"][1] == t["rows"]
    outs, logits, table, _ = reference(checkpoint)
    for name, per_feature in outs.items():
        got = {f: bundle.lookup_ids(f, table.column(f).to_numpy(), layer=name) for f in per_feature}
        assert max_diff(got, per_feature) == 0.0
    probs = bundle.score_prepared(table)
    assert float(np.abs(probs - torch.sigmoid(torch.from_numpy(logits)).numpy()).max()) <= 1e-6


# ----------------------------------------------------------------------------- atomic, features, errors


class Killed(BaseException):
    """Stands for a stop the export cannot handle (BaseException, like KeyboardInterrupt)."""


def test_a_failed_export_leaves_no_bundle(runs: Runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = runs("hashed")
    out = tmp_path / "bundle"
    calls = {"n": 0}
    real = export_writer.quantize_rows

    def failing(rows: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
        calls["n"] += 1
        if calls["n"] > 3:
            raise Killed  # as if the process were stopped mid-export
        return real(rows, dtype)

    monkeypatch.setattr(export_writer, "quantize_rows", failing)
    with pytest.raises(Killed):
        export_bundle(result.output_dir, out)
    assert not out.exists() and not export_writer.staging_dir(out).exists()
    with pytest.raises(DataError, match="no such bundle folder"):
        Bundle.open(out)
    # A SIGKILLed export leaves its staging folder, which is not a bundle; the next export replaces it.
    monkeypatch.setattr(export_writer, "quantize_rows", real)
    export_writer.prepare_staging(out)
    export_writer.export_rank_pieces(resolve_checkpoint(result.output_dir), 0, out)
    assert not out.exists()
    Bundle.open(export_bundle(result.output_dir, out))
    assert not export_writer.staging_dir(out).exists()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_bundle(result.output_dir, out)


def test_features_exports_only_their_tables(runs: Runs, tmp_path: Path) -> None:
    result = runs("hashed")
    bundle = Bundle.open(export_bundle(result.output_dir, tmp_path / "b", features=["C2", "C1"]))
    assert bundle.features == ["C1", "C2"]
    assert sorted(bundle.manifest["tables"]) == ["h_C1", "h_C2", "lin_h_C1", "lin_h_C2"]
    assert sorted(p.name for p in (tmp_path / "b" / "data" / "vocab").iterdir()) == ["C1.parquet", "C2.parquet"]
    assert bundle.lookup("C1", ["a", None]).shape == (2, 8)
    with pytest.raises(DataError, match="'C3' was not exported|not in the bundle"):
        bundle.lookup("C3", ["a"])
    with pytest.raises(DataError, match="scoring needs every feature"):
        bundle.score([{"C1": "a"}])
    with pytest.raises(ConfigError, match="unknown feature 'C99'"):
        export_bundle(result.output_dir, tmp_path / "c", features=["C99"])


def test_cli_exports_and_scores_raw_logs_like_the_prepared_split(runs: Runs, prepared_ctr: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    result = runs("hashed")
    capsys.readouterr()  # the training's lines, when this test is the first to ask for the run
    out = tmp_path / "bundle"
    assert main(["export", "--run", result.output_dir, "--out", str(out), "--dtype", "int8"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["dtype"] == "int8"
    assert main(["export", "--run", result.output_dir, "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2

    raw_file = prepared_ctr.parent / "ctr.tsv"
    assert main(["score", "--bundle", str(out), "--data", str(raw_file), "--out", str(tmp_path / "raw.parquet")]) == 0
    printed = capsys.readouterr().out
    assert "[unknown] C1=" in printed
    assert main(["score", "--bundle", str(out), "--data", str(prepared_ctr / "test"),
                 "--out", str(tmp_path / "prep.parquet")]) == 0
    raw, prep = pq.read_table(tmp_path / "raw.parquet"), pq.read_table(tmp_path / "prep.parquet")
    assert raw.num_rows == 20_000 and prep.column_names == ["shard", "row", "label", "logit", "prob"]
    # The raw rows that preparation put in the test split score as the prepared split does: the same ids,
    # rows and labels; a probability may differ in its last bit, since the dense layers' GEMM runs other
    # kernels on a batch's last rows when the batch sizes differ (20,000 raw rows vs a 2,005-row split).
    split = FeatureMap.load(prepared_ctr)
    lines = raw.column("line").to_numpy()
    test_rows = row_uniform(0, lines, seed=0) >= 0.8 + 0.1  # as preprocess assigns splits (train 0.8, valid 0.1)
    assert int(test_rows.sum()) == split.rows["test"] == prep.num_rows
    np.testing.assert_allclose(raw.column("prob").to_numpy()[test_rows], prep.column("prob").to_numpy(),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(raw.column("label").to_numpy()[test_rows], prep.column("label").to_numpy())
    assert main(["score", "--bundle", str(tmp_path / "nope"), "--data", str(raw_file),
                 "--out", str(tmp_path / "x.parquet")]) == 2


@pytest.mark.parametrize("model", ["dcnv2", "dlrm", "deepfm"])
def test_other_models_score_like_evaluate(model: str, prepared_ctr: Path, tmp_path: Path) -> None:
    """DCNv2 (no first-order layer), DLRM (a non-persistent buffer rebuilt by reset_parameters) and
    DeepFM as configured by default (first_order: embedding, field vectors instead of lin_ tables)."""
    cfg = experiment_config(model, prepared_ctr, tmp_path / "runs", ["embedding.kind=hashed", "embedding.budget=0.1",
                                                                     *RUN])
    with in_process_run():
        result = train(cfg)
    bundle = Bundle.open(export_bundle(result.output_dir, tmp_path / "bundle"))
    _, logits, table, _ = reference(resolve_checkpoint(result.output_dir))
    diff = float(np.abs(bundle.score_prepared(table) - torch.sigmoid(torch.from_numpy(logits)).numpy()).max())
    print(f"[parity] {model} hashed: score max|diff| {diff:.2e}")
    assert diff <= 1e-6
