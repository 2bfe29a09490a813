"""``recemb prepare``: a dataset YAML to Parquet shards, feature map and stats.

Single-process for now (streaming, bounded memory); a Ray fan-out over input
files composes the same per-file fit/transform functions.
"""

from __future__ import annotations

from pathlib import Path

from recemb.config.loader import parse_overrides
from recemb.data.preprocess import PrepareReport, prepare_dataset
from recemb.data.schema import load_dataset_config


def run_prepare(
    config: str | Path,
    overrides: list[str] | None = None,
    output: str | Path | None = None,
    overwrite: bool = False,
    max_reject_fraction: float | None = None,
) -> PrepareReport:
    """Load the dataset YAML (with ``key=value`` overrides) and prepare it."""
    cfg = load_dataset_config(config, parse_overrides(overrides or [], where=str(config)))
    return prepare_dataset(cfg, output=output, overwrite=overwrite, max_reject_fraction=max_reject_fraction)
