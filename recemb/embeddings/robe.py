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

Any ``embedding.dim`` works: the blocks cover ``dim`` rounded up to a multiple of 4
(``fbgemm_width``) and the last block is cut to what ``dim`` needs (``dim: 10`` with ``Z = 4``:
three blocks, the third read for its first 2 floats). The array itself needs no padding: its
rows are ``Z`` wide and every float of it is read whole by other blocks, so nothing is padding.
With one block per id (``block`` = ``dim`` rounded up) no block would read those floats: the
table is then ``dim`` wide and padded in training like any table, its padding reported.

The plan's transform (kind ``robe_z``) lists each feature's block keys and seeds; the
numpy twin is ``recemb.serving.variants.robe``.

Example (YAML):
    embedding: {kind: robe, dim: 16, budget: 0.01, params: {block: 8}}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recemb.embeddings.base import (
    BYTES_PER_FLOAT,
    Combiner,
    IdTransform,
    by_key,
    fbgemm_width,
    in_order,
    jagged,
    one_id_per_bag,
    register_combiner,
    register_transform,
    regroup,
)
from recemb.embeddings.budget import BudgetError, budget_bytes
from recemb.embeddings.hashing import (
    buckets_of,
    hash64_segments,
    hash_keys,
    mix64_keyed,
    mulshift_buckets_,
    salted_seed,
)
from recemb.embeddings.plan import CombinerPlan, TransformPlan, VariantPlan
from recemb.embeddings.registry import VariantSpec, register_variant
from recemb.errors import ConfigError


@dataclass
class RobeParams:
    """``block``: Z, floats per hashed block (a multiple of 4 for FBGEMM that divides ``dim``, or
    ``dim`` rounded up to a multiple of 4 when ``dim`` is not one; 0 = 8 when ``dim`` is a multiple
    of 8, else 4);
    ``rows``: rows of Z floats when ``budget`` is unset; ``signed``: ±1 sign hash per block."""

    block: int = 0
    rows: int = 65536
    signed: bool = True


def robe_rows(target_bytes: int, block: int) -> int:
    """Rows of ``block`` floats in the largest shared array within ``target_bytes``; a block not
    divisible by 4 (one block per id at ``dim: 10``) costs its padded width, as training holds it.

    Example:
        >>> robe_rows(1000, block=8), robe_rows(1000, block=10)
        (31, 20)
    """
    row_bytes = fbgemm_width(block) * BYTES_PER_FLOAT  # as training holds it: padded to a multiple of 4
    rows = target_bytes // row_bytes
    if rows < 1:
        raise BudgetError(
            f"embedding.kind=robe: a budget of {target_bytes:,} bytes holds no block of {block} floats; "
            f"raise embedding.budget to at least {row_bytes} bytes or lower params.block"
        )
    return rows


def signed64(x: int) -> int:
    """The int64 value with the bits of unsigned 64-bit ``x`` (for torch int64 arithmetic).

    Example:
        >>> signed64(2**64 - 1)
        -1
    """
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def ordered_by(kjt: KeyedJaggedTensor, features: list[str]) -> KeyedJaggedTensor:
    """``kjt`` restricted to ``features``, in that order (no copy when it already is)."""
    keys = kjt.keys()
    if keys == features:
        return kjt
    index = {k: i for i, k in enumerate(keys)}
    return kjt.permute([index[f] for f in features])


def block_keys(features: list[str], blocks: int) -> list[str]:
    """Physical feature names, one per (feature, block), feature-major.

    Example:
        >>> block_keys(["a", "b"], 2)
        ['a__b0', 'a__b1', 'b__b0', 'b__b1']
    """
    return [f"{f}__b{j}" for f in features for j in range(blocks)]


@register_transform("robe_z")
class RobeTransform(IdTransform):
    """Logical ids -> one physical row per (feature, block): ``hash(id, salt=(f, j)) % rows``.

    Output keys are ``{feature}__b{j}``, feature-major, each with the feature's
    lengths. The row of block ``j`` of feature index ``f`` is ``bucket_ids_np(ids,
    salted_seed(seed, f, j), rows, hash)``. With ``signed`` a hash bit the row does not use
    gives the value's weight ±1: splitmix64's lowest bit (the row takes the top 63), or
    bit 31 of multiply-add-shift's ``a * id + b`` (the row takes bits 32-63).

    Plan params: ``rows``, ``signed``, ``blocks: {feature: [{key, seed}, ...]}`` (every
    feature has the same number of blocks) and ``hash`` (``idhash.HASHES``; absent in plans
    written before it: ``splitmix64``). The per-block hash constants are a CPU tensor made
    from the seeds, moved to the input's device at each call (a few dozen values).
    """

    def __init__(self, blocks: dict[str, list[dict[str, Any]]], rows: int, signed: bool,
                 hash_name: str = "splitmix64") -> None:
        super().__init__()
        self.features = list(blocks)
        self.blocks = len(next(iter(blocks.values())))
        if any(len(b) != self.blocks for b in blocks.values()):
            raise ValueError("robe_z: every feature must have the same number of blocks")
        self.rows = rows
        self.signed = signed
        self.hash_name = hash_name
        self.keys = [b["key"] for f in self.features for b in blocks[f]]
        self._key_tensor = hash_keys([b["seed"] for f in self.features for b in blocks[f]], hash_name)
        self._sources = [i for i in range(len(self.features)) for _ in range(self.blocks)]

    @classmethod
    def from_plan(cls, plan: VariantPlan, device: torch.device | None = None) -> RobeTransform:
        p = plan.transform.params
        return cls(p["blocks"], p["rows"], p["signed"], p.get("hash", "splitmix64"))

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Each feature's ids once per block, then one hash of them all, each block with its own key;
        the sign is the hash's lowest bit, the row its top 63.

        When every feature has as many ids (single-hot batches) the ids are xored with the block
        keys by broadcasting (``[features, 1, ids] ^ [features, blocks, 1]``), which makes the
        per-block copies and the hash's first pass one pass; else the copies come from ``regroup``
        and ``hash64_segments`` hashes them."""
        kjt = ordered_by(kjt, self.features)
        if self.hash_name == "mulshift":
            return self._mulshift(kjt)
        per_feature = kjt.length_per_key()
        width = per_feature[0] if per_feature and all(n == per_feature[0] for n in per_feature) else None
        if width is not None:
            features = len(self.features)
            keys = self._key_tensor.to(kjt.values().device).view(features, self.blocks, 1)
            z = kjt.values().to(torch.int64).view(features, 1, width) ^ keys
            h = mix64_keyed(z.view(-1))
            lengths = kjt.lengths().view(features, 1, -1).expand(-1, self.blocks, -1).reshape(-1)
            per_key = [width] * (features * self.blocks)
        else:
            values, lengths, per_key = regroup(kjt, self._sources)
            h = hash64_segments(values, self._key_tensor, per_key)
        weights = _SIGNS.to(h.device).index_select(0, h & 1) if self.signed else None
        return jagged(self.keys, buckets_of(h, self.rows), lengths, kjt.stride(), per_key, weights)

    def _mulshift(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """``forward`` with multiply-add-shift: ``z = a * id + b`` per block, the sign from bit 31 of
        ``z``, the row from its top 32 bits. Single-hot batches broadcast ``[features, 1, ids]``
        against ``[features, blocks, 1]`` constants (the copies per block and the multiply are one
        pass); otherwise the copies come from ``regroup`` and the constants by segment."""
        per_feature = kjt.length_per_key()
        width = per_feature[0] if per_feature and all(n == per_feature[0] for n in per_feature) else None
        keys = self._key_tensor.to(kjt.values().device)
        if width is not None:
            features = len(self.features)
            z = kjt.values().to(torch.int64).view(features, 1, width) * keys[:, 0].view(features, self.blocks, 1)
            z = z.add_(keys[:, 1].view(features, self.blocks, 1)).view(-1)
            lengths = kjt.lengths().view(features, 1, -1).expand(-1, self.blocks, -1).reshape(-1)
            per_key = [width] * (features * self.blocks)
        else:
            values, lengths, per_key = regroup(kjt, self._sources)
            z = values.to(torch.int64) * by_key(keys[:, 0], per_key, values.device)
            z.add_(by_key(keys[:, 1], per_key, values.device))
        weights = None
        if self.signed:
            bit = torch.bitwise_right_shift(z, 31).bitwise_and_(1)
            weights = _SIGNS.to(z.device).index_select(0, bit)
        return jagged(self.keys, mulshift_buckets_(z, self.rows), lengths, kjt.stride(), per_key, weights)


_SIGNS = torch.tensor([1.0, -1.0])  # the weight of a block by its hash's lowest bit


@register_combiner("block_concat")
class BlockConcat(Combiner):
    """Concatenates each feature's pooled blocks into its vector, cut to ``dim`` columns.

    Plan params: ``blocks: {feature: [key, ...]}``, ``width`` (floats per block) and, only where
    the blocks cover more than the dim (a dim not divisible by 4), ``dim``: each feature's vector
    is its blocks' first ``dim`` floats. No dense parameters."""

    def __init__(self, blocks: dict[str, list[str]], width: int, dim: int | None = None) -> None:
        super().__init__()
        self.features = list(blocks)
        self.keys = [k for f in self.features for k in blocks[f]]
        self.covered = [width * len(blocks[f]) for f in self.features]  # floats the blocks read per feature
        self.dims = self.covered if dim is None else [min(dim, c) for c in self.covered]
        self._cut = self.dims != self.covered

    @classmethod
    def from_plan(cls, plan: VariantPlan, device: torch.device | None = None) -> BlockConcat:
        p = plan.combiner.params
        return cls(p["blocks"], p["width"], p.get("dim"))

    def _cut_to_dims(self, values: torch.Tensor) -> torch.Tensor:
        """``[B, sum(covered)]`` -> ``[B, sum(dims)]``: each feature's first ``dim`` floats (every
        feature has as many blocks, so one strided view of ``[B, features, covered]``)."""
        batch = values.shape[0]
        per_feature = values.view(batch, len(self.features), self.covered[0])
        return per_feature[:, :, :self.dims[0]].reshape(batch, -1)

    def forward(self, pooled: KeyedTensor) -> KeyedTensor:
        # Feature-major block keys laid side by side are the features' vectors laid side by side.
        pooled = in_order(pooled, self.keys)
        values = self._cut_to_dims(pooled.values()) if self._cut else pooled.values()
        return KeyedTensor(keys=self.features, length_per_key=self.dims, values=values)

    def lookup(self, ebc: EmbeddingBagCollection, kjt: KeyedJaggedTensor) -> KeyedTensor | None:
        """Without autograd, a batch of one id per bag (single-hot) read from the shared table in
        sample-major order: the ids (and signs) transposed from ``[keys, batch]`` to ``[batch, keys]``,
        then one bag per id, whose ``[batch * keys, width]`` result is the output laid out already.
        Else None (pooled blocks, then ``combine``).

        Bit for bit the pooled blocks laid side by side (each bag of one id is its row times its
        sign), without the key-major pooled copy of the whole output and its transposing copy."""
        configs = ebc.embedding_bag_configs()
        if torch.is_grad_enabled() or kjt.keys() != self.keys or len(configs) != 1:
            return None
        values = kjt.values()
        if not one_id_per_bag(kjt.lengths(), values.numel()):
            return None
        batch, keys = kjt.stride(), len(self.keys)
        weight = ebc.embedding_bags[configs[0].name].weight.detach()
        ids = values.view(keys, batch).t().reshape(-1)
        signs = kjt.weights_or_none() if ebc.is_weighted() else None
        if signs is None:
            rows = weight.index_select(0, ids)
        else:  # the pooling kernel scales the rows in its pass (a broadcast product after a gather is slower)
            rows = F.embedding_bag(ids, weight, torch.arange(ids.numel(), device=ids.device), mode="sum",
                                   per_sample_weights=signs.view(keys, batch).t().reshape(-1))
        values = rows.view(batch, -1)
        return KeyedTensor(keys=self.features, length_per_key=self.dims,
                           values=self._cut_to_dims(values) if self._cut else values)


@register_variant("robe", RobeParams)
def plan_robe(spec: VariantSpec) -> VariantPlan:
    """One shared table of ``rows`` x ``block`` floats; ``fbgemm_width(dim) / block`` hashed blocks per
    id, the last cut to the dim.

    The block stays a multiple of 4, so the shared table is not padded: a block of another width
    would pad every row of the array, where a last block cut short (at most 3 floats) wastes no
    stored float (the other blocks read those floats whole). The one exception is one block per
    id (``block`` = ``fbgemm_width(dim)``): the table is then ``dim`` wide and padded in training
    like any other table. The budget counts the table as training holds it (``robe_rows``)."""
    params: RobeParams = spec.params
    z = params.block or (8 if spec.dim % 8 == 0 else 4)
    covered = fbgemm_width(spec.dim)  # the dim itself when it is a multiple of 4
    if z < 4 or z % 4 or covered % z:
        where = f"embedding.dim={spec.dim}" if covered == spec.dim else \
            f"{covered} (embedding.dim={spec.dim} rounded up to a multiple of 4; the last block is cut to the dim)"
        raise ConfigError(
            f"embedding.params.block={z}: must be a multiple of 4 (FBGEMM) that divides {where}; "
            f"a block of another width would pad every row of the shared array"
        )
    nb = covered // z
    if nb == 1:
        # One block per id: every read would be cut, so the floats past the dim would be read by
        # nobody. The table is then ``dim`` wide and training pads it, which reports those as padding.
        z = spec.dim
    target = None
    if spec.budget is None:
        if params.rows < 1:
            raise ConfigError(f"embedding.params.rows={params.rows}: must be >= 1")
        rows = params.rows
    else:
        target = budget_bytes(spec.budget, sum(spec.vocab.values()) * spec.dim * BYTES_PER_FLOAT)
        rows = robe_rows(target, z)
    keys = block_keys(spec.names, nb)
    blocks = {
        f: [{"key": keys[fi * nb + j], "seed": salted_seed(spec.seed, fi, j)} for j in range(nb)]
        for fi, f in enumerate(spec.names)
    }
    return spec.plan(
        "robe", [spec.table("robe", rows, z, keys)],
        transform=TransformPlan("robe_z", {"rows": rows, "signed": params.signed, "blocks": blocks,
                                           "hash": spec.hash_name},
                                weighted=params.signed),
        combiner=CombinerPlan("block_concat", {"blocks": {f: [b["key"] for b in blocks[f]] for f in spec.names},
                                               "width": z, **({"dim": spec.dim} if covered != spec.dim else {})}),
        budget={"solver": "robe_rows", "budget": spec.budget, "target_bytes": target, "block": z, "rows": rows},
    )
