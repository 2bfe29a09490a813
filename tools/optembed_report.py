"""What an OptEmbed search pruned on the synthetic data, against what the generator planted.

The synthetic generator puts signal only on the first ``signal_head_ids`` ids of
each signal field and none on its ``noise_fields`` (``recemb.data.synthetic``).
This reads a search's ``pruned/`` plan and the prepared vocabularies and prints,
as JSON: the share of rows pruned among planted-noise fields, signal-head ids and
signal-tail ids, and the dims and kept rows the search gave each field.

Usage::

    python tools/optembed_report.py <run>/search bench-out/data/synth_1000000_0_mc2 \
        bench-out/data/ctr_1000000_0.tsv.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recemb.data.synthetic import hex_ids  # noqa: E402
from recemb.embeddings.pruned import load_pruning  # noqa: E402


def head_mask(data_dir: Path, feature: str, head_ids: int, size: int) -> np.ndarray:
    """Which prepared ids of ``feature`` are the generator's signal-head ids."""
    vocab = pq.read_table(data_dir / "vocab" / f"{feature}.parquet", columns=["value", "id"]).to_pydict()
    index = dict(zip(vocab["value"], vocab["id"], strict=True))
    field = int(feature[1:]) - 1  # C1 is generator field 0
    tokens = [bytes(t).decode() for t in hex_ids(np.arange(head_ids), field)]
    mask = np.zeros(size, dtype=bool)
    mask[[index[t] for t in tokens if t in index]] = True
    return mask


def report(search_root: Path, data_dir: Path, generator_report: Path) -> dict[str, Any]:
    details = json.loads(generator_report.read_text())["details"]
    plan = load_pruning(search_root / "pruned")
    noise = set(details["noise_fields"])
    counts = {k: [0, 0] for k in ("noise", "signal_head", "signal_tail")}  # [pruned, rows]
    for feature, p in plan.features.items():
        pruned = p.remap < 0
        if feature in noise:
            counts["noise"][0] += int(pruned.sum())
            counts["noise"][1] += pruned.size
            continue
        head = head_mask(data_dir, feature, details["signal_head_ids"][feature], pruned.size)
        counts["signal_head"][0] += int((pruned & head).sum())
        counts["signal_head"][1] += int(head.sum())
        counts["signal_tail"][0] += int((pruned & ~head).sum())
        counts["signal_tail"][1] += int((~head).sum())
    out: dict[str, Any] = {k: {"pruned": a, "rows": b, "share_pruned": a / b if b else None}
                           for k, (a, b) in counts.items()}
    out["noise_fields"] = {f: {"dim": plan.features[f].dim, "kept_rows": plan.features[f].kept_rows}
                           for f in sorted(noise)}
    out["dims"] = {f: p.dim for f, p in plan.features.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("search_root", type=Path, help="the search folder (holds pruned/)")
    ap.add_argument("data_dir", type=Path, help="the prepared synthetic data")
    ap.add_argument("generator_report", type=Path, help="the generator's <tsv>.json")
    args = ap.parse_args()
    print(json.dumps(report(args.search_root, args.data_dir, args.generator_report), indent=1))


if __name__ == "__main__":
    main()
