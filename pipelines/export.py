"""``recemb export``: a trained run to a serving bundle (``recemb.export.writer``).

Resolves the run (a checkpoint folder, a run folder, or an MLflow run id), writes the
bundle in this process, one checkpoint rank file at a time, and reports its bytes next
to the achieved embedding bytes the run reported. A multi-rank job calls
``export_rank_pieces`` on every rank and ``finish_bundle`` on rank 0 instead.

Example:
    $ recemb export --run runs/deepfm_synthetic_ctr --out bundles/deepfm --dtype int8
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from recemb.export.format import MANIFEST
from recemb.export.writer import export_bundle


def run_export(run: str | Path, out: str | Path, dtype: str = "fp32", features: list[str] | None = None,
               mlflow_uri: str | None = None, overwrite: bool = False,
               materialize: str | Path | None = None) -> dict[str, Any]:
    """Export ``run`` to ``out``; returns the bundle's path, dtype, files and bytes.

    ``materialize``: a JSON file ``{feature: [raw values]}`` whose rows TT/DHE layers precompute.
    """
    t0 = time.perf_counter()
    path = export_bundle(run, out, dtype=dtype, features=features, mlflow_uri=mlflow_uri, overwrite=overwrite,
                         materialize=materialize)
    manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    sizes = manifest["bytes"]
    embedding = sizes["tables"] + sizes["plans"] + sizes["layers"]
    summary = {
        "bundle": str(path), "dtype": dtype, "features": len(manifest["features"]),
        "files": len(manifest["files"]), "source": manifest["source"], "bytes": sizes,
        "embedding_bytes": embedding,
        "ratio_to_achieved": round(embedding / sizes["achieved"], 4) if sizes["achieved"] else None,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    print(f"[export] {path} dtype={dtype} embedding_bytes={embedding:,} achieved={sizes['achieved']:,} "
          f"vocab={sizes['vocab']:,} dense={sizes['dense_model']:,}", flush=True)
    return summary


__all__ = ["run_export"]
