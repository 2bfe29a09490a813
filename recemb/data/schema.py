"""Feature specs, dataset configs and the ``feature_map.json`` contract.

``DatasetConfig`` (from a dataset YAML) says how to read and transform raw files;
``FeatureMap`` (written by ``recemb prepare``) says what the prepared Parquet holds.
Training reads only the feature map, never the raw-data config.

Example:
    >>> spec = FeatureSpec(name="C1", kind="sparse", min_count=5)
    >>> spec.source
    'C1'
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from recemb.config.loader import from_dict, read_yaml, to_dict
from recemb.errors import ConfigError, DataError, RecembError
from recemb.io import write_text_atomic

# 2: FeatureInfo.clip (dense clip bounds); version 1 maps read as before.
FEATURE_MAP_VERSION = 2
FeatureKind = Literal["dense", "sparse", "multihot"]
SourceFormat = Literal["criteo", "avazu", "csv", "parquet", "events", "libfm", "libffm"]
NonFinite = Literal["reject", "clip"]

# Names that become file or folder names (features -> vocab/<name>.parquet, dataset_id -> data/<id>):
# no separator, NUL or leading dot, so no name can climb out of its folder or hide itself.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be used as a file name, or ``None`` when it can.

    Example:
        >>> name_problem("C1") is None, name_problem("../x") is not None
        (True, True)
    """
    if _SAFE_NAME.fullmatch(name):
        return None
    return (f"'{name}' is not a safe file name: use 1-128 letters, digits, '_', '-' or '.', "
            "not starting with '.'")


def path_under(folder: str | Path, relative: str, error: type[RecembError] = ConfigError) -> Path:
    """``folder / relative``, refusing (``error``) a path that resolves outside ``folder``.

    For any user-given name or feature-map path joined under a folder: ``..``, an absolute
    path, a NUL byte or a symlink that leads out are refused before anything is opened.

    Example:
        >>> path_under("/data/out", "vocab/C1.parquet").name
        'C1.parquet'
        >>> path_under("/data/out", "../etc/passwd")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        recemb.errors.ConfigError: ...
    """
    root = Path(folder).resolve()
    if "\0" in relative or Path(relative).is_absolute():
        raise error(f"'{relative}' must be a relative path inside {folder}")
    path = (root / relative).resolve()
    if path == root or root not in path.parents:
        raise error(f"'{relative}' leads outside {folder}; it must name a file inside it")
    return path


@dataclass
class FeatureSpec:
    """How one input column becomes one model feature.

    Sparse and multi-hot features get a vocabulary (values seen fewer than
    ``min_count`` times in the training split share the OOV id 0) or, with
    ``hash_buckets > 0``, a seeded hash into that many buckets. Dense features are
    filled, optionally log-transformed (``log(1 + max(x, 0))``) and standardised,
    or with ``bucketize > 0`` turned into a categorical of that many quantile bins.

    ``nonfinite`` says what a dense value of ``inf``, ``-inf`` or ``nan`` becomes (an empty
    field is missing and gets ``fill``): ``reject`` (default) quarantines the row like any bad
    value; ``clip`` turns ``+inf`` into the largest and ``-inf`` into the smallest finite
    value of the training split (after fill/log, so with ``log`` ``-inf`` is already 0), and the
    statistics count the clipped values at those bounds; ``nan`` has no side to clip to and is
    still rejected. The bounds are recorded as ``FeatureInfo.clip``.

    ``name`` becomes a file name (``vocab/<name>.parquet``), so it is limited to letters,
    digits, ``_``, ``-`` and ``.``, not first; ``column`` may be any input column.
    """

    name: str
    kind: FeatureKind
    column: str | None = None
    min_count: int = 1
    hash_buckets: int = 0
    separator: str = "|"
    max_len: int = 0
    fill: float = 0.0
    log: bool = False
    standardize: bool = False
    bucketize: int = 0
    group: str | None = None
    nonfinite: NonFinite = "reject"

    def __post_init__(self) -> None:
        problem = name_problem(self.name)
        if problem:
            raise ValueError(f"feature name {problem} (it names the file vocab/<name>.parquet)")
        if self.min_count < 1:
            raise ValueError(f"feature '{self.name}': min_count must be >= 1")
        if self.hash_buckets < 0 or self.bucketize < 0 or self.max_len < 0:
            raise ValueError(f"feature '{self.name}': hash_buckets, bucketize, max_len must be >= 0")
        if self.kind == "dense" and self.hash_buckets:
            raise ValueError(f"feature '{self.name}': hash_buckets applies to sparse features only")
        if self.kind != "dense" and self.nonfinite != "reject":
            raise ValueError(f"feature '{self.name}': nonfinite applies to dense features only")

    @property
    def source(self) -> str:
        """Input column this feature is read from."""
        return self.column or self.name

    @property
    def is_categorical(self) -> bool:
        """True when the prepared feature is ids (sparse, multi-hot, or bucketised dense)."""
        return self.kind != "dense" or self.bucketize > 0


@dataclass
class SplitSpec:
    """How rows become train/validation/test: by ratio (seeded per row), by a time column,
    by a split column, or by whole files.

    - ratios (default): ``train``/``valid``/``test`` sum to 1; each row's seeded uniform decides.
    - ``time_column``: the earliest ``train`` share of rows by time is train, then ``valid``, then test.
    - ``column``: the data names each row's split (values ``train``; ``valid``, ``validation``,
      ``val`` or ``dev``; ``test``; any case), or ``values`` maps each split to the column's
      values that mean it (``{train: ["0", "1"], test: ["2"]}``); rows with another value are
      rejected with it.
    - ``files``: given split files, ``{train: [...], valid: [...], test: [...]}`` (files or
      globs; ``train`` required). Without ``valid`` files, a ``valid`` share of the train
      files' rows (seeded per row; 0 = none) is held out for validation; the ``train`` and
      ``test`` ratios do not apply. The dataset's ``paths`` stay empty.

    Example:
        >>> SplitSpec(files={"train": ["tr.csv"], "test": ["te.csv"]}, valid=0.05).files["test"]
        ['te.csv']
    """

    train: float = 0.8
    valid: float = 0.1
    test: float = 0.1
    time_column: str | None = None
    column: str | None = None
    values: dict[str, list[str | int]] | None = None
    files: dict[str, list[str]] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        rules = [name for name, v in (("time_column", self.time_column), ("column", self.column),
                                      ("files", self.files)) if v]
        if len(rules) > 1:
            raise ValueError(f"split takes one rule, got {' and '.join(rules)}")
        parts = (self.train, self.valid, self.test)
        if self.values is not None:
            if self.column is None:
                raise ValueError("split.values maps values of split.column; set split.column too")
            unknown = sorted(set(self.values) - set(SPLIT_NAMES))
            if unknown:
                raise ValueError(f"split.values has '{unknown[0]}'; splits are {', '.join(SPLIT_NAMES)}")
            seen = [str(v) for vs in self.values.values() for v in vs]
            twice = sorted({v for v in seen if seen.count(v) > 1})
            if twice:
                raise ValueError(f"split.values lists '{twice[0]}' under two splits")
        if self.files is not None:
            unknown = sorted(set(self.files) - set(SPLIT_NAMES))
            if unknown:
                raise ValueError(f"split.files has '{unknown[0]}'; splits are {', '.join(SPLIT_NAMES)}")
            if not self.files.get("train"):
                raise ValueError("split.files needs at least one train file")
            if not 0.0 <= self.valid < 1.0:
                raise ValueError(f"with split.files, valid is the share of train-file rows held out and must be "
                                 f"in [0, 1), got {self.valid}")
        elif self.column is None and (min(parts) < 0 or abs(sum(parts) - 1.0) > 1e-6):
            raise ValueError(f"split ratios must be >= 0 and sum to 1, got {parts}")


# The split names in code order (0 train, 1 valid, 2 test) and the values a split column may hold.
SPLIT_NAMES = ("train", "valid", "test")
SPLIT_VALUES = {"train": 0, "valid": 1, "validation": 1, "val": 1, "dev": 1, "test": 2}


@dataclass
class DatasetConfig:
    """A raw dataset: where its files are, how to parse them, which features to make.

    ``paths`` are files or glob patterns, relative to the current directory.
    ``column_names`` names the columns of a CSV without header (Criteo's are fixed).
    For ``events``, ``count_column`` holds how many times each row occurred: a finite
    positive integer, else the row is rejected. Files ending in gzip, bz2 or zstd data
    are decompressed while read. ``block_bytes`` is the read block; it grows (up to 256 MiB,
    or itself if larger) when a row is longer. ``dataset_id`` names the default output
    folder ``data/<dataset_id>``, so it follows the same rule as feature names.
    """

    dataset_id: str
    format: SourceFormat
    features: list[FeatureSpec]
    paths: list[str] = field(default_factory=list)
    label: str | None = "label"
    delimiter: str = ","
    header: bool = True
    column_names: list[str] | None = None
    count_column: str | None = None
    index_fields: dict[str, list[int]] | None = None
    split: SplitSpec = field(default_factory=SplitSpec)
    output: str = ""
    shard_rows: int = 262_144
    block_bytes: int = 16 << 20
    max_reject_fraction: float = 0.01

    def __post_init__(self) -> None:
        problem = name_problem(self.dataset_id)
        if problem:
            raise ValueError(f"dataset_id {problem} (it names the output folder data/<dataset_id>)")
        if self.column_names:
            seen = [c for c in self.column_names if self.column_names.count(c) > 1]
            if seen:
                raise ValueError(f"column_names lists '{seen[0]}' twice; every column needs its own name")
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate feature name '{dupes[0]}'")
        if not self.features:
            raise ValueError("a dataset needs at least one feature")
        if self.shard_rows < 1 or self.block_bytes < 1024:
            raise ValueError("shard_rows must be >= 1 and block_bytes >= 1024")
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise ValueError("max_reject_fraction must be in [0, 1]")
        if self.index_fields is not None:
            if self.format != "libfm":
                raise ValueError("index_fields assigns libFM indices to fields; it needs format: libfm")
            spans = sorted((r[0], r[1], name) for name, r in self.index_fields.items() if len(r) == 2)
            if len(spans) != len(self.index_fields) or any(a > b for a, b, _ in spans):
                raise ValueError("index_fields maps each field to [first, last] indices (first <= last)")
            for (_, end, left), (start, _, right) in zip(spans, spans[1:], strict=False):
                if start <= end:
                    raise ValueError(f"index_fields: the ranges of '{left}' and '{right}' overlap")
        if self.split.files is not None and self.paths:
            raise ValueError("list the input files either in paths or under split.files, not both")
        if self.split.files is None and not self.paths:
            raise ValueError("a dataset needs input files: paths, or split.files for given splits")
        if not self.output:
            self.output = f"data/{self.dataset_id}"


def _expand_features(raw: list[Any], where: str) -> list[Any]:
    """Expand entries with ``names: [a, b, ...]`` into one entry per name."""
    out: list[Any] = []
    for i, item in enumerate(raw):
        if isinstance(item, dict) and "names" in item:
            if "name" in item:
                raise ConfigError(f"{where}: features[{i}] has both 'name' and 'names'")
            names = item["names"]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ConfigError(f"{where}: features[{i}].names expects a list of str")
            rest = {k: v for k, v in item.items() if k != "names"}
            out.extend({"name": n, **rest} for n in names)
        else:
            out.append(item)
    return out


def dataset_from_dict(data: dict[str, Any], where: str = "<dataset>") -> DatasetConfig:
    """Build a ``DatasetConfig`` from plain data (``names:`` lists expanded)."""
    data = dict(data)
    if isinstance(data.get("features"), list):
        data["features"] = _expand_features(data["features"], where)
    return from_dict(DatasetConfig, data, where=where)


def load_dataset_config(path: str | Path, overrides: dict[str, Any] | None = None) -> DatasetConfig:
    """Read a dataset YAML (optionally merged with overrides) into a ``DatasetConfig``."""
    from recemb.config.loader import deep_merge

    data = read_yaml(path)
    if overrides:
        data = deep_merge(data, overrides)
    return dataset_from_dict(data, where=str(path))


@dataclass
class FeatureInfo:
    """One prepared feature as the feature map records it.

    ``num_embeddings`` is the id range of a categorical feature (ids are in
    ``[0, num_embeddings)``; id ``oov_id`` collects rare and unseen values).
    Dense features keep their fitted ``mean``/``std`` and fill value;
    bucketised ones their ``boundaries``; with ``nonfinite: clip`` ``clip`` holds the
    ``[low, high]`` that ``-inf``/``+inf`` became (after fill/log, before standardising).
    """

    name: str
    kind: FeatureKind
    source: str
    num_embeddings: int = 0
    oov_id: int = 0
    hash_buckets: int = 0
    hash_seed: int = 0
    min_count: int = 1
    vocab_file: str | None = None
    max_len: int = 0
    separator: str = "|"
    fill: float = 0.0
    log: bool = False
    mean: float = 0.0
    std: float = 1.0
    boundaries: list[float] | None = None
    group: str | None = None
    cardinality: int = 0
    clip: list[float] | None = None

    @property
    def is_categorical(self) -> bool:
        """True when the prepared column holds ids."""
        return self.num_embeddings > 0


@dataclass
class FeatureMap:
    """The contract between ``prepare`` and ``train``: what each Parquet column means.

    ``dense_features`` and ``sparse_features`` give the column order used for
    ``Batch.dense`` and the keys of ``Batch.sparse``. ``shards`` maps each split to
    its Parquet files (relative to the feature map's folder); ``rows`` to its row count.

    Example:
        >>> fm = FeatureMap.load("data/synthetic_ctr/feature_map.json")  # doctest: +SKIP
        >>> fm.sparse_features[:2]                                        # doctest: +SKIP
        ['C1', 'C2']
    """

    dataset_id: str
    label: str | None
    features: list[FeatureInfo]
    shards: dict[str, list[str]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    count_column: str | None = None
    version: int = FEATURE_MAP_VERSION

    @property
    def dense_features(self) -> list[str]:
        """Names of the float columns, in ``Batch.dense`` order."""
        return [f.name for f in self.features if not f.is_categorical]

    @property
    def sparse_features(self) -> list[str]:
        """Names of the id columns, in ``Batch.sparse`` key order."""
        return [f.name for f in self.features if f.is_categorical]

    def feature(self, name: str) -> FeatureInfo:
        """The ``FeatureInfo`` called ``name`` (``KeyError`` naming the known ones)."""
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no feature '{name}' (known: {', '.join(f.name for f in self.features)})")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return to_dict(self)

    def save(self, path: str | Path) -> None:
        """Write ``feature_map.json`` atomically; a non-finite number in it is a bug (``ValueError``)."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> FeatureMap:
        """Read a feature map; refuses a newer format version than this code knows."""
        path = Path(path)
        if path.is_dir():
            path = path / "feature_map.json"
        if not path.is_file():
            raise DataError(f"{path}: feature map not found (run `recemb prepare` first)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise DataError(f"{path}: a feature map is a JSON object, got {type(data).__name__}")
        version = data.get("version", 0)
        if not isinstance(version, int) or version > FEATURE_MAP_VERSION:
            raise DataError(f"{path}: feature map version {version!r} is newer than this recemb reads")
        fm = from_dict(cls, data, where=str(path))
        # Every file the map names is read relative to it: none may lead outside its folder.
        for files in fm.shards.values():
            for name in files:
                path_under(path.parent, name, DataError)
        for info in fm.features:
            if info.vocab_file:
                path_under(path.parent, info.vocab_file, DataError)
        fm.root = path.parent
        return fm

    def id_counts(self, name: str) -> np.ndarray | None:
        """Training-split count of each id of feature ``name`` (length ``num_embeddings``).

        From the vocabulary file that preparation wrote (ids are sorted by count,
        id ``oov_id`` collects the rest and counts 0 here). ``None`` when the map was
        not loaded from disk or the feature has no vocabulary (hashed features).
        Frequency-aware variants (``hybrid``, ``mde``) size themselves from this.
        """
        info = self.feature(name)
        root = getattr(self, "root", None)
        if root is None or not info.vocab_file:
            return None
        import pyarrow.parquet as pq

        table = pq.read_table(path_under(root, info.vocab_file, DataError), columns=["id", "count"])
        counts = np.zeros(info.num_embeddings, dtype=np.int64)
        counts[table.column("id").to_numpy()] = table.column("count").to_numpy()
        return counts
