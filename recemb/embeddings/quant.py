"""Post-training row-wise quantisation (int8 / int4 / fp16) of table-backed embedding layers.

``quantize_layer`` swaps each ``TableEmbeddingLayer``'s fp32 ``EmbeddingBagCollection``
for torchrec's quantised inference collection (FBGEMM's ``IntNBitTableBatchedEmbeddingBagsCodegen``,
which runs on CPU and GPU): int rows carry a per-row fp16 scale and bias, fp16 rows are plain
halves. The transform and combiner are kept, so the layer's forward contract is unchanged.
This is an export/inference step, not a training variant: no fused kernel trains these
tables (see ``lowprec`` for low-precision training). A quantised layer keeps its source's
``plan`` (tables, transform, combiner, sharding); ``table_arrays`` reads the stored rows
back as numpy (values, fp16 scale and bias), which ``recemb.export.format.dequantize_rows``
dequantises exactly as FBGEMM does.

Example:
    >>> q = quantize_layer(trained_layer, "int8")          # doctest: +SKIP
    >>> q(kjt).keys() == trained_layer(kjt).keys()         # doctest: +SKIP
    True
    >>> q.bytes().ratio                                    # doctest: +SKIP
    0.3125
"""

from __future__ import annotations

import copy
from typing import Literal, get_args

import numpy as np
import torch
from torch import nn
from torch.ao.quantization import PlaceholderObserver
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import MODULE_ATTR_ROW_ALIGNMENT_INT, QuantConfig
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recemb.embeddings.base import (
    EmbeddingLayer,
    GroupedEmbeddingLayer,
    IdentityTransform,
    IdTransform,
    ProjectedLayer,
    TableEmbeddingLayer,
    in_order,
)
from recemb.errors import ConfigError

QuantDtype = Literal["int8", "int4", "fp16"]
QUANT_DTYPES: tuple[str, ...] = get_args(QuantDtype)

# torch dtype that torchrec's QuantConfig maps to each FBGEMM storage type.
_WEIGHT_DTYPES: dict[str, torch.dtype] = {"int8": torch.qint8, "int4": torch.quint4x2, "fp16": torch.float16}
_BITS = {"int8": 8, "int4": 4, "fp16": 16}
# Integer rows end with an fp16 scale and an fp16 bias (FBGEMM's "SBHalf" layout).
SCALE_BIAS_BYTES = 4
# FBGEMM starts every table of a batched module on a 128-byte line.
TABLE_ALIGNMENT = 128
FP16_EPS = 2.0**-11  # unit roundoff of fp16 (half an ulp, relative)
FP16_SUBNORMAL_HALF_ULP = 2.0**-25  # absolute rounding error below fp16's normal range


def _round_up(x: int, to: int) -> int:
    return (x + to - 1) // to * to


def _check_dtype(dtype: str) -> None:
    if dtype not in QUANT_DTYPES:
        raise ConfigError(f"quantisation dtype '{dtype}' is unknown (known: {', '.join(QUANT_DTYPES)})")


def row_bytes(dim: int, dtype: QuantDtype, row_alignment: int = 1) -> int:
    """Bytes of one stored row: packed values, plus fp16 scale and bias for int types, padded.

    Example:
        >>> row_bytes(16, "int8"), row_bytes(16, "int4"), row_bytes(16, "fp16")
        (20, 12, 32)
    """
    _check_dtype(dtype)
    data = (dim * _BITS[dtype] + 7) // 8
    extra = 0 if dtype == "fp16" else SCALE_BIAS_BYTES
    return _round_up(data + extra, row_alignment)


def quantized_table_bytes(rows: int, dim: int, dtype: QuantDtype, row_alignment: int = 1) -> int:
    """Bytes FBGEMM allocates for one quantised table: ``rows * row_bytes``, padded to 128 bytes."""
    return _round_up(rows * row_bytes(dim, dtype, row_alignment), TABLE_ALIGNMENT)


def check_quantizable(dim: int, dtype: QuantDtype) -> None:
    """Raise ``ConfigError`` when FBGEMM cannot store rows of width ``dim`` as ``dtype``.

    The fp16 scale/bias that follow the packed values must be 2-byte aligned, so
    int8 needs an even ``dim`` and int4 a multiple of 4; fp16 takes any ``dim``.
    """
    _check_dtype(dtype)
    if dtype == "fp16":
        return
    packed = dim * _BITS[dtype] / 8
    if packed != int(packed) or int(packed) % 2:
        need = 2 if dtype == "int8" else 4
        raise ConfigError(
            f"{dtype} rows need a dim that is a multiple of {need} (FBGEMM aligns the fp16 scale/bias); "
            f"got dim {dim}: use fp16 or change embedding.dim"
        )


def row_error_bound(rows: torch.Tensor, dtype: QuantDtype) -> torch.Tensor:
    """Largest absolute error per row ``[R]`` that row-wise quantisation of ``rows`` ``[R, d]`` may make.

    int8/int4: half a step, ``scale / 2`` with ``scale = (max - min) / (2**bits - 1)``,
    plus what storing the scale and bias as fp16 adds (a clamped end value can be
    off by the bias's rounding and ``2**bits - 1`` times the scale's: at most
    ``2**-11 * (|min| + (max - min))``, plus ``(2**bits + 1) * 2**-25`` when the
    scale is so small that fp16 stores it as a subnormal). fp16: ``2**-11``
    relative to the row's largest magnitude, and half a subnormal ulp for tiny values.
    The plain ``scale / 2`` is not a strict bound: FBGEMM rounds scale and bias to fp16.

    Example:
        >>> row_error_bound(torch.tensor([[0.0, 2.55]]), "int8")  # ~ 0.005 + fp16 slack
        tensor([0.0063])
    """
    _check_dtype(dtype)
    rows = rows.detach().float()
    if dtype == "fp16":
        return rows.abs().amax(dim=1) * FP16_EPS + FP16_SUBNORMAL_HALF_ULP
    lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    span = hi - lo
    levels = 2 ** _BITS[dtype] - 1
    scale = span / levels
    # A scale below fp16's normal range is rounded in absolute terms: every level can drift.
    slack = FP16_EPS * (lo.abs() + span) + (levels + 2) * FP16_SUBNORMAL_HALF_ULP
    return scale / 2 * (1 + FP16_EPS) + slack


def quantize_ebc(
    ebc: EmbeddingBagCollection, dtype: QuantDtype, row_alignment: int = 1
) -> QuantEmbeddingBagCollection:
    """torchrec's quantised ``EmbeddingBagCollection`` holding ``ebc``'s tables as ``dtype``.

    ``row_alignment`` pads each row to a multiple of that many bytes: 1 (FBGEMM's CPU
    default) stores exactly ``row_bytes``; GPU kernels prefer 16. ``ebc`` must hold
    real (unsharded, non-meta) weights.
    """
    _check_dtype(dtype)
    if not isinstance(ebc, EmbeddingBagCollection):
        raise ConfigError(
            f"quantisation needs an unsharded torchrec EmbeddingBagCollection, got {type(ebc).__name__}: "
            "build the model on CPU and load the full state (sharding.load_full_state) first"
        )
    for table in ebc.embedding_bag_configs():
        check_quantizable(table.embedding_dim, dtype)
    if any(p.is_meta for p in ebc.parameters()):
        raise ConfigError("cannot quantise a layer built on the meta device: load trained weights first")
    # from_float reads its settings from attributes of the float module; set them on a
    # shallow copy so the caller's module is left untouched.
    source = copy.copy(ebc)
    source.qconfig = QuantConfig(
        activation=PlaceholderObserver.with_args(dtype=torch.float),
        weight=PlaceholderObserver.with_args(dtype=_WEIGHT_DTYPES[dtype]),
    )
    setattr(source, MODULE_ATTR_ROW_ALIGNMENT_INT, row_alignment)
    with torch.no_grad():
        return QuantEmbeddingBagCollection.from_float(source)


class QuantizedTableLayer(EmbeddingLayer):
    """A ``TableEmbeddingLayer`` whose tables are quantised: transform -> quantised EBC -> combiner.

    Inference only (the quantised tables hold no parameters). ``parameter_bytes``
    is the quantised storage FBGEMM allocates plus the transform's buffers and
    the combiner's parameters; ``full_bytes`` stays the fp32 baseline. ``plan`` is the
    source layer's (the fp32 plan the tables were trained under).
    """

    def __init__(
        self,
        source: TableEmbeddingLayer,
        dtype: QuantDtype,
        row_alignment: int = 1,
    ) -> None:
        super().__init__()
        self.features = list(source.features)
        self.dims = dict(source.dims)
        self.full_rows = dict(source.full_rows)
        self.tables: list[EmbeddingBagConfig] = list(source.tables)
        self.dtype = dtype
        self.row_alignment = row_alignment
        self.transform: IdTransform = copy.deepcopy(source.transform)
        self.combiner = copy.deepcopy(source.combiner)
        self.ebc = quantize_ebc(source.ebc, dtype, row_alignment)
        self._identity = isinstance(self.transform, IdentityTransform)
        self.plan = source.plan

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        physical = kjt if self._identity else self.transform(kjt)
        return in_order(self.combiner(self.ebc(physical)), self.features)

    def table_bytes(self) -> int:
        """Quantised storage of the tables, from their configs (what FBGEMM allocates)."""
        return sum(
            quantized_table_bytes(t.num_embeddings, t.embedding_dim, self.dtype, self.row_alignment)  # type: ignore[arg-type]
            for t in self.tables
        )

    def parameter_bytes(self) -> int:
        dense = sum(p.numel() * p.element_size() for p in self.combiner.parameters())
        dense += sum(b.numel() * b.element_size() for b in self.transform.buffers())
        return self.table_bytes() + dense

    def table_arrays(self) -> dict[str, dict[str, np.ndarray]]:
        """Each table's stored rows as numpy: ``weight`` (uint8 ``[rows, packed]``; int4 two per byte,
        low nibble first) with fp16 ``scale`` and ``bias`` per row for int8/int4, or fp16 ``[rows, dim]``.

        The one place that reads FBGEMM's batched module (torchrec keeps it private): its row
        layout puts the fp16 scale and bias before the values; they are split off here.
        """
        out: dict[str, dict[str, np.ndarray]] = {}
        for module in self.ebc._emb_modules:  # private in torchrec, with no public accessor
            for spec, (data, scale_bias) in zip(module.embedding_specs, module.split_embedding_weights(), strict=True):
                name, dim = spec[0], spec[2]
                values = data.detach().cpu().numpy()
                if self.dtype == "fp16":
                    out[name] = {"weight": values.view(np.float16)[:, :dim].copy()}
                    continue
                halves = scale_bias.detach().cpu().numpy().view(np.float16)
                out[name] = {"weight": values.copy(), "scale": halves[:, 0].copy(), "bias": halves[:, 1].copy()}
        return out

    def manifest(self) -> dict[str, object]:
        """JSON-serialisable description of the storage, for an export bundle (with the source's plan)."""
        return {
            "dtype": self.dtype,
            "row_alignment": self.row_alignment,
            "layout": "fbgemm_sbhalf" if self.dtype != "fp16" else "fp16",
            "tables": {
                t.name: {"rows": t.num_embeddings, "dim": t.embedding_dim,
                         "row_bytes": row_bytes(t.embedding_dim, self.dtype, self.row_alignment)}  # type: ignore[arg-type]
                for t in self.tables
            },
            "plan": None if self.plan is None else self.plan.to_dict(),
        }


def quantize_layer(layer: EmbeddingLayer, dtype: QuantDtype, row_alignment: int = 1) -> EmbeddingLayer:
    """A copy of ``layer`` whose tables are row-wise quantised to ``dtype`` (int8, int4 or fp16).

    Works on ``TableEmbeddingLayer`` and on ``GroupedEmbeddingLayer`` /
    ``ProjectedLayer`` around table-backed layers (projections are copied as
    they are). ``layer`` must be unsharded with real weights; it is not changed.
    This is the entry point for export: quantisation is post-training only.
    """
    _check_dtype(dtype)
    if isinstance(layer, QuantizedTableLayer):
        raise ConfigError("layer is already quantised")
    if isinstance(layer, TableEmbeddingLayer):
        if type(layer).forward is not TableEmbeddingLayer.forward:
            raise ConfigError(
                f"{type(layer).__name__} overrides TableEmbeddingLayer.forward; quantize_layer cannot keep it"
            )
        return QuantizedTableLayer(layer, dtype, row_alignment)
    if isinstance(layer, GroupedEmbeddingLayer):
        parts = {name: quantize_layer(inner, dtype, row_alignment) for name, inner in layer.layers.items()}
        return GroupedEmbeddingLayer(parts, layer.features)
    if isinstance(layer, ProjectedLayer):
        inner = quantize_layer(layer.inner, dtype, row_alignment)
        out = ProjectedLayer(inner, next(iter(layer.dims.values())))
        out.proj = nn.ModuleDict({k: copy.deepcopy(m) for k, m in layer.proj.items()})
        return out
    raise ConfigError(
        f"quantize_layer supports table-backed layers (TableEmbeddingLayer and groups/projections of them); "
        f"got {type(layer).__name__}"
    )


__all__ = [
    "QUANT_DTYPES",
    "QuantDtype",
    "QuantizedTableLayer",
    "check_quantizable",
    "quantize_ebc",
    "quantize_layer",
    "quantized_table_bytes",
    "row_bytes",
    "row_error_bound",
]
