"""Encode a raw file through a prepared feature map: the rows as preparation would have written them.

A model trained on prepared data scores prepared rows; a new raw log (a CSV/TSV/Parquet
file in the format the data was prepared from) becomes such rows here without a second
copy of preparation's rules. ``raw_config`` reads the dataset config that preparation saved
beside ``feature_map.json`` (``dataset_config.yaml``; export bundles carry it too) and points
it at the file, every row going to the test split; ``encode_file`` then runs preparation's own
per-file stages (``fit_file``: the readers and row checks, rejects counted by reason;
``transform_file``) with the feature map's fitted features in place of freshly fitted ones:
vocabulary values -> ids, unseen values -> the OOV id, hash rules for hashed features, dense
fill/log/clip/standardise or buckets. Nothing is fitted, so the ids are the training ids.

Example:
    >>> fm = FeatureMap.load("data/synthetic_ctr/feature_map.json")                    # doctest: +SKIP
    >>> out = encode_file(fm, raw_config(fm, "logs/today.tsv"), "tmp/today")           # doctest: +SKIP
    >>> out.rows_in, out.rows, out.rejected                                            # doctest: +SKIP
    (10000, 9998, {'unparseable number in I3': 2})
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recemb.config.loader import deep_merge, read_yaml
from recemb.data.preprocess import (
    SPLITS,
    FittedFeatures,
    ShardWriter,
    TransformStats,
    fit_file,
    load_vocab,
    output_schema,
    plan_split,
    transform_file,
)
from recemb.data.schema import DatasetConfig, FeatureMap, dataset_from_dict, path_under
from recemb.data.sources import resolve_paths
from recemb.errors import DataError

DATASET_CONFIG = "dataset_config.yaml"  # what preparation writes beside feature_map.json
_SPILL = "_encode_spill"


@dataclass
class EncodedFile:
    """What ``encode_file`` wrote: the shards (in order), rows read and kept, rejects, unseen values.

    ``rejected`` counts the rows the readers and row checks refused, by reason (as
    ``recemb prepare`` reports them), ``examples`` names a few as ``file:line: reason``;
    ``unseen`` is per categorical feature the share of values that took id 0 (the OOV id:
    values not in the training vocabulary, or missing).
    """

    shards: list[Path]
    rows_in: int
    rows: int
    rejected: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    unseen: dict[str, float] = field(default_factory=dict)

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())


def raw_config(feature_map: FeatureMap, path: str | Path, overrides: dict[str, Any] | None = None) -> DatasetConfig:
    """The dataset config ``feature_map`` was prepared with, reading only ``path`` into the test split.

    ``overrides`` are merged into the saved config first (e.g. ``{"label": "label"}`` for an
    events file whose labels the training data lacked).

    Example:
        >>> cfg = raw_config(FeatureMap.load("data/synthetic_ctr"), "logs/today.tsv")   # doctest: +SKIP
        >>> cfg.paths, (cfg.split.train, cfg.split.valid, cfg.split.test)              # doctest: +SKIP
        (['logs/today.tsv'], (0.0, 0.0, 1.0))
    """
    root = getattr(feature_map, "root", None)
    saved = Path(root) / DATASET_CONFIG if root is not None else None
    if saved is None or not saved.is_file():
        raise DataError(f"{saved or 'the feature map'}: no dataset config beside feature_map.json (prepared by an "
                        "older recemb?); encode the file by preparing it, or pass a prepared split")
    data = read_yaml(saved)
    if overrides:
        data = deep_merge(data, overrides)
    seed = int((data.get("split") or {}).get("seed", 0))
    data["paths"] = [str(path)]
    data["split"] = {"train": 0.0, "valid": 0.0, "test": 1.0, "seed": seed}  # every row is a test row
    return dataset_from_dict(data, where=str(saved))


def fitted_features(feature_map: FeatureMap) -> FittedFeatures:
    """The feature map's features with their vocabularies, as ``finalize_features`` returned them."""
    vocabs = {}
    for info in feature_map.features:
        if not info.vocab_file:
            continue
        root = getattr(feature_map, "root", None)
        if root is None:
            raise DataError(f"feature '{info.name}': the feature map was not loaded from a folder, so its "
                            "vocabulary cannot be read")
        path = path_under(root, info.vocab_file, DataError)
        table = load_vocab(path).sort_by("id")
        ids = table.column("id").to_numpy()
        if not np.array_equal(ids, np.arange(1, len(ids) + 1)):
            raise DataError(f"{path}: vocabulary ids should run 1..{len(ids)}; prepare the data again")
        vocabs[info.name] = table
    return FittedFeatures(list(feature_map.features), vocabs)


def encode_file(feature_map: FeatureMap, cfg: DatasetConfig, out: str | Path) -> EncodedFile:
    """Encode ``cfg``'s input files through ``feature_map`` into Parquet shards in the folder ``out``.

    ``cfg`` must send every row to the test split (``raw_config`` does). The shards have
    preparation's schema (label, count, one column per feature) and its shard size; ``out``
    is created and holds only them. A ``DataError`` when no row is left.
    """
    out = Path(out)
    sources = resolve_paths(cfg)
    plan = plan_split(cfg, sources)
    if plan.train or plan.valid or plan.time_column:
        raise DataError("encode_file sends every row to the test split; build the config with raw_config")
    fitted = fitted_features(feature_map)
    schema = output_schema(cfg, fitted)
    out.mkdir(parents=True, exist_ok=True)
    spill = out / _SPILL
    spill.mkdir(exist_ok=True)
    writers = {s: ShardWriter(out if s == "test" else spill / s, schema, cfg.shard_rows) for s in SPLITS}
    tstats = TransformStats()
    rows_in, rejected, examples = 0, {}, []
    try:
        for src in sources:
            part = spill / f"{src.index:05d}.arrows"
            stats = fit_file(cfg, plan, src, part)  # reads and checks rows; refused ones counted by reason
            rows_in += stats.rows_in
            for why, n in stats.rejected.items():
                rejected[why] = rejected.get(why, 0) + n
            examples += stats.reject_examples[:max(0, 5 - len(examples))]
            tstats.merge(transform_file(cfg, fitted, plan, src, writers, part))
        names = writers["test"].close()
        for s in SPLITS:
            if s != "test":
                writers[s].close()
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    rows = tstats.rows["test"]
    if rows_in != rows + sum(rejected.values()) or tstats.rows["train"] or tstats.rows["valid"]:
        raise RuntimeError(f"row accounting broken: {rows_in} read, {rows} kept, {rejected} rejected")  # our bug
    if rows == 0:
        raise DataError(f"{', '.join(str(s.path) for s in sources)}: no row left to encode ({rows_in} read, "
                        f"all rejected: {rejected}; e.g. {examples[:1]})")
    unseen = {name: tstats.oov[name]["test"] / max(1, tstats.values[name]["test"]) for name in tstats.oov}
    return EncodedFile([out / name for name in names], rows_in, rows, dict(sorted(rejected.items())), examples,
                       unseen)


__all__ = ["DATASET_CONFIG", "EncodedFile", "encode_file", "fitted_features", "raw_config"]
