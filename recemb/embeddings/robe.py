"""The ``robe`` variant: ROBE-Z, every embedding read as hashed blocks of one shared array.

ROBE (Desai et al., MLSys 2022) stores one array of M floats for all features; the
embedding of id x of feature f is dim/Z blocks of Z contiguous floats, block j read
from a position hashed from (f, j, x). Here the array is one torchrec table of M/Z
rows of width Z, so FBGEMM runs and torchrec shards it like any table. Blocks start
at multiples of Z: this is the *Z-aligned* form of ROBE-Z. The paper's circular,
unaligned reads (a block may start anywhere and wrap around) would need an unpooled
per-id gather outside torchrec; aligned blocks keep pooled lookups and lose only
the overlap between neighbouring blocks. An optional sign hash (±1 per feature,
block and id, as per-value weights of a weighted collection) decorrelates the
collisions, as in feature hashing.

Example (YAML):
    embedding: {kind: robe, dim: 16, budget: 0.01, params: {block: 8}}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recemb.embeddings.base import (
    BYTES_PER_FLOAT,
    Combiner,
    EmbeddingLayer,
    IdTransform,
    TableEmbeddingLayer,
    in_order,
)
from recemb.embeddings.budget import BudgetError, budget_bytes
from recemb.embeddings.hashing import mix64_torch, salted_seed, seed_key
from recemb.embeddings.registry import VariantSpec, init_fn, register_variant
from recemb.errors import ConfigError

_LOW63 = (1 << 63) - 1


@dataclass
class RobeParams:
    """``block``: Z, floats per hashed block (divides ``dim``, multiple of 4 for FBGEMM;
    0 = 8 when ``dim`` is a multiple of 8, else 4);
    ``rows``: rows of Z floats when ``budget`` is unset; ``signed``: ±1 sign hash per block."""

    block: int = 0
    rows: int = 65536
    signed: bool = True


def robe_rows(target_bytes: int, block: int) -> int:
    """Rows of ``block`` floats in the largest shared array within ``target_bytes``.

    Example:
        >>> robe_rows(1000, block=8)
        31
    """
    rows = target_bytes // (block * BYTES_PER_FLOAT)
    if rows < 1:
        raise BudgetError(
            f"embedding.kind=robe: a budget of {target_bytes:,} bytes holds no block of {block} floats; "
            f"raise embedding.budget to at least {block * BYTES_PER_FLOAT} bytes or lower params.block"
        )
    return rows


def signed64(x: int) -> int:
    """The int64 value with the bits of unsigned 64-bit ``x`` (for torch int64 arithmetic)."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def ordered_by(kjt: KeyedJaggedTensor, features: list[str]) -> KeyedJaggedTensor:
    """``kjt`` restricted to ``features``, in that order (no copy when it already is)."""
    keys = kjt.keys()
    if keys == features:
        return kjt
    index = {k: i for i, k in enumerate(keys)}
    return kjt.permute([index[f] for f in features])


class RobeTransform(IdTransform):
    """Logical ids -> one physical row per (feature, block): ``hash(id, salt=(f, j)) % rows``.

    Output keys are ``{feature}__b{j}``, feature-major, each with the feature's
    lengths. With ``signed`` the lowest hash bit (unused by the row, which takes the
    top 63 bits) gives the value's weight ±1. The row of block ``j`` of feature index
    ``f`` equals ``hash_ids_np(ids, salted_seed(seed, f, j), rows)``.
    """

    def __init__(self, features: list[str], blocks: int, rows: int, seed: int, signed: bool) -> None:
        super().__init__()
        self.features = list(features)
        self.blocks = blocks
        self.rows = rows
        self.seed = seed
        self.signed = signed
        self.keys = block_keys(self.features, blocks)
        self.seeds = [salted_seed(seed, f, j) for f in range(len(self.features)) for j in range(blocks)]
        self._hash_keys = [signed64(seed_key(s)) for s in self.seeds]

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        kjt = ordered_by(kjt, self.features)
        values, lengths = kjt.values(), kjt.lengths()
        per_key = kjt.length_per_key()
        # Each feature's ids once per block: [f0 ids]*nb, [f1 ids]*nb, ...
        tiled = torch.cat([part.repeat(self.blocks) for part in torch.split(values, per_key)])
        per_block = torch.tensor(per_key, device=values.device).repeat_interleave(self.blocks)
        keys = torch.tensor(self._hash_keys, dtype=torch.int64, device=values.device)
        h = mix64_torch(tiled.to(torch.int64) ^ keys.repeat_interleave(per_block, output_size=tiled.numel()))
        rows = ((h >> 1) & _LOW63) % self.rows
        weights = (1 - 2 * (h & 1)).to(torch.float32) if self.signed else None
        out_lengths = lengths.view(len(self.features), -1).repeat_interleave(self.blocks, dim=0).reshape(-1)
        return KeyedJaggedTensor(
            keys=self.keys, values=rows, weights=weights, lengths=out_lengths, stride=kjt.stride()
        )

    def to_manifest(self) -> dict[str, Any]:
        return {
            "kind": "robe_z_aligned",
            "features": self.features,
            "blocks_per_feature": self.blocks,
            "rows": self.rows,
            "seed": self.seed,
            "block_seeds": {k: s for k, s in zip(self.keys, self.seeds, strict=True)},
            "row": "hash_ids(id, block_seed, rows)",
            "sign": "1 - 2 * (hash64(id, block_seed) & 1)" if self.signed else None,
        }


def block_keys(features: list[str], blocks: int) -> list[str]:
    """Physical feature names, one per (feature, block), feature-major."""
    return [f"{f}__b{j}" for f in features for j in range(blocks)]


class BlockConcat(Combiner):
    """Concatenates each feature's ``blocks`` pooled blocks into its ``[B, dim]`` vector."""

    def __init__(self, features: list[str], blocks: int, dim: int) -> None:
        super().__init__()
        self.features = list(features)
        self.keys = block_keys(self.features, blocks)
        self.dim = dim

    def forward(self, pooled: KeyedTensor) -> KeyedTensor:
        # Feature-major block keys laid side by side are the features' vectors laid side by side.
        pooled = in_order(pooled, self.keys)
        return KeyedTensor(
            keys=self.features, length_per_key=[self.dim] * len(self.features), values=pooled.values()
        )


@register_variant("robe", RobeParams)
def build_robe(spec: VariantSpec) -> EmbeddingLayer:
    """One shared table of ``rows`` x ``block`` floats; ``dim / block`` hashed blocks per id."""
    params: RobeParams = spec.params
    z = params.block or (8 if spec.dim % 8 == 0 else 4)
    if z < 4 or z % 4 or spec.dim % z:
        raise ConfigError(
            f"embedding.params.block={z}: must be a multiple of 4 (FBGEMM) that divides embedding.dim={spec.dim}"
        )
    if spec.budget is None:
        if params.rows < 1:
            raise ConfigError(f"embedding.params.rows={params.rows}: must be >= 1")
        rows = params.rows
    else:
        full = sum(f.num_embeddings for f in spec.features) * spec.dim * BYTES_PER_FLOAT
        rows = robe_rows(budget_bytes(spec.budget, full), z)
    features = [f.name for f in spec.features]
    blocks = spec.dim // z
    transform = RobeTransform(features, blocks, rows, spec.seed, params.signed)
    table = EmbeddingBagConfig(
        name=f"{spec.prefix}robe",
        num_embeddings=rows,
        embedding_dim=z,
        feature_names=transform.keys,
        pooling=PoolingType.SUM,
        init_fn=init_fn(spec.init_std),
    )
    layer = TableEmbeddingLayer(
        features=features,
        dims={n: spec.dim for n in features},
        full_rows={f.name: f.num_embeddings for f in spec.features},
        tables=[table],
        transform=transform,
        combiner=BlockConcat(features, blocks, spec.dim),
        device=spec.device,
        is_weighted=params.signed,
    )
    layer.sharding = {table.name: spec.sharding}
    return layer
