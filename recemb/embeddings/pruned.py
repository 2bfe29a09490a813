"""The ``pruned`` variant: compact tables of the rows and dims an OptEmbed search kept.

Each feature's table holds only its kept rows, at its own width (the searched dim);
an int32 remap (logical id -> compact row, -1 = pruned) is the id transform, and a
pruned id looks up nothing (zero vector, or a learned per-field OOV vector). The
remaps and sizes come from a folder ``recemb search`` writes (``pruning.json`` +
``remaps.safetensors``; no pickle); ``save_pruning``/``load_pruning`` read and write it.

A searched width FBGEMM cannot run (5 or 10, from a search at ``embedding.dim=10``) is held
``fbgemm_width`` wide in training and its lookups cut back (``PrunedLayer.pad_for_fbgemm``),
as every table variant does; the padding counts in the bytes.

Example (YAML):
    embedding: {kind: pruned, dim: 16, params: {path: runs/x/search/pruned}}
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recemb.embeddings.base import (
    BYTES_PER_FLOAT,
    EmbeddingLayer,
    IdTransform,
    padded_tables,
    register_transform,
    repadded,
    table_configs,
    table_parameter_bytes,
    unpad,
)
from recemb.embeddings.optembed import PrunedVector
from recemb.embeddings.plan import TransformPlan, VariantPlan
from recemb.embeddings.registry import VariantSpec, register_module_assembler, register_variant
from recemb.errors import ConfigError, DataError
from recemb.io import write_json_atomic

PRUNING_JSON = "pruning.json"
REMAPS_FILE = "remaps.safetensors"
FORMAT_VERSION = 1


@dataclass
class PrunedParams:
    """``path``: the search's ``pruned`` folder; ``pruned_vector``: ``zero`` or a learned per-field ``oov``."""

    path: str = ""
    pruned_vector: PrunedVector = "zero"


@dataclass
class FeaturePruning:
    """One feature's compact table: its remap (logical id -> row, -1 = pruned) and width."""

    remap: np.ndarray
    dim: int

    @property
    def kept_rows(self) -> int:
        """Rows of the compact table."""
        return int((self.remap >= 0).sum())


@dataclass
class PruningPlan:
    """Per feature pruning, and the supernet's (full) dim the bytes are compared with."""

    full_dim: int
    features: dict[str, FeaturePruning] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def remap_from_mask(keep: np.ndarray) -> np.ndarray:
    """int32 remap of a keep mask: kept ids get rows 0, 1, ... in id order, the rest -1."""
    keep = np.asarray(keep, dtype=bool)
    remap = np.full(keep.shape[0], -1, dtype=np.int32)
    remap[keep] = np.arange(int(keep.sum()), dtype=np.int32)
    return remap


def save_pruning(path: str | Path, plan: PruningPlan) -> Path:
    """Write ``plan`` to the folder ``path`` (replaced atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({f: np.ascontiguousarray(p.remap, dtype=np.int32) for f, p in plan.features.items()},
              str(tmp / REMAPS_FILE))
    meta = {
        "format_version": FORMAT_VERSION,
        "full_dim": plan.full_dim,
        "features": {f: {"num_embeddings": int(p.remap.shape[0]), "kept_rows": p.kept_rows, "dim": p.dim}
                     for f, p in plan.features.items()},
        "extra": plan.extra,
    }
    write_json_atomic(tmp / PRUNING_JSON, meta)
    # Move an old plan aside before the rename, so a crash leaves either plan, never none.
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def load_pruning(path: str | Path) -> PruningPlan:
    """Read a folder written by ``save_pruning`` (``DataError`` when it is not one or is inconsistent)."""
    path = Path(path)
    if not (path / PRUNING_JSON).is_file() or not (path / REMAPS_FILE).is_file():
        raise DataError(f"{path}: not a pruning folder (needs {PRUNING_JSON} and {REMAPS_FILE}; "
                        "`recemb search` writes one under <output_dir>/<expid>/search/pruned)")
    meta = json.loads((path / PRUNING_JSON).read_text(encoding="utf-8"))
    remaps = load_file(str(path / REMAPS_FILE))
    plan = PruningPlan(full_dim=int(meta["full_dim"]), extra=meta.get("extra", {}))
    for f, info in meta["features"].items():
        remap = remaps.get(f)
        if remap is None or remap.shape[0] != info["num_embeddings"] or remap.dtype != np.int32:
            raise DataError(f"{path}: remap of '{f}' is missing or does not match {PRUNING_JSON}")
        p = FeaturePruning(remap=remap, dim=int(info["dim"]))
        if p.kept_rows != info["kept_rows"] or (p.kept_rows and int(remap.max()) != p.kept_rows - 1):
            raise DataError(f"{path}: remap of '{f}' is inconsistent with its kept_rows")
        plan.features[f] = p
    return plan


def remap_array(feature: str) -> str:
    """The plan's array name of ``feature``'s remap."""
    return f"remap/{feature}"


@register_transform("remap")
class RemapTransform(IdTransform):
    """Logical ids -> compact rows through one flat int32 remap; pruned ids are dropped from their bags.

    Plan params: ``features: {f: {offset, size, kept_rows}}`` (each remap's place in the flat buffer);
    arrays ``remap/<f>`` (int32, -1 = pruned). The buffer is not persistent: it is made from the plan's
    arrays, and refilled by ``reset_buffers`` after a meta-device build. Twin:
    ``recemb.serving.variants.pruned``.
    """

    def __init__(self, offsets: dict[str, int], remaps: list[np.ndarray], device: torch.device | None = None) -> None:
        super().__init__()
        self.offsets = dict(offsets)
        self._remaps = remaps  # the plan's arrays (references, not copies): the buffer's source
        total = sum(int(r.shape[0]) for r in remaps)
        self.register_buffer("remap", torch.empty(total, dtype=torch.int32, device=device), persistent=False)
        if self.remap.device.type != "meta":
            self.reset_buffers()

    @classmethod
    def from_plan(cls, plan: VariantPlan, device: torch.device | None = None) -> RemapTransform:
        features = plan.transform.params["features"]
        return cls({f: features[f]["offset"] for f in plan.features},
                   [plan.arrays[remap_array(f)] for f in plan.features], device=device)

    def reset_buffers(self) -> None:
        """Refill the remap buffer from the plan's arrays (after meta construction)."""
        flat = np.concatenate(self._remaps).astype(np.int32, copy=False) if self._remaps \
            else np.zeros(0, dtype=np.int32)
        with torch.no_grad():
            self.remap.copy_(torch.from_numpy(flat))

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = kjt.keys()
        lengths = kjt.lengths()
        per_key = torch.tensor(kjt.length_per_key(), device=lengths.device)
        base = torch.tensor([self.offsets[k] for k in keys], device=lengths.device, dtype=torch.int64)
        rows = self.remap[kjt.values() + torch.repeat_interleave(base, per_key)].to(torch.int64)
        keep = rows >= 0
        bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
        new_lengths = torch.zeros_like(lengths).index_add_(0, bag, keep.to(lengths.dtype))
        return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=rows[keep], lengths=new_lengths)


class PrunedLayer(EmbeddingLayer):
    """Remap -> compact torchrec tables (kept rows, per-field widths) -> zero/OOV for pruned ids.

    A layer of its own (``storage: module`` in its plan, assembled by ``assemble_pruned``) rather
    than a ``TableEmbeddingLayer``: a bag whose ids were all pruned takes the OOV vector, which
    needs the remapped lengths, and a feature with no kept rows has no table. Its tables are
    still torchrec tables (in ``plan.tables``), sharded and run by FBGEMM like any other, and
    padded for FBGEMM as a ``TableEmbeddingLayer``'s are (``pad_for_fbgemm``, ``padding_bytes``).
    """

    def __init__(self, plan: VariantPlan, device: torch.device | None = None) -> None:
        super().__init__()
        self.features = list(plan.features)
        self.dims = dict(plan.dims)
        self.full_rows = dict(plan.full_rows)
        self.full_dim = int(plan.params["full_dim"])
        pruning = plan.transform.params["features"]
        self.kept_rows = {f: int(pruning[f]["kept_rows"]) for f in self.features}
        self.transform = RemapTransform.from_plan(plan, device)
        self.tables = table_configs(plan)
        self.physical_tables = list(self.tables)  # pad_for_fbgemm widens them
        self.widths: dict[str, int] = {}  # features of padded tables -> their plan width
        self.table_features = [t.feature_names[0] for t in self.tables]
        self.ebc = EmbeddingBagCollection(tables=self.tables, device=device) if self.tables else None
        self.init_std = float(plan.params["oov_init_std"])
        # One flat parameter owned by this module, so DMP's meta init calls our reset_parameters.
        starts = np.cumsum([0] + [self.dims[f] for f in self.features])
        self._oov_at = {f: (int(starts[i]), int(starts[i + 1])) for i, f in enumerate(self.features)}
        oov = plan.params["pruned_vector"] == "oov"
        self.oov = nn.Parameter(torch.empty(int(starts[-1]), device=device)) if oov else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.oov is not None:
            with torch.no_grad():
                self.oov.normal_(0.0, self.init_std)

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        physical = self.transform(kjt)
        batch = kjt.stride()
        parts: dict[str, torch.Tensor] = {}
        if self.ebc is not None:
            keys = physical.keys()
            sub = physical if keys == self.table_features else physical.permute(
                [keys.index(f) for f in self.table_features])
            pooled = self.ebc(sub)
            parts = (unpad(pooled, self.widths) if self.widths else pooled).to_dict()
        out = []
        empty = physical.lengths().view(len(physical.keys()), batch) == 0
        row = {k: i for i, k in enumerate(physical.keys())}
        for f in self.features:
            v = parts.get(f)
            if v is None:
                v = torch.zeros(batch, self.dims[f], device=empty.device)
            if self.oov is not None:
                lo, hi = self._oov_at[f]
                v = v + empty[row[f]].unsqueeze(-1).to(v.dtype) * self.oov[lo:hi]
            out.append(v)
        return KeyedTensor.from_tensor_list(self.features, out)

    def parameter_bytes(self) -> int:
        dense = self.oov.numel() * self.oov.element_size() if self.oov is not None else 0
        return table_parameter_bytes(self.physical_tables) + self.transform.remap.numel() * 4 + dense

    def padding_bytes(self) -> int:
        """Bytes of the padding columns that searched widths not divisible by 4 need (0 for most layers)."""
        return table_parameter_bytes(self.physical_tables) - table_parameter_bytes(self.tables)

    def pad_for_fbgemm(self) -> dict[str, int]:
        """Hold every compact table ``fbgemm_width`` wide (call before sharding); returns the padded
        tables' plan widths by table name. Weights already in the layer (not on the meta device) are
        kept in the first columns; lookups are cut back to the plan's widths."""
        physical = padded_tables(self.tables)
        if self.ebc is None or physical == self.physical_tables:
            return {}
        self.ebc, self.physical_tables = repadded(self.ebc, self.tables, physical), physical
        padded = {t.name: t.embedding_dim for t, p in zip(self.tables, physical, strict=True)
                  if p.embedding_dim != t.embedding_dim}
        self.widths = {t.feature_names[0]: t.embedding_dim for t in self.tables if t.name in padded}
        return padded

    def full_bytes(self) -> int:
        """The ``full`` variant's bytes at the configured ``embedding.dim`` (what the pruning saves against)."""
        return sum(self.full_rows[f] * self.full_dim * BYTES_PER_FLOAT for f in self.features)


@register_module_assembler("pruned")
def assemble_pruned(plan: VariantPlan, device: torch.device | None = None) -> PrunedLayer:
    """The ``PrunedLayer`` of a ``pruned`` plan."""
    return PrunedLayer(plan, device)


@register_variant("pruned", PrunedParams)
def plan_pruned(spec: VariantSpec) -> VariantPlan:
    """Compact tables (``p_<feature>``) from the pruning folder ``params.path``."""
    params: PrunedParams = spec.params
    if spec.budget is not None:
        raise ConfigError("embedding.kind=pruned takes its sizes from the search folder; remove embedding.budget")
    if not params.path:
        raise ConfigError("embedding.kind=pruned needs embedding.params.path (a search's `pruned` folder)")
    pruning = load_pruning(params.path)
    for f in spec.features:
        p = pruning.features.get(f.name)
        if p is None:
            raise ConfigError(f"{params.path}: no pruning for feature '{f.name}' (searched on other data?)")
        if p.remap.shape[0] != f.num_embeddings:
            raise ConfigError(f"{params.path}: feature '{f.name}' has {p.remap.shape[0]} ids there but "
                              f"{f.num_embeddings} in this dataset (search again on this data)")
        if p.dim < 1:  # any other width runs: training pads what FBGEMM cannot run (PrunedLayer.pad_for_fbgemm)
            raise ConfigError(f"{params.path}: dim {p.dim} of '{f.name}' must be >= 1 (search again)")
    names = spec.names
    kept = {f: pruning.features[f].kept_rows for f in names}
    dims = {f: pruning.features[f].dim for f in names}
    offsets = np.cumsum([0] + [spec.vocab[f] for f in names])
    features = {f: {"offset": int(offsets[i]), "size": spec.vocab[f], "kept_rows": kept[f]}
                for i, f in enumerate(names)}
    arrays = {remap_array(f): np.ascontiguousarray(pruning.features[f].remap, dtype=np.int32) for f in names}
    tables = [spec.table(f"p_{f}", kept[f], dims[f], [f]) for f in names if kept[f] > 0]
    plan = spec.plan(
        "pruned", tables, dims=dims, arrays=arrays,
        transform=TransformPlan("remap", {"features": features, "pruned": -1}, arrays=list(arrays)),
        storage="module", budget={"solver": "optembed_search", "source": params.path, "search": pruning.extra},
        full_bytes=sum(spec.vocab[f] * spec.dim * BYTES_PER_FLOAT for f in names),
    )
    plan.params = {"full_dim": spec.dim, "pruned_vector": params.pruned_vector,
                   "oov_init_std": spec.init_std if spec.init_std is not None else 1e-3}
    return plan
