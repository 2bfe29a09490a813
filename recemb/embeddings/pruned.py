"""The ``pruned`` variant: compact tables of the rows and dims an OptEmbed search kept.

Each feature's table holds only its kept rows, at its own width (the searched dim);
an int32 remap (logical id -> compact row, -1 = pruned) is the id transform, and a
pruned id looks up nothing (zero vector, or a learned per-field OOV vector). The
remaps and sizes come from a folder ``recemb search`` writes (``pruning.json`` +
``remaps.safetensors``; no pickle); ``save_pruning``/``load_pruning`` read and write it.

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
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recemb.embeddings.base import BYTES_PER_FLOAT, EmbeddingLayer, IdTransform, table_parameter_bytes
from recemb.embeddings.optembed import PrunedVector
from recemb.embeddings.registry import VariantSpec, init_fn, register_variant
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


class RemapTransform(IdTransform):
    """Logical ids -> compact rows through one flat int32 remap; pruned ids are dropped from their bags."""

    def __init__(self, remaps: dict[str, np.ndarray], device: torch.device | None = None) -> None:
        super().__init__()
        self.features = list(remaps)
        self.sizes = {f: int(r.shape[0]) for f, r in remaps.items()}
        starts = np.cumsum([0] + [r.shape[0] for r in remaps.values()])[:-1]
        self.offsets = {f: int(s) for f, s in zip(self.features, starts, strict=True)}
        # numpy source of the buffer: DMP materialises buffers of a meta-built model as zeros.
        self._remap_np = np.concatenate([r.astype(np.int32) for r in remaps.values()]) if remaps \
            else np.zeros(0, dtype=np.int32)
        self.register_buffer("remap", torch.empty(self._remap_np.shape[0], dtype=torch.int32, device=device))
        if self.remap.device.type != "meta":
            self.reset_buffers()

    def reset_buffers(self) -> None:
        """Refill the remap buffer from its numpy source (after meta construction)."""
        with torch.no_grad():
            self.remap.copy_(torch.from_numpy(self._remap_np))

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

    def to_manifest(self) -> dict[str, Any]:
        return {"kind": "remap", "pruned": -1, "dtype": "int32",
                "features": {f: {"offset": self.offsets[f], "size": self.sizes[f]} for f in self.features}}


class PrunedLayer(EmbeddingLayer):
    """Remap -> compact torchrec tables (kept rows, per-field widths) -> zero/OOV for pruned ids."""

    def __init__(self, spec: VariantSpec, plan: PruningPlan, oov: bool) -> None:
        super().__init__()
        self.features = [f.name for f in spec.features]
        self.dims = {f: plan.features[f].dim for f in self.features}
        self.full_rows = {f.name: f.num_embeddings for f in spec.features}
        self.full_dim = spec.dim
        self.kept_rows = {f: plan.features[f].kept_rows for f in self.features}
        self.transform = RemapTransform({f: plan.features[f].remap for f in self.features}, device=spec.device)
        self.table_features = [f for f in self.features if self.kept_rows[f] > 0]
        self.tables = [
            EmbeddingBagConfig(
                name=f"{spec.prefix}p_{f}", num_embeddings=self.kept_rows[f], embedding_dim=self.dims[f],
                feature_names=[f], pooling=PoolingType.SUM, init_fn=init_fn(spec.init_std),
            )
            for f in self.table_features
        ]
        self.ebc = EmbeddingBagCollection(tables=self.tables, device=spec.device) if self.tables else None
        self.init_std = spec.init_std if spec.init_std is not None else 1e-3
        # One flat parameter owned by this module, so DMP's meta init calls our reset_parameters.
        starts = np.cumsum([0] + [self.dims[f] for f in self.features])
        self._oov_at = {f: (int(starts[i]), int(starts[i + 1])) for i, f in enumerate(self.features)}
        self.oov = nn.Parameter(torch.empty(int(starts[-1]), device=spec.device)) if oov else None
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
            parts = self.ebc(sub).to_dict()
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
        return table_parameter_bytes(self.tables) + self.transform.remap.numel() * 4 + dense

    def full_bytes(self) -> int:
        """The ``full`` variant's bytes at the configured ``embedding.dim`` (what the pruning saves against)."""
        return sum(self.full_rows[f] * self.full_dim * BYTES_PER_FLOAT for f in self.features)


@register_variant("pruned", PrunedParams)
def build_pruned(spec: VariantSpec) -> EmbeddingLayer:
    """Compact tables (``p_<feature>``) from the pruning folder ``params.path``."""
    params: PrunedParams = spec.params
    if spec.budget is not None:
        raise ConfigError("embedding.kind=pruned takes its sizes from the search folder; remove embedding.budget")
    if not params.path:
        raise ConfigError("embedding.kind=pruned needs embedding.params.path (a search's `pruned` folder)")
    plan = load_pruning(params.path)
    for f in spec.features:
        p = plan.features.get(f.name)
        if p is None:
            raise ConfigError(f"{params.path}: no pruning for feature '{f.name}' (searched on other data?)")
        if p.remap.shape[0] != f.num_embeddings:
            raise ConfigError(f"{params.path}: feature '{f.name}' has {p.remap.shape[0]} ids there but "
                              f"{f.num_embeddings} in this dataset (search again on this data)")
        if p.dim % 4:
            raise ConfigError(f"{params.path}: dim {p.dim} of '{f.name}' is not a multiple of 4 (FBGEMM)")
    layer = PrunedLayer(spec, plan, oov=params.pruned_vector == "oov")
    layer.sharding = {t.name: spec.sharding for t in layer.tables}
    return layer
