"""The ``dhe`` variant: Deep Hash Embedding (Kang et al., KDD 2021), no table at all.

An id becomes ``k`` seeded hashes mapped to uniform ``[-1, 1)`` or Gaussian
(Box-Muller) values, and an MLP decodes them into the embedding; bags sum their
ids' vectors. The MLP weights are dense parameters: the dense optimizer trains
them and DDP averages their gradients, so the layer is data parallel (every rank
holds the whole decoder).

The builder plans (``storage: module``): ``params`` hold the solved ``k``, decoder widths,
encoding, activation and every feature's hash seeds (JSON ints); the layer is assembled
from the plan alone, and ``recemb.serving.variants.dhe`` computes the same rows in numpy.

Example (YAML):
    embedding: {kind: dhe, dim: 16, budget: 0.01, params: {k: 64, layers: 2, shared: true}}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recemb.embeddings.base import BYTES_PER_FLOAT, EmbeddingLayer
from recemb.embeddings.budget import BudgetError, budget_bytes, largest_at_most
from recemb.embeddings.hashing import mix64_torch, salted_seed, seed_key
from recemb.embeddings.plan import VariantPlan
from recemb.embeddings.registry import VariantSpec, register_module_assembler, register_variant
from recemb.errors import ConfigError

Encoding = Literal["uniform", "gaussian"]
_UNIT_BITS = 24  # as ``hashing.hash_unit``: the top 24 bits of the 64-bit hash


@dataclass
class DHEParams:
    """``k`` hashes per id; ``hidden`` width (used when budget is None) of ``layers`` hidden
    layers; ``shared``: one decoder for all features (each still hashes with its own
    seeds) instead of one per feature; ``min_hidden``: below this width a budget shrinks
    ``k`` together with the width instead."""

    k: int = 64
    hidden: int = 64
    layers: int = 2
    activation: Literal["mish", "relu"] = "mish"
    encoding: Encoding = "uniform"
    shared: bool = True
    min_hidden: int = 8


def hash_seeds(seed: int, feature_index: int, k: int) -> list[int]:
    """The ``k`` hash seeds of feature ``feature_index``: ``salted_seed(seed, feature_index, j)``."""
    return [salted_seed(seed, feature_index, j) for j in range(k)]


def _signed_key(seed: int) -> int:
    key = seed_key(seed)
    return key - (1 << 64) if key >= 1 << 63 else key


def _units_to_encoding(u: torch.Tensor, k: int, encoding: Encoding) -> torch.Tensor:
    """``[n, >=k]`` uniforms in ``[0, 1)`` -> ``[n, k]`` encoding."""
    if encoding == "uniform":
        return u[:, :k] * 2.0 - 1.0
    radius = torch.sqrt(-2.0 * torch.log1p(-u[:, 0::2]))  # 1 - u is in (0, 1]: log is finite
    angle = (2.0 * math.pi) * u[:, 1::2]
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=2).flatten(1)[:, :k]


def _hash_count(k: int, encoding: Encoding) -> int:
    """Hashes needed for ``k`` values: Box-Muller turns each pair of uniforms into two normals."""
    return k if encoding == "uniform" else k + k % 2


def dhe_encoding(ids: torch.Tensor, keys: torch.Tensor, k: int, encoding: Encoding) -> torch.Tensor:
    """``[len(ids), k]`` float32 encoding; ``keys`` are the signed ``seed_key``s of the hash seeds.

    Column ``j``'s uniform equals ``hash_unit(ids, seeds[j])``; all columns in one
    broadcast hash instead of ``k`` calls. numpy twin: ``recemb.serving.variants.dhe.encode_np``.
    """
    hashed = mix64_torch(ids.to(torch.int64)[:, None] ^ keys[None, :])
    top = (hashed >> (64 - _UNIT_BITS)) & ((1 << _UNIT_BITS) - 1)
    return _units_to_encoding(top.to(torch.float32) * (1.0 / (1 << _UNIT_BITS)), k, encoding)


def mlp_floats(widths: list[int]) -> int:
    """Weights and biases of an MLP with layer widths ``widths`` (input first, output last)."""
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))


def solve_dhe_widths(
    num_mlps: int, k: int, layers: int, dim: int, target_bytes: int | None, hidden: int = 64, min_hidden: int = 8
) -> tuple[int, list[list[int]]]:
    """``(k, hidden widths per decoder)`` whose total bytes fit ``target_bytes``.

    The largest common width with ``k`` hashes that fits is taken; if it is below
    ``min_hidden``, ``k`` and the width shrink together (square first layer). Then
    single layers are widened by one while the total fits, so the bytes land
    within one neuron's cost of the target. Raises ``BudgetError`` when not even
    ``k = width = 1`` fits.

    Example:
        >>> solve_dhe_widths(1, k=64, layers=1, dim=16, target_bytes=None, hidden=32)
        (64, [[32]])
    """
    if target_bytes is None:
        return k, [[hidden] * layers for _ in range(num_mlps)]
    target = target_bytes // BYTES_PER_FLOAT

    def cost(kk: int, h: int) -> int:
        return num_mlps * mlp_floats([kk] + [h] * layers + [dim])

    top = 1
    while cost(k, top) <= target:
        top *= 2
    width = largest_at_most(lambda h: cost(k, h), target, 1, top)
    if width is None or width < min_hidden:
        side = largest_at_most(lambda s: cost(s, s), target, 1, max(k, 1))
        if side is None:
            raise BudgetError(
                f"embedding.kind=dhe: the smallest decoder takes {cost(1, 1) * BYTES_PER_FLOAT:,} bytes, over "
                f"the budget of {target_bytes:,} bytes; raise embedding.budget or set params.shared=true"
            )
        k, width = side, side
    widths = [[width] * layers for _ in range(num_mlps)]
    total = cost(k, width)
    grown = True
    while grown:
        grown = False
        for mlp in widths:
            for i in range(layers):
                before = mlp_floats([k, *mlp, dim])
                mlp[i] += 1
                extra = mlp_floats([k, *mlp, dim]) - before
                if total + extra <= target:
                    total, grown = total + extra, True
                else:
                    mlp[i] -= 1
    return k, widths


def decoder(widths: list[int], activation: str, device: torch.device | None = None) -> nn.Sequential:
    """Linear layers over ``widths`` with ``activation`` between them (none after the last)."""
    act: type[nn.Module] = nn.Mish if activation == "mish" else nn.ReLU
    parts: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        parts.append(nn.Linear(a, b, device=device))
        if i < len(widths) - 2:
            parts.append(act())
    return nn.Sequential(*parts)


class DHEEmbeddingLayer(EmbeddingLayer):
    """Hash encodings of each batch's distinct ids, decoded by MLPs, summed per bag.

    ``decoders`` holds one decoder under ``"shared"`` or one per feature. ``seeds`` are the
    plan's hash seeds (JSON ints); their 64-bit keys are a non-persistent buffer
    (``[features, hashes]``) refilled by ``reset_buffers``, so they follow the module to
    its device and survive meta-device construction without entering the state_dict.
    """

    def __init__(
        self, features: list[str], full_rows: dict[str, int], dim: int, seeds: dict[str, list[int]], k: int,
        encoding: Encoding, decoders: dict[str, nn.Module], device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.features = list(features)
        self.dims = {f: dim for f in features}
        self.full_rows = dict(full_rows)
        self.k, self.encoding = k, encoding
        self.seeds = {f: [int(s) for s in seeds[f]] for f in features}
        hashes = {len(v) for v in self.seeds.values()}
        if len(hashes) != 1:
            raise ValueError(f"every feature needs the same number of hash seeds, got {sorted(hashes)}")
        self.register_buffer("hash_keys", torch.empty(len(features), hashes.pop(), dtype=torch.int64, device=device),
                             persistent=False)
        self.decoders = nn.ModuleDict(decoders)
        self.shared = "shared" in self.decoders
        if self.hash_keys.device.type != "meta":
            self.reset_buffers()

    @classmethod
    def from_plan(cls, plan: VariantPlan, device: torch.device | None = None) -> DHEEmbeddingLayer:
        """The layer ``plan.params`` describes (decoder widths, k, encoding, seeds); decoders freshly initialised."""
        p = plan.params
        dims = set(plan.dims.values())
        if len(dims) != 1:
            raise ValueError(f"dhe plans have one dim for all features, got {sorted(dims)}")
        decoders = {name: decoder(widths, p["activation"], device) for name, widths in p["decoders"].items()}
        return cls(features=plan.features, full_rows=plan.full_rows, dim=dims.pop(), seeds=p["seeds"], k=p["k"],
                   encoding=p["encoding"], decoders=decoders, device=device)

    @property
    def seed_keys(self) -> dict[str, list[int]]:
        """Each feature's signed 64-bit hash keys (what ``hash_keys`` holds), from the seeds."""
        return {f: [_signed_key(s) for s in self.seeds[f]] for f in self.features}

    def reset_buffers(self) -> None:
        """Refill ``hash_keys`` from the seeds (after meta construction or DMP materialisation)."""
        keys = self.seed_keys
        with torch.no_grad():
            self.hash_keys.copy_(torch.tensor([keys[f] for f in self.features], dtype=torch.int64))

    def parameter_bytes(self) -> int:
        """The decoders' bytes: the hash keys are the plan's seeds, not trained storage."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        batch = kjt.stride()
        keys = kjt.keys()
        values, lengths, starts = kjt.values(), kjt.lengths(), kjt.offset_per_key()
        bags: list[tuple[torch.Tensor, torch.Tensor]] = []
        codes: list[torch.Tensor] = []
        for j, f in enumerate(self.features):
            i = keys.index(f)
            ids = values[starts[i]:starts[i + 1]]
            offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths[i * batch:(i + 1) * batch])
            unique, inverse = torch.unique(ids, return_inverse=True)
            bags.append((inverse, offsets))
            codes.append(dhe_encoding(unique, self.hash_keys[j], self.k, self.encoding))
        if self.shared:
            rows = list(self.decoders["shared"](torch.cat(codes)).split([c.shape[0] for c in codes]))
        else:
            rows = [self.decoders[f](c) for f, c in zip(self.features, codes, strict=True)]
        out = [
            F.embedding_bag(inverse, r, offsets, mode="sum", include_last_offset=True)
            for (inverse, offsets), r in zip(bags, rows, strict=True)
        ]
        return KeyedTensor.from_tensor_list(self.features, out)


def _check_params(params: DHEParams) -> None:
    for name in ("k", "hidden", "layers"):
        if getattr(params, name) < 1:
            raise ConfigError(f"embedding.params.{name} must be >= 1, got {getattr(params, name)}")


@register_variant("dhe", DHEParams)
def plan_dhe(spec: VariantSpec) -> VariantPlan:
    """DHE over all of the group's features, the decoder widths solved from the budget."""
    params: DHEParams = spec.params
    _check_params(params)
    full = sum(spec.vocab.values()) * spec.dim * BYTES_PER_FLOAT
    target = None if spec.budget is None else budget_bytes(spec.budget, full)
    names = ["shared"] if params.shared else spec.names
    k, widths = solve_dhe_widths(
        len(names), params.k, params.layers, spec.dim, target, hidden=params.hidden, min_hidden=params.min_hidden
    )
    count = _hash_count(k, params.encoding)
    solved = dhe_plan_params(k, params, {n: [k, *w, spec.dim] for n, w in zip(names, widths, strict=True)},
                             {f: hash_seeds(spec.seed, i, count) for i, f in enumerate(spec.names)})
    return spec.plan("dhe", [], storage="module", multihot=True, params=solved, budget={
        "solver": "dhe_widths", "budget": spec.budget, "target_bytes": target, "k": params.k,
        "hidden": params.hidden, "layers": params.layers, "min_hidden": params.min_hidden,
    })


def dhe_plan_params(k: int, params: DHEParams, decoders: dict[str, list[int]],
                    seeds: dict[str, list[int]]) -> dict[str, Any]:
    """The plan's JSON: ``k`` values from ``hashes`` seeds per feature, the encoding, and each
    decoder's layer widths (input ``k`` first, the dim last) and activation."""
    return {"k": k, "hashes": _hash_count(k, params.encoding), "encoding": params.encoding,
            "activation": params.activation, "shared": params.shared, "decoders": decoders, "seeds": seeds}


@register_module_assembler("dhe")
def assemble_dhe(plan: VariantPlan, device: torch.device | None = None) -> DHEEmbeddingLayer:
    """The DHE layer of a plan."""
    return DHEEmbeddingLayer.from_plan(plan, device)
