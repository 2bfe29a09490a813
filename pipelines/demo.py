"""``recemb demo``: the main job on the embedded default, synthetic data end to end.

Generates a Criteo-like synthetic TSV (with its oracle AUC), prepares it into
Parquet shards, and prints where everything is. Later stages (training on
local Ray tracked in MLflow, evaluation, export) extend this same entry point.
"""

from __future__ import annotations

import json
from pathlib import Path

from recemb.data.preprocess import prepare_dataset
from recemb.data.schema import load_dataset_config
from recemb.data.synthetic import CtrSynthConfig, generate_ctr

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run_demo(workdir: Path, rows: int = 200_000, seed: int = 0) -> dict[str, object]:
    """Run the demo in ``workdir`` and return a summary (also printed)."""
    workdir.mkdir(parents=True, exist_ok=True)
    raw = workdir / "synthetic" / "ctr.tsv"
    synth = generate_ctr(CtrSynthConfig(rows=rows, seed=seed, vocab_scale=0.1), raw)
    print(f"[demo] synthetic: {synth.rows} rows in {synth.seconds:.1f}s, oracle AUC {synth.oracle_auc:.4f}")
    cfg = load_dataset_config(
        CONFIGS / "datasets" / "synthetic_ctr.yaml",
        {"paths": [str(raw)], "output": str(workdir / "prepared")},
    )
    prep = prepare_dataset(cfg, overwrite=True)
    print(f"[demo] prepared: {json.dumps(prep.to_dict(), default=str)}")
    summary = {"synthetic": synth.to_dict(), "prepared": prep.to_dict()}
    return summary
