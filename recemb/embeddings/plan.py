"""A variant as a plan: typed, JSON-serialisable, and free of torch.

Every variant's builder returns a ``VariantPlan``: the id transform (kind, typed
params and named arrays such as remaps or hot-id lists), the physical tables,
the combiner (kind and params; its dense parameters live in the model's weights),
and the variant's capabilities. Three readers share the one object, so training
and serving cannot drift:

- the assembler (``recemb.embeddings.registry.assemble``) turns it into the torch
  layer and records each table's sharding;
- the exporter writes it into a bundle's manifest (arrays as safetensors);
- the numpy runtime (``recemb.serving``) applies it without torch.

This module imports numpy only (the serving runtime reads plans without torch).

Example:
    >>> plan = VariantPlan(kind="full", features=["a"], dims={"a": 4}, full_rows={"a": 10},
    ...                    tables=[TablePlan(name="t_a", rows=10, dim=4, keys=["a"])])
    >>> VariantPlan.from_dict(plan.to_dict()) == plan
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

PLAN_VERSION = 1
BYTES_PER_FLOAT = 4
Storage = Literal["tables", "module"]


@dataclass
class TablePlan:
    """One physical table: ``rows x dim`` fp32, read by the physical ``keys`` the transform emits.

    ``init`` says how training initialises it: ``normal`` (mean ``init_mean``, std ``init_std``;
    ``init_std`` None = torchrec's default init) . ``sharding`` is the requested sharding type.
    """

    name: str
    rows: int
    dim: int
    keys: list[str]
    sharding: str = "auto"
    init_mean: float = 0.0
    init_std: float | None = None

    @property
    def bytes(self) -> int:
        """fp32 bytes of the table."""
        return self.rows * self.dim * BYTES_PER_FLOAT


@dataclass
class TransformPlan:
    """The id transform: ``kind`` (``identity``, ``hash``, ``qr``, ...) and its JSON ``params``;
    arrays it needs are named in ``arrays`` and held by the plan. ``weighted``: it emits a
    weight per id (ROBE's sign hash)."""

    kind: str = "identity"
    params: dict[str, Any] = field(default_factory=dict)
    arrays: list[str] = field(default_factory=list)
    weighted: bool = False


@dataclass
class CombinerPlan:
    """From physical lookups to one vector per feature: ``kind`` and JSON ``params``.

    ``dense`` names its dense parameters (keys of the combiner's ``state_dict``), which the
    model's weights hold, not the plan."""

    kind: str = "identity"
    params: dict[str, Any] = field(default_factory=dict)
    dense: list[str] = field(default_factory=list)


@dataclass
class Capabilities:
    """What the variant can do and how its size was found.

    ``storage``: ``tables`` (a ``TableEmbeddingLayer``: transform, torchrec tables, combiner) or
    ``module`` (a layer of its own, built by the variant's registered assembler: TT cores, DHE's
    MLP and lowprec's int table train data parallel; ``pruned`` keeps torchrec tables, listed in
    ``tables`` and sharded like any, behind its own remap-and-fill module). ``multihot``: pooled
    bags are exact.
    ``budget``: how a budget became sizes (solver and its inputs, JSON). ``achieved_bytes``:
    the built layer's bytes (tables, dense combiner parameters, buffers), set by the assembler;
    ``full_bytes`` the uncompressed baseline at the same dims.
    """

    storage: Storage = "tables"
    multihot: bool = True
    budget: dict[str, Any] = field(default_factory=dict)
    achieved_bytes: int = 0
    full_bytes: int = 0


@dataclass
class VariantPlan:
    """One variant over a group of features, as data (see the module docstring).

    ``params`` holds a module variant's own settings (TT ranks, DHE widths, bits); ``arrays``
    the named numpy arrays of the transform (not part of ``to_dict``: exports write them as
    safetensors and pass them back to ``from_dict``).
    """

    kind: str
    features: list[str]
    dims: dict[str, int]
    full_rows: dict[str, int]
    transform: TransformPlan = field(default_factory=TransformPlan)
    tables: list[TablePlan] = field(default_factory=list)
    combiner: CombinerPlan = field(default_factory=CombinerPlan)
    capabilities: Capabilities = field(default_factory=Capabilities)
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    arrays: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.capabilities.full_bytes:
            self.capabilities.full_bytes = sum(self.full_rows[f] * self.dims[f] for f in self.features) * BYTES_PER_FLOAT
        missing = [a for a in self.transform.arrays if a not in self.arrays]
        if self.arrays and missing:
            raise ValueError(f"plan of {self.kind}: transform arrays {missing} are not in the plan")

    def table_bytes(self) -> int:
        """fp32 bytes of the physical tables."""
        return sum(t.bytes for t in self.tables)

    def sharding(self) -> dict[str, str]:
        """Requested sharding type per physical table."""
        return {t.name: t.sharding for t in self.tables}

    def to_dict(self) -> dict[str, Any]:
        """JSON data (arrays described by dtype and shape only)."""
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "arrays"}
        out["arrays"] = {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in sorted(self.arrays.items())}
        out["version"] = PLAN_VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> VariantPlan:
        """The plan of ``to_dict``'s data, with ``arrays`` (checked against the recorded dtypes and shapes)."""
        data = dict(data)
        version = data.pop("version", PLAN_VERSION)
        if version > PLAN_VERSION:
            raise ValueError(f"plan version {version} is newer than this recemb reads")
        described = data.pop("arrays", {})
        arrays = dict(arrays or {})
        for name, desc in described.items():
            if name not in arrays:
                raise ValueError(f"plan of {data.get('kind')}: array '{name}' is missing")
            got = arrays[name]
            if str(got.dtype) != desc["dtype"] or list(got.shape) != list(desc["shape"]):
                raise ValueError(f"plan of {data.get('kind')}: array '{name}' is {got.dtype}{list(got.shape)}, "
                                 f"expected {desc['dtype']}{desc['shape']}")
        return cls(
            kind=data["kind"], features=list(data["features"]), dims=dict(data["dims"]),
            full_rows=dict(data["full_rows"]),
            transform=TransformPlan(**data.get("transform", {})),
            tables=[TablePlan(**t) for t in data.get("tables", [])],
            combiner=CombinerPlan(**data.get("combiner", {})),
            capabilities=Capabilities(**data.get("capabilities", {})),
            params=dict(data.get("params", {})), seed=int(data.get("seed", 0)), arrays=arrays,
        )


def _plain(value: Any) -> Any:
    """Dataclasses, tuples and numpy scalars as plain JSON data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


__all__ = ["BYTES_PER_FLOAT", "PLAN_VERSION", "Capabilities", "CombinerPlan", "TablePlan", "TransformPlan",
           "VariantPlan"]
