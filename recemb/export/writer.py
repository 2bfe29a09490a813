"""Write an export bundle from a checkpoint, shard by shard (layout: ``recemb.export.format``).

The model is rebuilt on the meta device from the checkpoint's config (no weights are
allocated) only to describe its embedding layers: each planned layer's ``VariantPlan``,
which state keys are physical tables, projections. Then every checkpoint piece is read on
its own (``safe_open``, one tensor at a time): a table piece is cast or quantised and
written as its own file, so no table that the checkpoint holds in shards is ever put
together; the other (dense, small) tensors are collected. ``export_rank_pieces`` does this
for one rank's file (a multi-rank job runs it on every rank), ``finish_bundle`` (one
process) writes plans, dense weights, the data contract, the manifest with every file's
size and sha256, and renames the staging folder into place: a killed export leaves only
``.<out>.partial``, which is not a bundle.

Example:
    >>> export_bundle("runs/deepfm_synthetic_ctr", "bundles/deepfm", dtype="int8")  # doctest: +SKIP
    PosixPath('bundles/deepfm')
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file as save_numpy

import recemb
from recemb.config.experiment import ExperimentConfig
from recemb.config.loader import from_dict, to_dict
from recemb.data.schema import FeatureInfo, FeatureMap, path_under
from recemb.embeddings.base import EmbeddingLayer, GroupedEmbeddingLayer, ProjectedLayer
from recemb.embeddings.plan import VariantPlan
from recemb.errors import ConfigError, DataError, OutputExistsError
from recemb.export.format import (
    BOUND_TEXT,
    BUNDLE_FORMAT,
    DATASET_CONFIG_FILE,
    DENSE_FILE,
    FEATURE_MAP_FILE,
    MANIFEST,
    MANIFEST_DIGEST,
    check_dtype,
    quantize_rows,
    table_file,
)
from recemb.export.materialize import (
    check_materialize,
    computed_features,
    load_materialize,
    write_materialized,
)
from recemb.export.record import find_source_run, record_export
from recemb.integrity import FileDigest, file_sha256, write_sidecar
from recemb.io import replace_folder, write_json_atomic
from recemb.models.registry import build_model, embedding_layers
from recemb.serving.lookup import stored_arrays
from recemb.serving.transforms import apply_transform
from recemb.train.checkpoint import read_meta, verify_checkpoint
from recemb.train.restore import locate_checkpoint

_SEP = "@"
_STAGING = ".staging"  # inside the staging folder: per-rank records, removed by finish_bundle
_MODEL = "model/"
_WRAPPER = "model."


# ----------------------------------------------------------------------------- describing the model


@dataclass
class PartSpec:
    """One planned layer inside a top-level layer: its plan, state-key prefix and table keys."""

    name: str
    prefix: str
    plan: VariantPlan
    tables: dict[str, str]  # physical table -> state key relative to the top-level layer


@dataclass
class LayerSpec:
    """A top-level embedding layer of the model (``embedding``, ``linear``)."""

    name: str
    features: list[str]
    dims: dict[str, int]
    parts: list[PartSpec] = field(default_factory=list)
    projections: dict[str, str] = field(default_factory=dict)  # feature -> relative key of its proj weight
    achieved_bytes: int = 0
    full_bytes: int = 0


@dataclass
class ModelSpec:
    """What the export needs to know about a checkpoint's model, built without weights."""

    cfg: ExperimentConfig
    feature_map: FeatureMap
    data_dir: Path
    layers: list[LayerSpec]
    state_shapes: dict[str, list[int]]

    def table_of(self) -> dict[str, tuple[LayerSpec, PartSpec, str]]:
        """Model state key -> (layer, part, physical table) of every physical table."""
        return {f"{layer.name}.{rel}": (layer, part, table)
                for layer in self.layers for part in layer.parts for table, rel in part.tables.items()}

    def layer_of(self, key: str) -> LayerSpec | None:
        """The top-level layer a model state key belongs to (None: the dense model)."""
        return next((layer for layer in self.layers if key.startswith(layer.name + ".")), None)


def _walk(layer: EmbeddingLayer, prefix: str, spec: LayerSpec, name: str) -> None:
    if isinstance(layer, ProjectedLayer):
        if prefix:
            raise DataError(f"layer '{spec.name}': a projection inside a group cannot be exported")
        spec.projections = {f: f"proj.{f}.weight" for f in layer.proj}
        _walk(layer.inner, "inner.", spec, name)
    elif isinstance(layer, GroupedEmbeddingLayer):
        for sub_name, sub in layer.layers.items():
            _walk(sub, f"{prefix}layers.{sub_name}.", spec, sub_name)
    elif layer.plan is not None:
        plan = layer.plan
        # Candidates; describe_model keeps those the model holds as torchrec tables (a module variant
        # such as pruned may keep its tables in an EmbeddingBagCollection too, others in their own tensors).
        tables = {t.name: f"{prefix}ebc.embedding_bags.{t.name}.weight" for t in plan.tables}
        spec.parts.append(PartSpec(name=name, prefix=prefix, plan=plan, tables=tables))
    else:
        raise DataError(f"layer '{spec.name}' holds a {type(layer).__name__} without a plan: its variant is not "
                        "converted to plans yet, so it cannot be exported")


def describe_model(meta: dict[str, Any], where: Path) -> ModelSpec:
    """Rebuild the checkpoint's model on the meta device and describe its embedding layers."""
    try:
        cfg = from_dict(ExperimentConfig, meta["config"], where=f"{where}/meta.json config")
    except ConfigError as e:
        raise DataError(str(e)) from None
    if not cfg.data_dir:
        raise DataError(f"{where}/meta.json: config has no data_dir; cannot find the feature map")
    data_dir = Path(cfg.data_dir).expanduser().resolve()
    fm = FeatureMap.load(data_dir / "feature_map.json")
    model = build_model(cfg.model, fm, cfg.embedding, device=torch.device("meta"))
    layers = []
    for name, layer in embedding_layers(model).items():
        spec = LayerSpec(name=name, features=list(layer.features), dims=dict(layer.dims),
                         achieved_bytes=layer.parameter_bytes(), full_bytes=layer.full_bytes())
        _walk(layer, "", spec, "")
        layers.append(spec)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    for layer in layers:
        for part in layer.parts:
            missing = [t for t, rel in part.tables.items() if f"{layer.name}.{rel}" not in shapes]
            if missing and part.plan.capabilities.storage == "tables":
                raise DataError(f"table '{missing[0]}' of layer '{layer.name}' is not in the model's state (bug?)")
            part.tables = {t: rel for t, rel in part.tables.items() if t not in missing}
    return ModelSpec(cfg, fm, data_dir, layers, shapes)


def physical_keys(plan: VariantPlan, feature: str) -> set[str]:
    """The physical keys ``plan``'s transform reads for ``feature`` (from its numpy twin)."""
    return {p.key for p in apply_transform(plan, feature, np.zeros(1, np.int64), np.ones(1, np.int64))}


def selected_tables(spec: ModelSpec, features: list[str] | None) -> set[str]:
    """Physical tables that ``features`` read (all with ``None``)."""
    tables = {t for layer in spec.layers for part in layer.parts for t in part.tables}
    if features is None:
        return tables
    out: set[str] = set()
    for layer in spec.layers:
        for part in layer.parts:
            chosen = [f for f in part.plan.features if f in features]
            if not chosen or not part.tables:
                continue
            keys = set().union(*(physical_keys(part.plan, f) for f in chosen))
            out |= {t.name for t in part.plan.tables if t.name in part.tables and set(t.keys) & keys}
    return out


def _check_features(spec: ModelSpec, features: list[str] | None) -> list[str]:
    known = [f for layer in spec.layers for f in layer.features]
    known = list(dict.fromkeys(known))
    if features is None:
        return known
    unknown = [f for f in features if f not in known]
    if unknown or not features:
        raise ConfigError(f"--features: unknown feature '{unknown[0] if unknown else ''}' "
                          f"(the model's sparse features: {', '.join(known)})")
    return [f for f in known if f in features]


# ----------------------------------------------------------------------------- per rank


@dataclass
class RankPieces:
    """What one rank wrote: its table pieces, and the largest table piece it held in memory (elements).

    The export reads one piece at a time, so ``largest_piece`` is what bounds its memory for
    tables; a table sharded over ranks is never held whole.
    """

    rank: int
    pieces: list[dict[str, Any]]
    largest_piece: int
    dtype: str


def staging_dir(out: str | Path) -> Path:
    """The folder an export of ``out`` writes into before it is renamed to ``out``."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def prepare_staging(out: str | Path) -> Path:
    """A fresh, empty staging folder for ``out`` (a killed export's leftovers removed); rank 0 calls it."""
    tmp = staging_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / _STAGING).mkdir(parents=True)
    (tmp / "tables").mkdir()
    return tmp


def _model_key(name: str) -> str | None:
    """The model state key of a checkpoint tensor key (None: optimizer state, RNG)."""
    if not name.startswith(_MODEL):
        return None
    key = name[len(_MODEL):]
    return key[len(_WRAPPER):] if key.startswith(_WRAPPER) else key


def export_rank_pieces(checkpoint: str | Path, rank: int, out: str | Path, dtype: str = "fp32",
                       features: list[str] | None = None) -> RankPieces:
    """Write rank ``rank``'s table pieces of ``checkpoint`` into the staging folder of ``out``.

    Reads only ``rank-<rank>.safetensors`` (its size and sha256 checked first), one tensor
    at a time: each table piece is cast/quantised to ``dtype`` and written to
    ``tables/<table>.<row>_<col>.safetensors``; the rank's other model tensors go to a
    staging file for ``finish_bundle``. The staging folder must exist (``prepare_staging``).
    """
    check_dtype(dtype)
    path = Path(checkpoint)
    meta = read_meta(path)
    name = f"rank-{rank}.safetensors"
    if meta["format_version"] >= 2:
        from recemb.integrity import verify_files

        verify_files(path, {name: FileDigest.from_dict(meta["files"][name], where=f"{path}/meta.json files")},
                     hint="restore the checkpoint from a good copy")
    spec = describe_model(meta, path)
    tables = spec.table_of()
    wanted = selected_tables(spec, _check_features(spec, features))
    tmp = staging_dir(out)
    if not (tmp / _STAGING).is_dir():
        raise DataError(f"{tmp}: staging folder missing (rank 0 creates it with prepare_staging first)")
    pieces: list[dict[str, Any]] = []
    dense: dict[str, np.ndarray] = {}
    largest = 0  # elements of the largest table piece held at once
    try:
        with safe_open(str(path / name), framework="pt") as fh:
            shapes = json.loads((fh.metadata() or {}).get("shapes", "{}"))
            for tensor_name in fh.keys():
                key, _, offs = tensor_name.rpartition(_SEP)
                model_key = _model_key(key)
                if model_key is None:
                    continue
                offsets = [int(o) for o in offs.split(",")] if offs and shapes.get(key) else []
                if model_key in tables:
                    layer, part, table = tables[model_key]
                    if table not in wanted:
                        continue
                    piece = fh.get_tensor(tensor_name)  # this piece only, never the whole table
                    largest = max(largest, piece.numel())
                    row, col = offsets
                    rel = table_file(table, row, col)
                    arrays = quantize_rows(piece.float().numpy(), dtype)
                    save_numpy(arrays, str(tmp / rel))
                    pieces.append({"table": table, "file": rel, "rows": [row, row + piece.shape[0]],
                                   "cols": [col, col + piece.shape[1]], "shape": shapes[key],
                                   "payload": sum(a.nbytes for a in arrays.values())})
                    del piece, arrays
                else:
                    dense[tensor_name] = fh.get_tensor(tensor_name).numpy()  # not a table: small
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path / name}: not a readable checkpoint file ({str(e).splitlines()[0]})") from None
    save_numpy({k: np.ascontiguousarray(v) for k, v in dense.items()},
               str(tmp / _STAGING / f"dense-{rank}.safetensors"),
               metadata={"shapes": json.dumps({k: v for k, v in shapes.items() if _model_key(k)})})
    result = RankPieces(rank=rank, pieces=pieces, largest_piece=largest, dtype=dtype)
    write_json_atomic(tmp / _STAGING / f"rank-{rank}.json", result.__dict__)
    return result


# ----------------------------------------------------------------------------- finishing


def _dense_tensors(tmp: Path, world: int) -> dict[str, np.ndarray]:
    """Full model tensors (not tables) put together from every rank's staging file (they are small)."""
    full: dict[str, np.ndarray] = {}
    for r in range(world):
        with safe_open(str(tmp / _STAGING / f"dense-{r}.safetensors"), framework="numpy") as fh:
            shapes = json.loads((fh.metadata() or {}).get("shapes", "{}"))
            for name in fh.keys():
                key, _, offs = name.rpartition(_SEP)
                model_key = _model_key(key)
                assert model_key is not None
                value = fh.get_tensor(name)
                shape = shapes[key]
                if not shape:
                    full[model_key] = value
                    continue
                offsets = [int(o) for o in offs.split(",")]
                if list(value.shape) == shape:
                    full[model_key] = value
                    continue
                target = full.setdefault(model_key, np.zeros(shape, dtype=value.dtype))
                target[tuple(slice(o, o + s) for o, s in zip(offsets, value.shape, strict=True))] = value
    return full


def _table_entries(spec: ModelSpec, records: list[RankPieces], wanted: set[str], dtype: str) -> dict[str, Any]:
    """The manifest's ``tables``: each table's rows, dim, dtype and pieces, checked to tile it exactly."""
    by_table: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        for piece in rec.pieces:
            by_table.setdefault(piece["table"], []).append(piece)
    out: dict[str, Any] = {}
    for layer in spec.layers:
        for part in layer.parts:
            for t in part.plan.tables:
                if t.name not in wanted:
                    continue
                pieces = sorted(by_table.get(t.name, []), key=lambda p: (p["rows"][0], p["cols"][0]))
                area = sum((p["rows"][1] - p["rows"][0]) * (p["cols"][1] - p["cols"][0]) for p in pieces)
                if area != t.rows * t.dim or any(p["shape"] != [t.rows, t.dim] for p in pieces):
                    raise DataError(f"table '{t.name}': the checkpoint's pieces cover {area:,} of its "
                                    f"{t.rows * t.dim:,} values (checkpoint incomplete or of another model?)")
                out[t.name] = {"layer": layer.name, "part": part.name, "rows": t.rows, "dim": t.dim, "dtype": dtype,
                               "pieces": [{k: p[k] for k in ("file", "rows", "cols")} for p in pieces]}
    return out


def _stored_part(part: PartSpec, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``tensors`` (a layer's, relative keys) with ``part``'s own replaced by their stored form
    (``recemb.serving.lookup.stored_arrays``: e.g. DPQ's codes without its query table)."""
    own = {k[len(part.prefix):]: v for k, v in tensors.items() if k.startswith(part.prefix)}
    stored = stored_arrays(part.plan, own) if own else own
    if stored is own:
        return tensors
    rest = {k: v for k, v in tensors.items() if not k.startswith(part.prefix)}
    return {**rest, **{part.prefix + k: v for k, v in stored.items()}}


def _feature_rule(info: FeatureInfo) -> dict[str, Any]:
    """How serving turns a raw value of ``info`` into ids (and what unknown or missing values get)."""
    if info.kind == "dense" and info.boundaries is None:
        return {"kind": "dense", "fill": info.fill, "log": info.log, "mean": info.mean, "std": info.std,
                "clip": info.clip}
    if info.boundaries is not None:
        return {"kind": "bucketize", "fill": info.fill, "log": info.log, "clip": info.clip, "missing_id": 0,
                "boundaries": len(info.boundaries)}
    if info.hash_buckets:
        return {"kind": "hash", "buckets": info.hash_buckets, "seed": info.hash_seed, "missing_id": 0,
                "unknown": "hashed like any value"}
    return {"kind": "vocab", "vocab_file": f"data/{info.vocab_file}", "oov_id": info.oov_id,
            "missing_id": info.oov_id, "unknown": f"id {info.oov_id} (its trained row is the default vector)"}


def _source_run_id(checkpoint: Path, run_id: str | None) -> str | None:
    if run_id:
        return run_id
    result = checkpoint.parent.parent / "result.json"
    if result.is_file():
        try:
            return json.loads(result.read_text(encoding="utf-8")).get("run_id") or None
        except json.JSONDecodeError:
            return None
    return None


def _replace(tmp: Path, out: Path, overwrite: bool) -> None:
    replace_folder(tmp, out, overwrite, f"{out}: exists; pass --overwrite to replace it, or another --out")


def finish_bundle(checkpoint: str | Path, out: str | Path, dtype: str = "fp32", features: list[str] | None = None,
                  run_id: str | None = None, overwrite: bool = False,
                  materialize: dict[str, list[Any]] | None = None) -> Path:
    """Complete the bundle every rank's ``export_rank_pieces`` staged for ``out``; one process calls it.

    Writes plan arrays, each layer's other tensors, the dense model, the feature map,
    vocabularies and dataset config, then ``manifest.json`` (every file's size and sha256)
    and ``manifest.json.sha256``, and renames the staging folder to ``out``. ``materialize``
    (``{feature: [raw values]}``, see ``recemb.export.materialize``) adds precomputed rows
    of those values for TT and DHE layers.
    """
    path, out = Path(checkpoint), Path(out)
    tmp = staging_dir(out)
    meta = read_meta(path)
    spec = describe_model(meta, path)
    chosen = _check_features(spec, features)
    if materialize:
        check_materialize(computed_features(spec), chosen, materialize)
    wanted = selected_tables(spec, chosen)
    world = meta["world_size"]
    records = []
    for r in range(world):
        rec_path = tmp / _STAGING / f"rank-{r}.json"
        if not rec_path.is_file():
            raise DataError(f"{rec_path}: missing: rank {r} of {world} did not export its pieces")
        records.append(RankPieces(**json.loads(rec_path.read_text(encoding="utf-8"))))
    if {r.dtype for r in records} != {dtype}:
        raise DataError(f"ranks exported {sorted({r.dtype for r in records})}, finishing as {dtype}")
    tables = _table_entries(spec, records, wanted, dtype)
    dense = _dense_tensors(tmp, world)
    shutil.rmtree(tmp / _STAGING)

    table_keys = set(spec.table_of())
    model_dense = {k: v for k, v in dense.items() if spec.layer_of(k) is None}
    save_numpy(model_dense, str(tmp / DENSE_FILE))
    payload = {"plans": 0, "layers": 0}  # tensor bytes, without the safetensors headers
    layers_json = []
    for layer in spec.layers:
        mine = {k[len(layer.name) + 1:]: v for k, v in dense.items()
                if spec.layer_of(k) is layer and k not in table_keys}
        for part in layer.parts:
            mine = _stored_part(part, mine)
        layer_file = None
        if mine:
            layer_file = f"layers/{layer.name}.safetensors"
            (tmp / "layers").mkdir(exist_ok=True)
            save_numpy(mine, str(tmp / layer_file))
            payload["layers"] += sum(v.nbytes for v in mine.values())
        parts = []
        for part in layer.parts:
            arrays_file = None
            if part.plan.arrays:
                arrays_file = f"plans/{layer.name}.{part.name or 'main'}.safetensors"
                (tmp / "plans").mkdir(exist_ok=True)
                save_numpy({k: np.ascontiguousarray(v) for k, v in part.plan.arrays.items()}, str(tmp / arrays_file))
                payload["plans"] += sum(v.nbytes for v in part.plan.arrays.values())
            parts.append({"name": part.name, "prefix": part.prefix, "plan": part.plan.to_dict(),
                          "arrays_file": arrays_file, "tables": {t: rel for t, rel in part.tables.items() if t in wanted},
                          "materialized": None})
        layers_json.append({"name": layer.name, "features": layer.features, "dims": layer.dims, "parts": parts,
                            "projections": layer.projections, "dense_file": layer_file,
                            "achieved_bytes": layer.achieved_bytes, "full_bytes": layer.full_bytes})

    data = tmp / "data"
    (data / "vocab").mkdir(parents=True)
    fm_path = spec.data_dir / "feature_map.json"
    shutil.copyfile(fm_path, tmp / FEATURE_MAP_FILE)
    rules = {}
    for info in spec.feature_map.features:
        if info.is_categorical and info.name not in chosen:
            continue
        rules[info.name] = {"kind": info.kind, "source": info.source, **_feature_rule(info)}
        if info.vocab_file:
            shutil.copyfile(path_under(spec.data_dir, info.vocab_file, DataError), tmp / "data" / info.vocab_file)
    config_yaml = spec.data_dir / "dataset_config.yaml"
    if config_yaml.is_file():
        shutil.copyfile(config_yaml, tmp / DATASET_CONFIG_FILE)

    files = _digests(tmp)

    def size_of(prefix: str) -> int:
        return sum(d["size"] for f, d in files.items() if f.startswith(prefix))

    manifest = {
        "format_version": BUNDLE_FORMAT,
        "recemb_version": recemb.__version__,
        "source": {"checkpoint": str(path.resolve()), "run_id": _source_run_id(path, run_id),
                   "expid": spec.cfg.expid, "step": meta["step"], "world_size": world},
        "feature_map": {"file": FEATURE_MAP_FILE, "sha256": file_sha256(fm_path)},
        "dataset_config": DATASET_CONFIG_FILE if config_yaml.is_file() else None,
        "features": chosen,
        "complete": features is None,
        "rules": rules,
        "dtype": dtype,
        "quantization": {"dtype": dtype, "scheme": "row-wise, fp16 scale and bias per row" if dtype.startswith("int")
                         else "cast", "bound": BOUND_TEXT[dtype],
                         "applies_to": "physical tables; module variants and dense weights stay fp32"},
        "layers": layers_json,
        "tables": tables,
        "model": {"config": {"model": to_dict(spec.cfg.model), "embedding": to_dict(spec.cfg.embedding)},
                  "dense_file": DENSE_FILE},
        "bytes": {"tables": size_of("tables/"),
                  "tables_payload": sum(p["payload"] for r in records for p in r.pieces if p["table"] in tables),
                  "plans": size_of("plans/"), "layers": size_of("layers/"),
                  "plans_payload": payload["plans"], "layers_payload": payload["layers"],
                  "vocab": size_of("data/vocab/"), "dense_model": size_of(DENSE_FILE), "materialized": 0,
                  "achieved": sum(layer.achieved_bytes for layer in spec.layers),
                  "full": sum(layer.full_bytes for layer in spec.layers)},
        "files": files,
    }
    _write_manifest(tmp, manifest)
    if materialize:  # computed by the runtime from the staged bundle, then listed like every other file
        entries = write_materialized(tmp, materialize)
        for layer_entry in manifest["layers"]:
            for part_entry in layer_entry["parts"]:
                part_entry["materialized"] = entries.get((layer_entry["name"], part_entry["name"]))
        files = manifest["files"] = _digests(tmp)
        manifest["bytes"]["materialized"] = size_of("materialized/")
        _write_manifest(tmp, manifest)
    _replace(tmp, out, overwrite)
    return out


def _digests(folder: Path) -> dict[str, Any]:
    """Size and sha256 of every file in ``folder`` but the manifest and its digest."""
    return {p.relative_to(folder).as_posix(): FileDigest.of(p).to_dict() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (MANIFEST, MANIFEST_DIGEST)}


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    write_json_atomic(folder / MANIFEST, manifest)
    write_sidecar(folder / MANIFEST, folder / MANIFEST_DIGEST)


def export_bundle(checkpoint: str | Path, out: str | Path, dtype: str = "fp32", features: list[str] | None = None,
                  mlflow_uri: str | None = None, overwrite: bool = False,
                  materialize: dict[str, list[Any]] | str | Path | None = None, record: bool = True) -> Path:
    """Export ``checkpoint`` (a checkpoint folder, run folder or MLflow run id) to the bundle folder ``out``.

    In one process: every rank file of the checkpoint in turn (``export_rank_pieces``),
    then ``finish_bundle``. ``dtype`` stores the physical tables as fp32, fp16, or
    row-wise int8/int4; ``features`` exports only the tables those features read (such a
    bundle looks up but cannot score); ``materialize`` (a JSON file or its ``{feature: [raw
    values]}``) precomputes those values' rows for TT and DHE layers. With ``record``, an
    export whose source MLflow run is known (run id given, in the run's ``result.json``, or
    the run tagged with this checkpoint folder) logs its manifest to that run
    (``recemb.export.record``; a store that cannot be written is a warning). Returns ``out``.
    """
    check_dtype(dtype)
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: exists; pass --overwrite to replace it, or another --out")
    listed = materialize if isinstance(materialize, dict) or materialize is None else load_materialize(materialize)
    ref = locate_checkpoint(checkpoint, mlflow_uri)
    meta = verify_checkpoint(ref.path)  # every rank file's size and sha256, before anything is read
    if listed:  # refused before any table is written
        spec = describe_model(meta, ref.path)
        check_materialize(computed_features(spec), _check_features(spec, features), listed)
    uri = ref.mlflow_uri or mlflow_uri or meta["config"].get("cluster", {}).get("mlflow_uri") or None
    run_id = ref.run_id or _source_run_id(ref.path, None)
    if run_id is None and record:
        run_id = find_source_run(uri, ref.path)
    tmp = prepare_staging(out)
    try:
        for rank in range(meta["world_size"]):
            export_rank_pieces(ref.path, rank, out, dtype, features)
        path = finish_bundle(ref.path, out, dtype, features, run_id=run_id, overwrite=overwrite,
                             materialize=listed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if record and run_id:
        record_export(path, run_id, uri, dtype)
    return path


__all__ = ["LayerSpec", "ModelSpec", "PartSpec", "RankPieces", "describe_model", "export_bundle",
           "export_rank_pieces", "finish_bundle", "prepare_staging", "selected_tables", "staging_dir"]
