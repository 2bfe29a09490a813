"""The one embedding-layer interface every variant implements.

A variant is (1) an ``IdTransform`` from logical ids to ids in physical tables,
(2) physical tables as torchrec ``EmbeddingBagConfig``s (so the planner shards them
and FBGEMM runs them), (3) a ``Combiner`` from physical lookups to one pooled
vector per logical feature. Variants that are not tables subclass
``EmbeddingLayer`` directly and keep the same forward contract.

Example:
    >>> layer = build_embedding_layer(fm, EmbeddingConfig(kind="full", dim=16))  # doctest: +SKIP
    >>> kt = layer(batch.sparse)          # KeyedTensor, one [B, d] block per feature
    >>> layer.stack(kt).shape             # [B, F, d] when all dims agree
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recemb.embeddings.plan import BYTES_PER_FLOAT, VariantPlan


class IdTransform(nn.Module, abc.ABC):
    """Pure, deterministic map from a KJT of logical ids to a KJT over physical tables.

    Every transform is built from its plan (``from_plan``), the same data the numpy twin in
    ``recemb.serving.transforms`` applies, so training and serving map ids alike. Register a
    subclass for its ``TransformPlan.kind`` with ``register_transform``.
    """

    @classmethod
    def from_plan(cls, plan: VariantPlan, device: torch.device | None = None) -> IdTransform:
        """The transform ``plan.transform`` describes (arrays from ``plan.arrays``)."""
        raise NotImplementedError(f"{cls.__name__} has no from_plan")

    @abc.abstractmethod
    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Return the physical-id KJT (keys are the physical tables' feature names)."""


class Combiner(nn.Module):
    """From physical lookups to one vector per logical feature; identity by default.

    Built from its plan (``from_plan``); register a subclass for its ``CombinerPlan.kind``
    with ``register_combiner``."""

    @classmethod
    def from_plan(cls, plan: VariantPlan, device: torch.device | None = None) -> Combiner:
        """The combiner ``plan.combiner`` describes."""
        return cls()

    def forward(self, pooled: KeyedTensor) -> KeyedTensor:
        return pooled

    def combine(self, keys: list[str], blocks: list[torch.Tensor]) -> KeyedTensor:
        """``forward`` of the pooled ``blocks`` (one ``[B, width]`` per physical key) laid side by side.

        The unsharded lookup (``pooled_blocks``) calls this with the blocks as they come, so a
        combiner that reduces blocks (sums, products, projections) overrides it to skip the copy
        of every part into one tensor first; the result must equal ``forward``'s.
        """
        return self(KeyedTensor(keys=keys, length_per_key=[b.shape[1] for b in blocks], values=torch.cat(blocks, 1)))

    gathers = False  # ``lookup`` gathers single-hot batches' rows (``gathered_blocks``) for ``combine``

    def lookup(self, ebc: EmbeddingBagCollection, kjt: KeyedJaggedTensor) -> KeyedTensor | None:
        """The combined output of the unsharded collection ``ebc`` on the physical ``kjt`` computed
        directly, or None to have ``pooled_blocks`` and ``combine`` compute it.

        A combiner whose batches often have bags of at most one id (single-hot data) can gather
        the rows itself instead of pooling ``tables x batch`` bags; it must return exactly what
        ``combine`` gives on the collection's blocks, and None whenever it cannot. With ``gathers``
        set, without autograd, a batch of one id per bag is ``combine`` of its gathered rows
        (``gathered_blocks``); by default (``full``, ``hashed``: the identity) None."""
        if not self.gathers or torch.is_grad_enabled():
            return None
        blocks = gathered_blocks(ebc, kjt)
        return None if blocks is None else self.combine(kjt.keys(), blocks)

    def lookup_logical(self, transform: IdTransform, ebc: EmbeddingBagCollection,
                       kjt: KeyedJaggedTensor) -> KeyedTensor | None:
        """The layer's output on the *logical* ``kjt`` (before ``transform``) computed directly from
        the unsharded ``ebc``, or None to run the transform and ``lookup``/``combine``.

        For a variant whose physical KJT is costly to build and to pool (MDE's frequency blocks
        give every id one of several tables, so most of the physical bags are empty): without
        autograd it may route the ids and gather their rows itself. It must return what the
        transform, the collection and ``combine`` give (the same sums; BLAS may round a product
        over fewer rows differently in the last bit). None by default."""
        return None


_TRANSFORMS: dict[str, type[IdTransform]] = {}
_COMBINERS: dict[str, type[Combiner]] = {"identity": Combiner}
T = TypeVar("T")


def register_transform(kind: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: the torch transform of ``TransformPlan.kind == kind``."""
    def wrap(cls: type[T]) -> type[T]:
        _TRANSFORMS[kind] = cls  # type: ignore[assignment]
        return cls
    return wrap


def register_combiner(kind: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: the torch combiner of ``CombinerPlan.kind == kind``."""
    def wrap(cls: type[T]) -> type[T]:
        _COMBINERS[kind] = cls  # type: ignore[assignment]
        return cls
    return wrap


def transform_from_plan(plan: VariantPlan, device: torch.device | None = None) -> IdTransform:
    """The registered torch transform for ``plan.transform.kind``."""
    cls = _TRANSFORMS.get(plan.transform.kind)
    if cls is None:
        raise KeyError(f"no torch transform registered for kind '{plan.transform.kind}'")
    return cls.from_plan(plan, device)


def combiner_from_plan(plan: VariantPlan, device: torch.device | None = None) -> Combiner:
    """The registered torch combiner for ``plan.combiner.kind``."""
    cls = _COMBINERS.get(plan.combiner.kind)
    if cls is None:
        raise KeyError(f"no torch combiner registered for kind '{plan.combiner.kind}'")
    return cls.from_plan(plan, device)


@register_transform("identity")
class IdentityTransform(IdTransform):
    """Logical ids are physical ids (the ``full`` variant)."""

    @classmethod
    def from_plan(cls, plan: VariantPlan, device: torch.device | None = None) -> IdentityTransform:
        return cls()

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return kjt


@torch.fx.wrap
def in_order(pooled: KeyedTensor, features: list[str]) -> KeyedTensor:
    """``pooled`` with its keys in ``features`` order.

    A sharded collection returns its features grouped by sharding (table-wise
    tables of rank 0 first, ...), not in config order; models rely on the order.
    Wrapped for torch.fx: torchrec's train pipeline traces the model, and the key
    check is data-independent but not traceable.
    """
    if pooled.keys() == features:
        return pooled
    parts = pooled.to_dict()
    return KeyedTensor.from_tensor_list(features, [parts[f] for f in features])


def split_by_key(kjt: KeyedJaggedTensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(values, lengths)`` of each key of ``kjt``, in key order (views, no copies)."""
    keys = kjt.keys()
    lengths = kjt.lengths().view(len(keys), -1)
    values = torch.split(kjt.values(), kjt.length_per_key())
    return [(values[i], lengths[i]) for i in range(len(keys))]


def join_keys(keys: list[str], parts: list[tuple[torch.Tensor, torch.Tensor]], stride: int) -> KeyedJaggedTensor:
    """A KJT from per-key ``(values, lengths)`` (the inverse of ``split_by_key``)."""
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.cat([v for v, _ in parts]),
        lengths=torch.cat([n for _, n in parts]),
        stride=stride,
    )


def concat_keyed(pooled: KeyedTensor, groups: dict[str, list[str]]) -> KeyedTensor:
    """One block per output key: the concatenation of ``pooled``'s blocks listed for it.

    Combiners of chunked variants (unified, ROBE) use it; the input key order may
    be anything (sharded collections reorder), the output follows ``groups``.
    """
    flat = [k for ks in groups.values() for k in ks]
    if pooled.keys() == flat:  # the blocks already lie in order (``pooled_lookup``): no copy
        width = dict(zip(flat, pooled.length_per_key(), strict=True))
        return KeyedTensor(keys=list(groups), length_per_key=[sum(width[k] for k in ks) for ks in groups.values()],
                           values=pooled.values())
    parts = pooled.to_dict()
    blocks = [parts[k] for k in flat]
    widths = [sum(parts[k].shape[1] for k in ks) for ks in groups.values()]
    return KeyedTensor(keys=list(groups), length_per_key=widths, values=torch.cat(blocks, dim=1))


@dataclass(frozen=True)
class LayerBytes:
    """Parameter bytes of a layer next to the full-table baseline at the same dims."""

    achieved: int
    full: int

    @property
    def ratio(self) -> float:
        """achieved / full (1.0 for the full variant)."""
        return self.achieved / self.full if self.full else float("nan")


class EmbeddingLayer(nn.Module, abc.ABC):
    """Sparse features in (KJT of logical ids), one pooled vector per feature out.

    ``features`` is the logical feature order of the output; ``dims`` each
    feature's output width. ``full_rows`` maps each feature to its logical id
    range, the baseline for ``bytes()``.
    """

    features: list[str]
    dims: dict[str, int]
    full_rows: dict[str, int]
    plan: VariantPlan | None = None  # set by the assembler (None for wrappers: grouped, projected)

    @abc.abstractmethod
    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings keyed by logical feature, in ``self.features`` order."""

    def parameter_bytes(self) -> int:
        """Bytes of every parameter and buffer this layer holds (its storage)."""
        total = sum(p.numel() * p.element_size() for p in self.parameters())
        total += sum(b.numel() * b.element_size() for b in self.buffers())
        return total

    def full_bytes(self) -> int:
        """Bytes of the uncompressed baseline: one fp32 row per logical id at ``dims``."""
        return sum(self.full_rows[f] * self.dims[f] * BYTES_PER_FLOAT for f in self.features)

    def bytes(self) -> LayerBytes:
        """Achieved bytes and the full-table baseline."""
        return LayerBytes(achieved=self.parameter_bytes(), full=self.full_bytes())

    def stack(self, pooled: KeyedTensor) -> torch.Tensor:
        """``[B, F, d]`` view of the output; all features must share one dim."""
        dims = {self.dims[f] for f in self.features}
        if len(dims) != 1:
            raise ValueError(f"features have different dims {sorted(dims)}: ask the layer to project")
        return pooled.values().view(-1, len(self.features), dims.pop())


def reset_buffers(module: nn.Module) -> None:
    """Call ``reset_buffers()`` on every submodule that has one.

    A model built on the meta device loses its buffers' contents (remap arrays,
    hot-id tables): ``DistributedModelParallel`` materialises them as zeros.
    Modules that hold such buffers keep the source data as numpy arrays and
    refill the buffers here; ``shard_model`` calls this after wrapping.
    """
    for m in module.modules():
        fn = getattr(m, "reset_buffers", None)
        if callable(fn):
            fn()


def table_parameter_bytes(tables: list[EmbeddingBagConfig]) -> int:
    """fp32 bytes of a list of physical tables (works on meta/sharded modules too)."""
    return sum(t.num_embeddings * t.embedding_dim * BYTES_PER_FLOAT for t in tables)


FBGEMM_WIDTH = 4  # FBGEMM's fused kernels need table widths (and column shards) divisible by this


def fbgemm_width(dim: int) -> int:
    """The physical width a ``dim``-wide table gets: ``dim`` rounded up to a multiple of ``FBGEMM_WIDTH``.

    Example:
        >>> [fbgemm_width(d) for d in (1, 4, 10, 16)]
        [4, 4, 12, 16]
    """
    return -(-dim // FBGEMM_WIDTH) * FBGEMM_WIDTH


def padded_tables(tables: list[EmbeddingBagConfig]) -> list[EmbeddingBagConfig]:
    """``tables`` with every width padded to ``fbgemm_width`` (the rest unchanged)."""
    return [t if t.embedding_dim == fbgemm_width(t.embedding_dim)
            else dataclasses.replace(t, embedding_dim=fbgemm_width(t.embedding_dim)) for t in tables]


@torch.fx.wrap
def unpad(pooled: KeyedTensor, widths: dict[str, int]) -> KeyedTensor:
    """``pooled`` with each key's block cut back to ``widths[key]`` columns (keys not listed stay whole)."""
    parts = pooled.to_dict()
    keys = pooled.keys()
    return KeyedTensor.from_tensor_list(keys, [parts[k][:, :widths[k]] if k in widths else parts[k] for k in keys])


def table_configs(plan: VariantPlan) -> list[EmbeddingBagConfig]:
    """torchrec configs of ``plan``'s physical tables (sum pooling; normal init where the plan says)."""
    configs = []
    for t in plan.tables:
        init = None if t.init_std is None else functools.partial(nn.init.normal_, mean=t.init_mean, std=t.init_std)
        configs.append(EmbeddingBagConfig(name=t.name, num_embeddings=t.rows, embedding_dim=t.dim,
                                          feature_names=list(t.keys), pooling=PoolingType.SUM, init_fn=init))
    return configs


def jagged(keys: list[str], values: torch.Tensor, lengths: torch.Tensor, stride: int, length_per_key: list[int],
           weights: torch.Tensor | None = None) -> KeyedJaggedTensor:
    """A KJT whose per-key lengths are given (python ints the caller already knows), so neither the
    collection nor ``pooled_lookup`` sums the lengths again.

    Example:
        >>> jagged(["a", "b"], torch.tensor([4, 5, 6]), torch.tensor([1, 0, 1, 1]), 2, [1, 2]).offset_per_key()
        [0, 1, 3]
    """
    return KeyedJaggedTensor(keys=keys, values=values, weights=weights, lengths=lengths, stride=stride,
                             length_per_key=length_per_key,
                             offset_per_key=[0, *itertools.accumulate(length_per_key)])


def one_id_per_bag(lengths: torch.Tensor, ids: int) -> bool:
    """True when every bag holds exactly one id, given ``lengths`` (non-negative) that sum to ``ids``
    (as a KJT's do): as many bags as ids and no bag with two. One max instead of a comparison
    pass and a reduction.

    Example:
        >>> one_id_per_bag(torch.tensor([1, 1, 1]), 3), one_id_per_bag(torch.tensor([2, 0, 1]), 3)
        (True, False)
    """
    return lengths.numel() == ids > 0 and int(lengths.max()) == 1


def by_key(per_key: torch.Tensor, length_per_key: list[int], device: torch.device) -> torch.Tensor:
    """``per_key[k]`` repeated for each of key ``k``'s values: a per-key constant (hash seed, row
    count, table index) gathered by segment, so one tensor op covers every key of a KJT.

    Example:
        >>> by_key(torch.tensor([7, 9]), [2, 1], torch.device("cpu")).tolist()
        [7, 7, 9]
    """
    repeats = torch.tensor(length_per_key, device=device)
    return per_key.to(device).repeat_interleave(repeats, output_size=sum(length_per_key))


def regroup(kjt: KeyedJaggedTensor, sources: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Values, lengths and per-key lengths of a KJT whose key ``k`` is a copy of ``kjt``'s key
    ``sources[k]`` (keys may repeat or be left out): the physical layout of a transform that
    gives a logical feature several keys (chunks, quotient and remainder), built in one pass.

    Example:
        >>> kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([1, 1, 1, 0]))
        >>> values, lengths, per_key = regroup(kjt, [0, 0, 1])
        >>> values.tolist(), lengths.tolist(), per_key
        ([1, 2, 1, 2, 3], [1, 1, 1, 1, 1, 0], [2, 2, 1])
    """
    values, starts, per_key = kjt.values(), kjt.offset_per_key(), kjt.length_per_key()
    out = torch.cat([values[starts[i]:starts[i + 1]] for i in sources])
    index = torch.tensor(sources, device=values.device)
    lengths = kjt.lengths().view(len(per_key), -1).index_select(0, index).reshape(-1)
    return out, lengths, [per_key[i] for i in sources]


@dataclass(frozen=True)
class _Run:
    """Adjacent keys ``[first, last)`` of the physical KJT that one table pools in one call."""

    table: str
    first: int
    last: int
    dim: int


def _lookup_runs(ebc: EmbeddingBagCollection, keys: list[str]) -> list[_Run] | None:
    """The KJT's keys in order, grouped into runs of adjacent keys of one table; None when a key
    feeds two tables (torchrec then names the outputs ``key@table``) or none."""
    table_of: dict[str, tuple[str, int]] = {}
    for c in ebc.embedding_bag_configs():
        for f in c.feature_names:
            if f in table_of:
                return None
            table_of[f] = (c.name, c.embedding_dim)
    if any(k not in table_of for k in keys):
        return None
    runs: list[_Run] = []
    for i, k in enumerate(keys):
        table, dim = table_of[k]
        if runs and runs[-1].table == table:
            runs[-1] = _Run(table, runs[-1].first, i + 1, dim)
        else:
            runs.append(_Run(table, i, i + 1, dim))
    return runs


# Per collection (weakly held: a dropped layer takes its entry along), per KJT key order.
_RUNS: weakref.WeakKeyDictionary[EmbeddingBagCollection, dict[tuple[str, ...], list[_Run] | None]] = (
    weakref.WeakKeyDictionary())


_FEW_RUNS = 4  # up to this many runs, ``pooled_blocks`` offsets each run's bags on its own


def _runs_of(ebc: EmbeddingBagCollection, kjt: KeyedJaggedTensor) -> list[_Run] | None:
    """The runs of ``kjt``'s keys (cached per collection and key order); None where the collection
    must run itself (see ``pooled_blocks``)."""
    keys = tuple(kjt.keys())
    known = _RUNS.setdefault(ebc, {})
    if keys not in known:
        known[keys] = _lookup_runs(ebc, list(keys))
    runs = known[keys]
    return None if runs is None or kjt.inverse_indices_or_none() is not None else runs


def gathered_blocks(ebc: EmbeddingBagCollection, kjt: KeyedJaggedTensor) -> list[torch.Tensor] | None:
    """``pooled_blocks``' blocks when every bag holds exactly one id (single-hot batches): each run's
    rows gathered, one ``[B, width]`` per key (in a weighted collection, pooled with a bag per id:
    the kernel scales the rows faster than a broadcast product after a gather). None when some
    bag holds another count, or where ``pooled_blocks`` is None.

    A bag of one id pools to its row (times its weight): bit for bit the collection's blocks,
    without the offsets of the bags (a cumulative sum over all of them) or the per-bag pooling.
    The gradient's accumulation order may differ from the pooled path's, so use it without
    autograd (``Combiner.lookup`` does).
    """
    runs = _runs_of(ebc, kjt)
    values = kjt.values()
    if runs is None or not one_id_per_bag(kjt.lengths(), values.numel()):
        return None
    batch, starts = kjt.stride(), kjt.offset_per_key()
    weights = kjt.weights_or_none() if ebc.is_weighted() else None
    blocks: list[torch.Tensor] = []
    for run in runs:
        lo, hi = starts[run.first], starts[run.last]
        weight = ebc.embedding_bags[run.table].weight.detach()
        if weights is None:
            rows = weight.index_select(0, values[lo:hi])
        else:  # the pooling kernel scales rows in its pass; a bag per id, whose offsets need no sum
            rows = F.embedding_bag(values[lo:hi], weight, torch.arange(hi - lo, device=values.device),
                                   mode="sum", per_sample_weights=weights[lo:hi])
        blocks += list(rows.split(batch)) if run.last - run.first > 1 else [rows]
    return blocks


def key_weights(ebc: EmbeddingBagCollection, keys: list[str]) -> list[torch.Tensor] | None:
    """The weight of the table that reads each of ``keys`` in the unsharded ``ebc`` (the parameter
    itself: for lookups without autograd); None where a key feeds two tables or none (cached per
    collection and key order, as ``pooled_blocks``' runs are).

    Example:
        >>> key_weights(layer.ebc, ["user__m0"])[0].shape                         # doctest: +SKIP
        torch.Size([165, 4])
    """
    known = _RUNS.setdefault(ebc, {})
    order = tuple(keys)
    if order not in known:
        known[order] = _lookup_runs(ebc, list(order))
    runs = known[order]
    if runs is None:
        return None
    out: list[torch.Tensor] = []
    for run in runs:
        out += [ebc.embedding_bags[run.table].weight] * (run.last - run.first)
    return out


def pooled_blocks(ebc: EmbeddingBagCollection, kjt: KeyedJaggedTensor) -> list[torch.Tensor] | None:
    """``ebc(kjt)``'s pooled blocks, one ``[B, width]`` per key of ``kjt`` in its key order, with
    one ``embedding_bag`` per run of a table's adjacent keys; None where ``ebc`` must run itself
    (a key read by two tables, a key no table reads).

    torchrec's unsharded collection makes a ``JaggedTensor`` and an offsets cumsum per key, calls
    its table once per key and copies every block side by side; a variant with many physical keys
    (chunks, blocks, quotient and remainder) pays that per key and its combiner then takes the
    blocks apart again. Here the KJT's offsets are sliced instead, keys adjacent in the KJT that
    read one table (ROBE's blocks, hybrid's cold keys) are one call, and the combiner gets the
    blocks (``Combiner.combine``). Each bag sums the same rows in the same order: bit-identical to
    the collection, and the gradient flows to the same weights. Without autograd the weights go
    in detached, which takes PyTorch's forward-only kernel (no bookkeeping for a backward).

    Example:
        >>> blocks = pooled_blocks(layer.ebc, kjt)                                 # doctest: +SKIP
        >>> torch.equal(torch.cat(blocks, 1), layer.ebc(kjt).values())            # one table per key
        True
    """
    runs = _runs_of(ebc, kjt)
    if runs is None:
        return None
    batch = kjt.stride()
    values, starts = kjt.values(), kjt.offset_per_key()
    # Each bag's start within its run's slice of the values; the last bag of a run ends where the
    # slice does. Many runs: one subtraction for all keys. Few (ROBE's one table, whose run starts
    # at 0): a subtraction per run that does not start at 0, or none.
    offsets = kjt.offsets()[:-1].view(len(starts) - 1, batch)
    offsets = offsets.to(torch.promote_types(offsets.dtype, values.dtype))  # the type the subtraction gave
    if len(runs) > _FEW_RUNS:
        run_start = torch.tensor([starts[r.first] for r in runs for _ in range(r.first, r.last)],
                                 device=values.device)
        offsets = offsets - run_start.view(-1, 1).to(offsets.dtype)
    weights = kjt.weights_or_none() if ebc.is_weighted() else None
    grad = torch.is_grad_enabled()
    blocks: list[torch.Tensor] = []
    for run in runs:
        lo, hi = starts[run.first], starts[run.last]
        bag_starts = offsets[run.first:run.last].view(-1)
        if lo and len(runs) <= _FEW_RUNS:
            bag_starts = bag_starts - lo
        weight = ebc.embedding_bags[run.table].weight
        pooled = F.embedding_bag(
            values[lo:hi], weight if grad else weight.detach(), bag_starts,
            mode="sum", per_sample_weights=None if weights is None else weights[lo:hi],
        )
        blocks += list(pooled.split(batch)) if run.last - run.first > 1 else [pooled]
    return blocks


class TableEmbeddingLayer(EmbeddingLayer):
    """Transform -> torchrec ``EmbeddingBagCollection`` -> combiner.

    This is the shape of every table-backed variant. The collection is an
    ordinary torchrec module, so ``DistributedModelParallel`` shards it and swaps
    in FBGEMM's fused kernels; the transform and combiner stay dense modules.
    Bytes are computed from the table configs, so they are right on the meta
    device and after sharding as well. ``from_plan`` builds one from a variant's plan
    (which it keeps as ``plan``: the sharding and export read it).

    FBGEMM's fused kernels run only widths divisible by 4. Before sharding, ``pad_for_fbgemm``
    holds a table of another width (``embedding.dim=10``) ``fbgemm_width`` wide (12:
    ``physical_tables``, what the collection then holds) and its lookups are cut back to the
    width the plan gives (``tables``) before the combiner. The padding columns get no gradient
    and count in the bytes (``parameter_bytes`` is physical; ``padding_bytes`` says how many);
    checkpoints keep the plan's widths (``recemb.train.checkpoint``). Row-wise Adagrad
    averages squared gradients over the physical width, so a padded row's steps are
    ``sqrt(12/10)`` times those of an unpadded one. Unsharded, any width runs as it is.
    """

    @classmethod
    def from_plan(cls, plan: VariantPlan, device: torch.device | None = None) -> TableEmbeddingLayer:
        """The layer ``plan`` describes: its transform, tables and combiner."""
        layer = cls(
            features=plan.features, dims=plan.dims, full_rows=plan.full_rows, tables=table_configs(plan),
            transform=transform_from_plan(plan, device), combiner=combiner_from_plan(plan, device),
            device=device, is_weighted=plan.transform.weighted,
        )
        layer.plan = plan
        return layer

    def __init__(
        self,
        features: list[str],
        dims: dict[str, int],
        full_rows: dict[str, int],
        tables: list[EmbeddingBagConfig],
        transform: IdTransform | None = None,
        combiner: Combiner | None = None,
        device: torch.device | None = None,
        is_weighted: bool = False,
    ) -> None:
        super().__init__()
        self.features = list(features)
        self.dims = dict(dims)
        self.full_rows = dict(full_rows)
        self.tables = list(tables)
        self.physical_tables = list(self.tables)  # pad_for_fbgemm widens them
        self.widths: dict[str, int] = {}  # lookup keys of padded tables -> their plan's width
        self.transform = transform or IdentityTransform()
        # Weighted: the transform's KJT carries a weight per id (e.g. ROBE's sign hash).
        self.ebc = EmbeddingBagCollection(tables=self.tables, is_weighted=is_weighted, device=device)
        self.combiner = combiner or Combiner()
        self._identity = isinstance(self.transform, IdentityTransform)

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        # Unsharded, the collection is torchrec's reference module (a Python loop over keys with a
        # JaggedTensor per key); pooled_blocks runs the same embedding_bag calls, a table's adjacent
        # keys in one, and hands the blocks to the combiner. DistributedModelParallel swaps in a
        # sharded collection (and padding comes with sharding): that runs as it is.
        direct_ok = type(self.ebc) is EmbeddingBagCollection and not self.widths
        if direct_ok and not self._identity and not torch.is_grad_enabled():
            fused = self.combiner.lookup_logical(self.transform, self.ebc, kjt)
            if fused is not None:
                return in_order(fused, self.features)
        physical = kjt if self._identity else self.transform(kjt)
        if direct_ok:
            direct = self.combiner.lookup(self.ebc, physical)
            if direct is not None:
                return in_order(direct, self.features)
            blocks = pooled_blocks(self.ebc, physical)
            if blocks is not None:
                return in_order(self.combiner.combine(physical.keys(), blocks), self.features)
        pooled = self.ebc(physical)
        if self.widths:
            pooled = unpad(pooled, self.widths)
        return in_order(self.combiner(pooled), self.features)

    def parameter_bytes(self) -> int:
        dense = sum(p.numel() * p.element_size() for p in self.combiner.parameters())
        dense += sum(b.numel() * b.element_size() for b in self.transform.buffers())
        return table_parameter_bytes(self.physical_tables) + dense

    def padding_bytes(self) -> int:
        """Bytes of the padding columns that widths not divisible by 4 need (0 for most layers)."""
        return table_parameter_bytes(self.physical_tables) - table_parameter_bytes(self.tables)

    def pad_for_fbgemm(self) -> dict[str, int]:
        """Hold every table ``fbgemm_width`` wide (call before sharding); returns the padded tables'
        plan widths by table name (empty: nothing needed padding). Weights already in the layer
        (not on the meta device) are kept in the first columns."""
        physical = padded_tables(self.tables)
        if physical == self.physical_tables:
            return {}
        self.ebc, self.physical_tables = repadded(self.ebc, self.tables, physical), physical
        padded = {t.name: t.embedding_dim for t in self.tables if t.embedding_dim != fbgemm_width(t.embedding_dim)}
        self.widths = {k: t.embedding_dim for t in self.tables if t.name in padded for k in t.feature_names}
        return padded


def repadded(ebc: EmbeddingBagCollection, tables: list[EmbeddingBagConfig],
             physical: list[EmbeddingBagConfig]) -> EmbeddingBagCollection:
    """``ebc`` (holding ``tables``) rebuilt with the ``physical`` (padded) tables, each table's
    weights in its first columns (nothing to copy on the meta device): the shared step of the
    layers' ``pad_for_fbgemm``."""
    out = EmbeddingBagCollection(tables=physical, is_weighted=ebc.is_weighted(), device=ebc.device)
    if ebc.device.type != "meta":
        with torch.no_grad():
            for t in tables:
                out.embedding_bags[t.name].weight[:, :t.embedding_dim].copy_(ebc.embedding_bags[t.name].weight)
    return out


def pad_for_fbgemm(model: nn.Module) -> dict[str, int]:
    """``TableEmbeddingLayer.pad_for_fbgemm`` on every table layer of ``model`` (before sharding), and
    on the layers with a collection of their own that pad it alike (``PrunedLayer``).

    Returns the model state key of every padded table's weight (``<layer>.ebc.embedding_bags.
    <table>.weight``) with its plan width, for checkpoints to keep that width.

    Example:
        >>> pad_for_fbgemm(model)                                        # doctest: +SKIP
        {'model.embedding.ebc.embedding_bags.t_C1.weight': 10, ...}
    """
    out: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, EmbeddingLayer) and callable(getattr(module, "pad_for_fbgemm", None)):
            prefix = f"{name}." if name else ""
            for table, width in module.pad_for_fbgemm().items():
                out[f"{prefix}ebc.embedding_bags.{table}.weight"] = width
    return out


class ProjectedLayer(EmbeddingLayer):
    """Wraps any layer and projects each feature whose dim differs to ``dim``.

    Models that need one common dim (FM, DLRM's dot interaction) get it this way
    from variants with per-feature dims; the projections count in ``bytes()``.

    Example:
        >>> layer = ProjectedLayer(mixed_dim_layer, dim=16)   # doctest: +SKIP
    """

    def __init__(self, inner: EmbeddingLayer, dim: int) -> None:
        super().__init__()
        self.inner = inner
        self.features = list(inner.features)
        self.dims = {f: dim for f in self.features}
        self.full_rows = dict(inner.full_rows)
        self.proj = nn.ModuleDict(
            {f: nn.Linear(inner.dims[f], dim, bias=False) for f in self.features if inner.dims[f] != dim}
        )

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        pooled = self.inner(kjt)
        if not self.proj:
            return pooled
        parts = pooled.to_dict()
        out = [self.proj[f](parts[f]) if f in self.proj else parts[f] for f in self.features]
        return KeyedTensor.from_tensor_list(self.features, out)

    def parameter_bytes(self) -> int:
        return self.inner.parameter_bytes() + sum(p.numel() * p.element_size() for p in self.proj.parameters())

    def full_bytes(self) -> int:
        return self.inner.full_bytes()


class GroupedEmbeddingLayer(EmbeddingLayer):
    """Several layers, each over its own features (per-group variants), as one layer."""

    def __init__(self, layers: dict[str, EmbeddingLayer], features: list[str]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.features = list(features)
        self.dims = {f: d for layer in layers.values() for f, d in layer.dims.items()}
        self.full_rows = {f: r for layer in layers.values() for f, r in layer.full_rows.items()}

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        keys = kjt.keys()
        index = {k: i for i, k in enumerate(keys)}
        pooled: list[KeyedTensor] = []
        for layer in self.layers.values():
            sub = kjt.permute([index[f] for f in layer.features])
            pooled.append(layer(sub))
        values = torch.cat([p.values() for p in pooled], dim=1)
        out = KeyedTensor(
            keys=[k for p in pooled for k in p.keys()],
            length_per_key=[n for p in pooled for n in p.length_per_key()],
            values=values,
        )
        return in_order(out, self.features)

    def parameter_bytes(self) -> int:
        return sum(layer.parameter_bytes() for layer in self.layers.values())

    def full_bytes(self) -> int:
        return sum(layer.full_bytes() for layer in self.layers.values())
