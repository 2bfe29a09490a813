"""``Bundle``: an export bundle opened for serving, with numpy and pyarrow only.

``Bundle.open`` checks the bundle before it reads anything: ``manifest.json`` against
``manifest.json.sha256``, the format version, that no path in the manifest leaves the
folder, and the size and sha256 of every file the manifest lists; each failure is a
one-line ``DataError`` naming the file. Then it loads the plans, tables (kept as stored:
fp16/int8/int4 rows are dequantised as they are gathered), vocabularies and rules.

Serving takes raw values, the strings and numbers of the logs: ``lookup`` maps them to ids
with the bundle's own vocabulary or hash rule (the same code preparation used), unknown
values take the feature's OOV id and are counted (``unknown_counts``), and the ids go
through ``recemb.serving.lookup.lookup``, the numpy runtime of the variant's plan.
``score`` adds the dense model (``recemb.serving.score``, torch imported only then).
A bundle is immutable once open; lookups and scores may run from many threads.

Example:
    >>> bundle = Bundle.open("bundles/deepfm")                       # doctest: +SKIP
    >>> bundle.lookup("C1", ["68fd1e64", "unseen"]).shape            # doctest: +SKIP
    (2, 16)
    >>> bundle.score([{"I1": "3", "C1": "68fd1e64"}])                # doctest: +SKIP
    array([0.231], dtype=float32)
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from safetensors import SafetensorError
from safetensors.numpy import load_file

from recemb.data.hashing import hash_buckets
from recemb.data.preprocess import VocabIndex, as_string, load_vocab, multi_tokens, parse_float
from recemb.data.schema import FeatureInfo, FeatureMap, path_under
from recemb.embeddings.plan import VariantPlan
from recemb.errors import DataError
from recemb.export.format import (
    BUNDLE_FORMAT,
    DTYPES,
    FEATURE_MAP_FILE,
    MANIFEST,
    MANIFEST_DIGEST,
    dequantize_rows,
)
from recemb.integrity import FileDigest, read_signed, verify_files
from recemb.serving.lookup import lookup as plan_lookup
from recemb.serving.lookup import segment_sum

_DAMAGED = "export the bundle again or restore it from a good copy"
Rows = Sequence[Mapping[str, Any]] | pa.Table | pa.RecordBatch


# ----------------------------------------------------------------------------- tables


@dataclass
class TablePiece:
    """One stored piece of a table: its row and column range and its arrays."""

    rows: tuple[int, int]
    cols: tuple[int, int]
    arrays: dict[str, np.ndarray]


class StoredTable:
    """A physical table as the bundle stores it: ``table[ids]`` gives fp32 rows ``[len(ids), dim]``.

    Rows are dequantised as they are gathered (int8/int4/fp16 stay compact in memory),
    from whichever pieces (row or column shards) hold them. ``recemb.serving.lookup``
    reads it like an array (``shape``, integer-array indexing).
    """

    def __init__(self, name: str, rows: int, dim: int, dtype: str, pieces: list[TablePiece]) -> None:
        self.name = name
        self.shape = (rows, dim)
        self.dtype = dtype
        self.pieces = pieces

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        if len(self.pieces) == 1:  # the whole table in one piece (unsharded): no routing by range
            (r0, r1), (c0, c1) = self.pieces[0].rows, self.pieces[0].cols
            if (r0, r1, c0, c1) == (0, self.shape[0], 0, self.shape[1]):
                return dequantize_rows(self.pieces[0].arrays, self.dtype, c1, index)
        out = np.zeros((len(index), self.shape[1]), np.float32)
        for p in self.pieces:
            (r0, r1), (c0, c1) = p.rows, p.cols
            mine = (index >= r0) & (index < r1)
            if mine.all() and (c0, c1) == (0, self.shape[1]):
                return dequantize_rows(p.arrays, self.dtype, c1 - c0, index - r0)
            if mine.any():
                out[mine, c0:c1] = dequantize_rows(p.arrays, self.dtype, c1 - c0, index[mine] - r0)
        return out

    def dequantized(self) -> np.ndarray:
        """The whole table as fp32 ``[rows, dim]`` (for checks; serving gathers rows instead)."""
        return self[np.arange(self.shape[0])]


# ----------------------------------------------------------------------------- layers


@dataclass
class PartRuntime:
    """One planned layer: its plan, physical tables and other tensors (as ``lookup`` takes them), and
    for TT/DHE the rows the export precomputed (``--materialize``: feature -> (sorted ids, rows))."""

    plan: VariantPlan
    tables: dict[str, Any]
    dense: dict[str, np.ndarray]
    name: str = ""
    materialized: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def lookup(self, feature: str, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """``[B, dim]`` pooled vectors of ``feature``'s ids: precomputed rows where the export listed
        them, the plan's numpy runtime for the rest (each distinct id once, summed per row as TT/DHE do)."""
        known = self.materialized.get(feature)
        if known is None:
            return plan_lookup(self.plan, self.tables, self.dense, feature, values, lengths)
        ids, rows = known
        unique, inverse = np.unique(values, return_inverse=True)
        at = np.minimum(np.searchsorted(ids, unique), len(ids) - 1)
        hit = ids[at] == unique
        per_id = np.empty((len(unique), rows.shape[1]), np.float32)
        per_id[hit] = rows[at[hit]]
        if not hit.all():
            missed = unique[~hit]
            per_id[~hit] = plan_lookup(self.plan, self.tables, self.dense, feature, missed,
                                       np.ones(len(missed), np.int64))
        return segment_sum(per_id[inverse.reshape(-1)], lengths)


@dataclass
class LayerRuntime:
    """A top-level embedding layer of the model: its parts and per-feature projections."""

    name: str
    features: list[str]
    dims: dict[str, int]
    parts: dict[str, PartRuntime]  # feature -> the part that serves it
    projections: dict[str, np.ndarray] = field(default_factory=dict)

    def lookup_ids(self, feature: str, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        part = self.parts.get(feature)
        if part is None:
            raise DataError(f"layer '{self.name}': feature '{feature}' was not exported "
                            f"(exported: {', '.join(self.parts)})")
        out = part.lookup(feature, values, lengths)
        proj = self.projections.get(feature)
        return out if proj is None else (out @ proj.T).astype(np.float32, copy=False)


@dataclass
class Encoded:
    """Rows as the model takes them: ids per sparse feature ``(values, lengths)`` and dense ``[B, D]``."""

    n: int
    ids: dict[str, tuple[np.ndarray, np.ndarray]]
    dense: np.ndarray


# ----------------------------------------------------------------------------- opening


def _read_manifest(folder: Path) -> dict[str, Any]:
    path, digest = folder / MANIFEST, folder / MANIFEST_DIGEST
    if not folder.is_dir():
        raise DataError(f"{folder}: no such bundle folder")
    if not path.is_file():
        raise DataError(f"{path}: missing; {folder} is not an export bundle (or an unfinished export)")
    raw, _ = read_signed(path, digest, _DAMAGED)
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); {_DAMAGED}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: should be a JSON object; {_DAMAGED}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise DataError(f"{path}: field 'format_version' should be a positive integer, got {version!r}; {_DAMAGED}")
    if version > BUNDLE_FORMAT:
        raise DataError(f"{path}: bundle format {version} is newer than this recemb reads ({BUNDLE_FORMAT}); "
                        "upgrade recemb")
    for name, kind in (("files", dict), ("layers", list), ("tables", dict), ("rules", dict), ("features", list)):
        if not isinstance(manifest.get(name), kind):
            raise DataError(f"{path}: field '{name}' should be a {kind.__name__}; {_DAMAGED}")
    if manifest.get("dtype") not in DTYPES:
        raise DataError(f"{path}: field 'dtype' should be one of {', '.join(DTYPES)}; {_DAMAGED}")
    return manifest


def _referenced(manifest: dict[str, Any]) -> list[str]:
    """Every file path the manifest names outside ``files``."""
    out = [manifest.get("feature_map", {}).get("file", FEATURE_MAP_FILE), manifest.get("model", {}).get("dense_file")]
    out.append(manifest.get("dataset_config"))
    for table in manifest["tables"].values():
        out.extend(p.get("file") for p in table.get("pieces", []))
    for layer in manifest["layers"]:
        out.append(layer.get("dense_file"))
        out.extend(part.get("arrays_file") for part in layer.get("parts", []))
        out.extend((part.get("materialized") or {}).get("file") for part in layer.get("parts", []))
    out.extend(rule.get("vocab_file") for rule in manifest["rules"].values())
    return [p for p in out if p is not None]


def _check_files(folder: Path, manifest: dict[str, Any]) -> dict[str, FileDigest]:
    """Every listed and referenced path stays inside ``folder``; every referenced one is listed."""
    where = folder / MANIFEST
    digests = {}
    for rel, data in manifest["files"].items():
        _inside(folder, rel, where)
        digests[rel] = FileDigest.from_dict(data, where=f"{where}: field 'files.{rel}'")
    for rel in _referenced(manifest):
        if not isinstance(rel, str):
            raise DataError(f"{where}: a file path should be a string, got {rel!r}; {_DAMAGED}")
        _inside(folder, rel, where)
        if rel not in digests:
            raise DataError(f"{where}: names file '{rel}' that its 'files' list (sizes and sha256) lacks; {_DAMAGED}")
    return digests


def _inside(folder: Path, rel: str, where: Path) -> Path:
    try:
        return path_under(folder, rel, DataError)
    except DataError:
        raise DataError(f"{where}: file path '{rel}' leads outside the bundle folder {folder}; refusing to read "
                        f"it; {_DAMAGED}") from None


def _load(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]}); {_DAMAGED}") from None


# ----------------------------------------------------------------------------- raw values


def _column(values: Any) -> pa.Array:
    """Raw values (a list, numpy array or pyarrow array) as one pyarrow array."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    if isinstance(values, pa.Array):
        return values
    values = list(values)
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        return pa.array([v if v is None or isinstance(v, (str, list)) else str(v) for v in values])


def _prepared_ids(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """``(values, lengths)`` of a prepared int64 or list<int64> column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        offsets = column.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
        values = column.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        return values.to_numpy(zero_copy_only=False).astype(np.int64), np.diff(offsets)
    return column.to_numpy(zero_copy_only=False).astype(np.int64), np.ones(len(column), np.int64)


class Bundle:
    """An export bundle, checked and loaded (see the module docstring). Build with ``Bundle.open``."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder = folder
        self.manifest = manifest
        self.dtype: str = manifest["dtype"]
        self.feature_map = FeatureMap.load(folder / manifest.get("feature_map", {}).get("file", FEATURE_MAP_FILE))
        self.features: list[str] = list(manifest["features"])
        self.rules: dict[str, dict[str, Any]] = manifest["rules"]
        self.tables = {name: self._table(name, entry) for name, entry in manifest["tables"].items()}
        self.layers = {entry["name"]: self._layer(entry) for entry in manifest["layers"]}
        self._vocab = {info.name: self._vocab_index(info) for info in self.feature_map.features
                       if info.vocab_file and info.name in self.rules}
        self._lock = threading.Lock()
        self._scorer: Any = None
        counted = [f for f, rule in self.rules.items() if rule["kind"] in ("vocab", "hash")]
        # Per id feature: values seen, values not in the vocabulary (OOV id), missing values (empty).
        self.unknown_counts: dict[str, int] = dict.fromkeys(counted, 0)
        self.missing_counts: dict[str, int] = dict.fromkeys(counted, 0)
        self.value_counts: dict[str, int] = dict.fromkeys(counted, 0)

    @classmethod
    def open(cls, folder: str | Path) -> Bundle:
        """Check ``folder`` (manifest digest, format version, paths, every file's size and sha256), then load it."""
        folder = Path(folder)
        manifest = _read_manifest(folder)
        verify_files(folder, _check_files(folder, manifest), hint=_DAMAGED)
        return cls(folder, manifest)

    # -- loading

    def _table(self, name: str, entry: dict[str, Any]) -> Any:
        pieces = [TablePiece(tuple(p["rows"]), tuple(p["cols"]), _load(self.folder / p["file"]))
                  for p in entry["pieces"]]
        rows, dim = int(entry["rows"]), int(entry["dim"])
        if self.dtype == "fp32" and len(pieces) == 1:
            return pieces[0].arrays["weight"]  # a plain array: gathers need no dequantising
        return StoredTable(name, rows, dim, self.dtype, pieces)

    def _layer(self, entry: dict[str, Any]) -> LayerRuntime:
        dense = _load(self.folder / entry["dense_file"]) if entry.get("dense_file") else {}
        parts: dict[str, PartRuntime] = {}
        for part in entry["parts"]:
            arrays = _load(self.folder / part["arrays_file"]) if part.get("arrays_file") else {}
            try:
                plan = VariantPlan.from_dict(part["plan"], arrays)
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{self.folder / MANIFEST}: the plan of layer '{entry['name']}' part "
                                f"'{part['name']}' does not load ({e}); {_DAMAGED}") from None
            prefix = part["prefix"]
            tables = {t: self.tables[t] for t in part["tables"]}
            table_keys = set(part["tables"].values())
            mine = {k[len(prefix):]: v for k, v in dense.items() if k.startswith(prefix) and k not in table_keys}
            runtime = PartRuntime(plan, tables, mine, part["name"], self._materialized(part))
            for f in plan.features:
                if f in self.features:
                    parts[f] = runtime
        projections = {f: dense[key] for f, key in entry.get("projections", {}).items()}
        return LayerRuntime(entry["name"], list(entry["features"]), dict(entry["dims"]), parts, projections)

    def _materialized(self, part: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """A part's precomputed rows (``recemb.export.materialize``): feature -> (sorted ids, rows)."""
        entry = part.get("materialized")
        if not entry:
            return {}
        arrays = _load(self.folder / entry["file"])
        out = {}
        for f in entry["features"]:
            ids, rows = arrays.get(f"ids/{f}"), arrays.get(f"rows/{f}")
            if ids is None or rows is None or rows.shape[0] != ids.shape[0] or ids.size == 0:
                raise DataError(f"{self.folder / entry['file']}: rows of '{f}' missing or not one per id; {_DAMAGED}")
            out[f] = (ids.astype(np.int64, copy=False), rows.astype(np.float32, copy=False))
        return out

    def _vocab_index(self, info: FeatureInfo) -> VocabIndex:
        table = load_vocab(self.folder / self.rules[info.name]["vocab_file"]).sort_by("id")
        ids = table.column("id").to_numpy()
        if not np.array_equal(ids, np.arange(1, len(ids) + 1)):
            raise DataError(f"{self.folder / self.rules[info.name]['vocab_file']}: ids should run 1..{len(ids)}; "
                            f"{_DAMAGED}")
        return VocabIndex(table.column("value"))

    # -- ids

    def _count(self, feature: str, values: int, unknown: int, missing: int) -> None:
        with self._lock:
            self.value_counts[feature] += values
            self.unknown_counts[feature] += unknown
            self.missing_counts[feature] += missing

    def ids(self, feature: str, raw_values: Iterable[Any] | pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """Ids ``(values, lengths)`` of ``feature``'s raw values (one per row; a list or a
        separator-joined string per row for multi-hot), by the rule preparation used."""
        info = self._info(feature)
        col = _column(raw_values)
        rule = self.rules[feature]
        n = len(col)
        if info.kind == "multihot":
            flat, offsets = multi_tokens(col, info)
            ids = self._token_ids(feature, rule, flat)
            self._count(feature, len(flat), int((ids == rule["oov_id"]).sum()) if rule["kind"] == "vocab" else 0,
                        int((np.diff(offsets) == 0).sum()))
            return ids, np.diff(offsets).astype(np.int64)
        if info.kind == "dense":  # bucketised
            x = self._dense_values(info, col)
            ids = np.searchsorted(np.asarray(info.boundaries, np.float64), x, side="right") + 1
            ids[np.isnan(x)] = 0
            return ids.astype(np.int64), np.ones(n, np.int64)
        strings = as_string(col)
        ids = self._token_ids(feature, rule, strings)
        missing = np.asarray(strings.is_null()) if strings.null_count else np.zeros(n, bool)
        unknown = int(((ids == rule["oov_id"]) & ~missing).sum()) if rule["kind"] == "vocab" else 0
        self._count(feature, n, unknown, int(missing.sum()))
        return ids, np.ones(n, np.int64)

    def _token_ids(self, feature: str, rule: dict[str, Any], strings: pa.Array) -> np.ndarray:
        if rule["kind"] == "hash":
            return hash_buckets(as_string(strings), int(rule["seed"]), int(rule["buckets"]))
        return self._vocab[feature].lookup(strings)

    def _info(self, feature: str) -> FeatureInfo:
        if feature not in self.rules:
            raise DataError(f"feature '{feature}' is not in the bundle {self.folder} "
                            f"(features: {', '.join(self.rules)})")
        return self.feature_map.feature(feature)

    def _dense_values(self, info: FeatureInfo, col: pa.Array) -> np.ndarray:
        """Raw numbers of a dense feature after fill, log and clip (float64), as preparation computes them."""
        x, bad = parse_float(col)
        present = ~np.asarray(pc.is_null(col).to_numpy(zero_copy_only=False), bool)
        bad_rows = set(bad.tolist()) | set(np.flatnonzero(present & np.isnan(x)).tolist())
        if info.clip is None:
            bad_rows |= set(np.flatnonzero(present & np.isinf(x)).tolist())
        if bad_rows:
            row = min(bad_rows)
            raise DataError(f"feature '{info.name}' (column '{info.source}'): row {row} holds "
                            f"{col[row].as_py()!r}, not a finite number; preparation rejects such rows")
        x = np.where(np.isnan(x), info.fill, x)
        if info.log:
            x = np.log1p(np.maximum(x, 0.0))
        if info.clip is not None:
            x = np.where(np.isposinf(x), info.clip[1], np.where(np.isneginf(x), info.clip[0], x))
        return x

    def encode(self, rows: Rows) -> Encoded:
        """Raw rows (dicts keyed by the log's column names, or a pyarrow table of them) as model inputs."""
        table = rows if isinstance(rows, (pa.Table, pa.RecordBatch)) else None
        n = table.num_rows if table is not None else len(rows)  # type: ignore[arg-type]

        def column(info: FeatureInfo) -> pa.Array:
            if table is not None:
                if info.source not in table.column_names:
                    return pa.nulls(n)
                return _column(table.column(info.source))
            return _column([row.get(info.source) for row in rows])  # type: ignore[union-attr]

        ids = {f: self.ids(f, column(self.feature_map.feature(f))) for f in self.feature_map.sparse_features
               if f in self.rules}
        dense = np.zeros((n, len(self.feature_map.dense_features)), np.float32)
        for j, name in enumerate(self.feature_map.dense_features):
            info = self.feature_map.feature(name)
            x = self._dense_values(info, column(info))
            with np.errstate(over="ignore", invalid="ignore"):
                dense[:, j] = ((x - info.mean) / info.std).astype(np.float32)
        return Encoded(n, ids, dense)

    def encode_prepared(self, table: pa.Table | pa.RecordBatch) -> Encoded:
        """Prepared rows (the Parquet columns ``recemb prepare`` wrote) as model inputs."""
        fm = self.feature_map
        missing = [c for c in fm.dense_features + fm.sparse_features if c not in table.column_names]
        if missing:
            raise DataError(f"prepared rows lack column '{missing[0]}' of the bundle's feature map")
        ids = {f: _prepared_ids(table.column(f)) for f in fm.sparse_features if f in self.rules}
        if fm.dense_features:
            dense = np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in fm.dense_features], axis=1)
        else:
            dense = np.zeros((table.num_rows, 0))
        return Encoded(table.num_rows, ids, np.ascontiguousarray(dense, dtype=np.float32))

    # -- lookups and scores

    def layer(self, name: str | None = None) -> LayerRuntime:
        """Layer ``name`` (default: the main ``embedding`` layer, else the first)."""
        if name is None:
            name = "embedding" if "embedding" in self.layers else next(iter(self.layers))
        if name not in self.layers:
            raise DataError(f"the bundle has no layer '{name}' (layers: {', '.join(self.layers)})")
        return self.layers[name]

    def lookup(self, feature: str, raw_values: Iterable[Any] | pa.Array, layer: str | None = None) -> np.ndarray:
        """``[B, dim]`` embeddings of ``feature``'s raw values (unknown values: the OOV row, counted)."""
        values, lengths = self.ids(feature, raw_values)
        return self.layer(layer).lookup_ids(feature, values, lengths)

    def lookup_ids(self, feature: str, values: np.ndarray, lengths: np.ndarray | None = None,
                   layer: str | None = None) -> np.ndarray:
        """``[B, dim]`` embeddings of prepared ids (one per row unless ``lengths`` says otherwise)."""
        values = np.asarray(values, dtype=np.int64)
        lengths = np.ones(len(values), np.int64) if lengths is None else np.asarray(lengths, dtype=np.int64)
        return self.layer(layer).lookup_ids(feature, values, lengths)

    def embed(self, encoded: Encoded) -> dict[str, dict[str, np.ndarray]]:
        """Every layer's vectors per feature for ``encoded`` rows."""
        return {name: {f: layer.lookup_ids(f, *encoded.ids[f]) for f in layer.features}
                for name, layer in self.layers.items()}

    def scorer(self) -> Any:
        """The dense model (``recemb.serving.score.DenseScorer``), built on first use (imports torch)."""
        with self._lock:
            if self._scorer is None:
                if not self.manifest.get("complete", False):
                    raise DataError(f"{self.folder}: exported with --features {' '.join(self.features)}; "
                                    "scoring needs every feature: export without --features")
                from recemb.serving.score import DenseScorer

                config = self.manifest["model"]["config"]
                dense = _load(self.folder / self.manifest["model"]["dense_file"])
                self._scorer = DenseScorer(config["model"], config["embedding"], self.feature_map, dense)
            return self._scorer

    def logits_of(self, encoded: Encoded) -> np.ndarray:
        """Logits ``[B]`` of encoded rows."""
        return self.scorer().logits(self.embed(encoded), encoded.dense)

    def explain_of(self, encoded: Encoded) -> dict[str, np.ndarray]:
        """The model's per-row explanation columns (APE: ``top_pair_a``/``top_pair_b`` feature
        indices and ``top_pair_term``); empty for models without one."""
        return self.scorer().explain(self.embed(encoded), encoded.dense)

    def score(self, rows: Rows) -> np.ndarray:
        """Click probabilities ``[B]`` (float32) of raw rows (dicts or a pyarrow table of the log's columns)."""
        return self.scorer().probabilities(self.logits_of(self.encode(rows)))

    def score_prepared(self, table: pa.Table | pa.RecordBatch) -> np.ndarray:
        """Probabilities of prepared rows (a split's Parquet columns)."""
        return self.scorer().probabilities(self.logits_of(self.encode_prepared(table)))

    def unknown_share(self) -> dict[str, float]:
        """Per feature: the share of values seen so far that were not in the vocabulary."""
        with self._lock:
            return {f: self.unknown_counts[f] / self.value_counts[f] if self.value_counts[f] else 0.0
                    for f in self.value_counts}

    def embedding_bytes(self) -> int:
        """Bytes of the embedding files on disk (tables, plan arrays, layers' other tensors)."""
        b = self.manifest.get("bytes", {})
        return int(b.get("tables", 0) + b.get("plans", 0) + b.get("layers", 0))


__all__ = ["Bundle", "Encoded", "LayerRuntime", "PartRuntime", "StoredTable"]
