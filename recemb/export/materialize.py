"""``--materialize``: rows of TT and DHE features precomputed for a listed set of raw values.

TT and DHE bundles store their parameters (cores, decoders) and the runtime computes each
row; a serving system that looks up the same hot values again and again can have their
rows computed once, at export. The list is a JSON file, one key per feature, its raw values
(the strings of the logs, as ``Bundle.lookup`` takes them):

    {"C1": ["68fd1e64", "05db9164"], "C3": ["7e0ccccf"]}

Each value is mapped to its id by the bundle's own vocabulary or hash rule (an unknown
value: the OOV id), and the row of every distinct id is computed by the same numpy runtime
that serves the bundle, then stored as a plain gather table per layer part:
``materialized/<layer>.<part>.safetensors`` with ``ids/<feature>`` (sorted int64) and
``rows/<feature>`` (fp32 ``[n, dim]``, before the layer's projection). ``Bundle.lookup``
gathers listed ids from it and computes the rest. Only TT and DHE layers take a list: the
other variants' rows are stored already.

Example:
    >>> parse_materialize({"C1": ["a", 7, None]}, "hot.json")
    {'C1': ['a', 7, None]}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.numpy import save_file as save_numpy

from recemb.embeddings.plan import VariantPlan
from recemb.errors import ConfigError, DataError

if TYPE_CHECKING:
    from recemb.export.writer import ModelSpec

MATERIALIZED_KINDS = ("tt", "dhe")
MATERIALIZED_DIR = "materialized"


def computes_rows(plan: VariantPlan) -> bool:
    """Whether ``plan``'s runtime computes rows that ``--materialize`` can precompute (a TT or DHE module;
    the plain tables a TT group keeps for its small features are stored already)."""
    return plan.kind in MATERIALIZED_KINDS and plan.capabilities.storage == "module"


def computed_features(spec: ModelSpec) -> dict[str, list[str]]:
    """Feature -> the layers of ``spec`` (the export's model description) where TT or DHE computes its rows."""
    out: dict[str, list[str]] = {}
    for layer in spec.layers:
        for part in layer.parts:
            if computes_rows(part.plan):
                for f in part.plan.features:
                    out.setdefault(f, []).append(layer.name)
    return out


def parse_materialize(data: Any, where: str) -> dict[str, list[Any]]:
    """``{feature: [raw values]}`` checked: an object of non-empty lists of strings, numbers or nulls."""
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{where}: should be a JSON object {{feature: [raw values]}} with at least one feature")
    for feature, values in data.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: '{feature}' should list its raw values (a non-empty JSON array)")
        bad = next((v for v in values if not (v is None or isinstance(v, (str, int, float)))
                    or isinstance(v, bool)), _NOTHING)
        if bad is not _NOTHING:
            raise ConfigError(f"{where}: '{feature}' holds {bad!r}; list raw values as strings or numbers")
    return {str(f): list(v) for f, v in data.items()}


_NOTHING = object()


def load_materialize(path: str | Path) -> dict[str, list[Any]]:
    """Read a ``--materialize`` JSON file (see the module docstring)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--materialize {path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--materialize {path}: not valid JSON ({e})") from None
    return parse_materialize(data, f"--materialize {path}")


def check_materialize(computed: dict[str, list[str]], features: list[str], listed: dict[str, list[Any]]) -> None:
    """Every listed feature is exported and served by a TT or DHE layer (``computed``: feature -> layers)."""
    for f in listed:
        if f not in features:
            raise ConfigError(f"--materialize: feature '{f}' is not exported (exported: {', '.join(features)})")
        if not computed.get(f):
            raise ConfigError(f"--materialize: feature '{f}' is not computed by a TT or DHE layer (its rows are "
                              "stored in the bundle already); remove it from the file")


def write_materialized(folder: Path, listed: dict[str, list[Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Compute and write the rows of ``listed`` for the bundle staged in ``folder`` (manifest written).

    The staged bundle is opened as serving opens it (checked), so ids and rows come from the
    runtime itself. Returns each layer part's manifest entry ``{"file", "features": {f: rows}}``.
    """
    from recemb.serving.bundle import Bundle

    bundle = Bundle.open(folder)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in bundle.manifest["layers"]:
        layer = bundle.layers[entry["name"]]
        for part_entry in entry["parts"]:
            arrays: dict[str, np.ndarray] = {}
            counts = {}
            for f in [f for f in listed if f in layer.parts]:
                part = layer.parts[f]
                if not computes_rows(part.plan) or part.name != part_entry["name"]:
                    continue
                ids = np.unique(bundle.ids(f, listed[f])[0])
                arrays[f"ids/{f}"] = ids
                arrays[f"rows/{f}"] = np.ascontiguousarray(part.lookup(f, ids, np.ones(len(ids), np.int64)))
                counts[f] = int(len(ids))
            if not arrays:
                continue
            rel = f"{MATERIALIZED_DIR}/{entry['name']}.{part_entry['name'] or 'main'}.safetensors"
            (folder / MATERIALIZED_DIR).mkdir(exist_ok=True)
            save_numpy(arrays, str(folder / rel))
            out[(entry["name"], part_entry["name"])] = {"file": rel, "features": counts}
    if not out:
        raise DataError(f"{folder}: no TT or DHE layer serves {', '.join(listed)}; nothing to materialize")
    return out


__all__ = ["MATERIALIZED_DIR", "MATERIALIZED_KINDS", "check_materialize", "computed_features", "computes_rows", "load_materialize", "parse_materialize",
           "write_materialized"]
