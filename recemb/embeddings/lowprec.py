"""The ``lowprec`` variant: tables trained in int8/int16 (ALPT-style, Li et al., AAAI 2023).

Rows live only as integer codes ``q`` with a step size ``s`` per row (or per table);
a lookup dequantises ``w = q * s`` and sum-pools each bag. The backward pass updates
the looked-up rows in place (like FBGEMM's fused optimizers): an fp32 step from the
row gradients (row-wise Adagrad or SGD, ``lr``), then stochastic rounding back to
integers, so no fp32 copy of the table ever exists. A learned step size is a dense
parameter (trained by the dense optimizer, averaged by DDP). Data parallel: each
rank holds the whole table; backward all-gathers the touched rows' gradients so every
rank applies the same update with the same (step-seeded) random rounding.

The builder plans (``storage: module``): ``params`` hold the resolved settings (bits,
scale mode, lr, init seed) and each feature's row offset in the stacked table;
``recemb.serving.variants.lowprec`` dequantises the codes in numpy.

Example (YAML):
    embedding: {kind: lowprec, dim: 16, params: {bits: 8, scale: learned}}
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recemb.embeddings.base import EmbeddingLayer, in_order
from recemb.embeddings.budget import TOLERANCE, BudgetError, budget_bytes, full_bytes
from recemb.embeddings.hashing import salted_seed
from recemb.embeddings.plan import VariantPlan
from recemb.embeddings.registry import VariantSpec, register_module_assembler, register_variant
from recemb.errors import ConfigError

INT_DTYPES = {8: torch.int8, 16: torch.int16}
SCALE_BYTES = 4  # one fp32 (log) step size per row or per table
DEFAULT_LR = 0.01  # embedding.lr's default, used when neither params.lr nor the spec gives one
DEFAULT_INIT_STD = 0.01
_INIT_CHUNK_ROWS = 1 << 20  # initialise big tables in chunks to bound the fp32 scratch


@dataclass
class LowPrecParams:
    """Low-precision training settings.

    ``bits``: 8 or 16 per element. ``scale``: ``learned`` (a dense parameter, in log
    space so Adam's steps are relative) or ``fixed``. ``scale_per``: ``row`` or
    ``table``. ``max_abs``: the initial range, ``s0 = max_abs / (2**(bits-1) - 1)``
    (with a fixed scale, values beyond it are clipped). ``optimizer``:
    ``rowwise_adagrad`` (FBGEMM's exact row-wise rule, one fp32 accumulator per row)
    or ``sgd``. ``lr``: the row update's learning rate (None: ``embedding.lr`` when
    the builder receives it, else 0.01); ``eps``: Adagrad's epsilon.
    """

    bits: int = 8
    scale: str = "learned"
    scale_per: str = "row"
    max_abs: float = 0.1
    optimizer: str = "rowwise_adagrad"
    lr: float | None = None
    eps: float = 1e-8


def max_code(bits: int) -> int:
    """Largest integer code; codes are symmetric, in ``[-max_code, max_code]``."""
    return 2 ** (bits - 1) - 1


def lowprec_bytes(rows: Sequence[int], dim: int, bits: int, per_row: bool) -> int:
    """Storage of ``lowprec`` tables: ``bits``-bit codes plus fp32 step sizes (per row or per table).

    Example:
        >>> lowprec_bytes([100, 50], dim=16, bits=8, per_row=True)   # 150 * (16 + 4)
        3000
    """
    total = sum(rows)
    return total * dim * bits // 8 + (total if per_row else 1) * SCALE_BYTES


def stack_offsets(rows: dict[str, int]) -> dict[str, int]:
    """First row of each feature in the one stacked table (features in ``rows`` order).

    Example:
        >>> stack_offsets({"a": 3, "b": 5, "c": 2})
        {'a': 0, 'b': 3, 'c': 8}
    """
    out, total = {}, 0
    for f, n in rows.items():
        out[f] = total
        total += n
    return out


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``floor(x + u)`` with ``u ~ U[0, 1)``: rounds up with probability ``frac(x)``, so ``E = x``.

    Example:
        >>> stochastic_round(torch.full((100_000,), 0.25)).mean().round(decimals=2)
        tensor(0.2500)
    """
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return torch.floor(x.float() + u)


def gather_rows(ids: torch.Tensor, grads: torch.Tensor, group: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (unique ids, row gradients), summed per id and divided by the world size.

    The result is bit-identical on every rank: the same concatenation (rank order)
    is reduced by the same deterministic kernel. Dividing by the world size gives the
    gradient of the global batch's mean loss, as DDP and torchrec do.
    """
    world = dist.get_world_size(group)
    device = ids.device  # nccl gathers CUDA tensors only: everything stays on the ids' device
    size = torch.tensor([ids.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    most = int(max(int(s) for s in sizes))
    pad_ids = torch.zeros(most, dtype=ids.dtype, device=device)
    pad_ids[: ids.numel()] = ids
    pad_grads = torch.zeros(most, grads.shape[1], dtype=grads.dtype, device=device)
    pad_grads[: ids.numel()] = grads
    all_ids = [torch.empty_like(pad_ids) for _ in range(world)]
    all_grads = [torch.empty_like(pad_grads) for _ in range(world)]
    dist.all_gather(all_ids, pad_ids, group=group)
    dist.all_gather(all_grads, pad_grads, group=group)
    cat_ids = torch.cat([t[: int(n)] for t, n in zip(all_ids, sizes, strict=True)])
    cat_grads = torch.cat([t[: int(n)] for t, n in zip(all_grads, sizes, strict=True)])
    uniq, inverse = torch.unique(cat_ids, return_inverse=True)
    summed = torch.zeros(uniq.numel(), grads.shape[1], dtype=grads.dtype, device=device).index_add_(
        0, inverse, cat_grads)
    return uniq, summed / world


class _LowPrecLookup(torch.autograd.Function):
    """Dequantise + sum-pool forward; backward returns the step size's gradient and updates the codes."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, log_scale: torch.Tensor, rows: torch.Tensor, bags: torch.Tensor, offsets: torch.Tensor,
        layer: LowPrecEmbeddingLayer,
    ) -> torch.Tensor:
        # index_select, not advanced indexing: several times faster on CPU for these gathers.
        codes = layer.table.index_select(0, rows)
        values = codes.to(torch.float32).mul_(layer.scale_of(rows, log_scale))
        pooled = F.embedding_bag(
            torch.arange(rows.numel(), device=rows.device), values, offsets, mode="sum", include_last_offset=True
        )
        ctx.save_for_backward(rows, bags, codes, log_scale)
        ctx.layer = layer
        return pooled

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:  # type: ignore[override]
        rows, bags, codes, log_scale = ctx.saved_tensors
        layer: LowPrecEmbeddingLayer = ctx.layer
        grad_rows = grad_out.index_select(0, bags)  # dL/dw for every looked-up (dequantised) row
        grad_log_scale = None
        if ctx.needs_input_grad[0] and layer.learned:
            # w = q * s with the codes held fixed (the rounding is straight-through):
            # dL/ds = sum(g * q); the parameter is log s, so multiply by s.
            per_lookup = (grad_rows * codes.float()).sum(dim=1)
            if layer.per_row:
                grad_s = torch.zeros_like(log_scale).index_add_(0, rows, per_lookup)
            else:
                grad_s = per_lookup.sum().reshape(log_scale.shape)
            grad_log_scale = grad_s * log_scale.detach().exp()
        layer.apply_update(rows, grad_rows)
        return grad_log_scale, None, None, None, None


class LowPrecEmbeddingLayer(EmbeddingLayer):
    """One integer table over all features (stacked), step sizes, and the in-backward update.

    Not a torchrec table: the planner leaves it to DDP (data parallel). Built on the
    meta device it is materialised by ``reset_parameters`` (step sizes) and
    ``reset_buffers`` (codes regenerated from ``seed``; optimizer state zeroed).
    ``from_plan`` builds it from a plan's ``params``.
    """

    @classmethod
    def from_plan(cls, plan: VariantPlan, device: torch.device | None = None) -> LowPrecEmbeddingLayer:
        """The layer ``plan.params`` describes (freshly initialised codes)."""
        p = plan.params
        dims = set(plan.dims.values())
        if len(dims) != 1:
            raise ValueError(f"lowprec plans have one dim for all features, got {sorted(dims)}")
        rows = {f: plan.full_rows[f] for f in plan.features}
        if p["offsets"] != stack_offsets(rows):
            raise ValueError(f"lowprec plan: offsets {p['offsets']} are not the features stacked in order")
        settings = LowPrecParams(bits=p["bits"], scale=p["scale"], scale_per=p["scale_per"], max_abs=p["max_abs"],
                                 optimizer=p["optimizer"], lr=p["lr"], eps=p["eps"])
        _check_params(settings)
        return cls(rows=rows, dim=dims.pop(), params=settings, lr=p["lr"], init_std=p["init_std"],
                   seed=p["init_seed"], device=device, initial_accumulator=p["initial_accumulator"])

    def __init__(
        self,
        rows: dict[str, int],
        dim: int,
        params: LowPrecParams,
        lr: float,
        init_std: float,
        seed: int,
        device: torch.device | None = None,
        initial_accumulator: float = 0.0,
    ) -> None:
        super().__init__()
        self.features = list(rows)
        self.dims = {f: dim for f in self.features}
        self.full_rows = dict(rows)
        self.dim = dim
        self.bits = params.bits
        self.qmax = max_code(params.bits)
        self.per_row = params.scale_per == "row"
        self.learned = params.scale == "learned"
        self.adagrad = params.optimizer == "rowwise_adagrad"
        self.lr = lr
        self.initial_accumulator = initial_accumulator  # Adagrad's starting row_sq_grad
        self.eps = params.eps
        self.init_std = init_std
        self.seed = seed
        self.log_scale0 = math.log(params.max_abs / self.qmax)
        self.offsets = stack_offsets(rows)
        self.total_rows = total = sum(rows.values())
        self.process_group: Any = None  # None: the default group
        scale_shape = (total if self.per_row else 1,)
        log_scale = torch.empty(scale_shape, dtype=torch.float32, device=device)
        if self.learned:
            self.log_scale = torch.nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.register_buffer("table", torch.empty(total, dim, dtype=INT_DTYPES[params.bits], device=device))
        self.register_buffer("row_sq_grad", torch.empty(total if self.adagrad else 0, device=device))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64, device=device))
        if device is None or device.type != "meta":
            self.reset_parameters()
            self.reset_buffers()

    def no_weight_decay(self) -> list[torch.nn.Parameter]:
        """The learned log step sizes: L2 towards 0 would pull every step size towards 1."""
        return [self.log_scale] if self.learned else []

    def reset_parameters(self) -> None:
        """Every step size back to ``s0`` (DMP calls this after materialising meta parameters)."""
        with torch.no_grad():
            self.log_scale.fill_(self.log_scale0)

    def reset_buffers(self) -> None:
        """Regenerate the codes of N(0, init_std) rows, rounded stochastically, from ``seed``.

        Deterministic and rank-independent, so every data-parallel replica starts equal.
        """
        with torch.no_grad():
            if not self.learned:
                self.log_scale.fill_(self.log_scale0)
            self.row_sq_grad.fill_(self.initial_accumulator)
            self.updates.zero_()
            gen = torch.Generator(device=self.table.device).manual_seed(salted_seed(self.seed, 1))
            s0 = math.exp(self.log_scale0)
            for lo in range(0, self.total_rows, _INIT_CHUNK_ROWS):
                hi = min(lo + _INIT_CHUNK_ROWS, self.total_rows)
                values = torch.randn(hi - lo, self.dim, generator=gen, device=self.table.device) * self.init_std
                codes = stochastic_round(values / s0, gen).clamp_(-self.qmax, self.qmax)
                self.table[lo:hi] = codes.to(self.table.dtype)

    def scale_of(self, rows: torch.Tensor, log_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Step size of each row in ``rows`` as a ``[N, 1]`` (or broadcastable ``[1, 1]``) tensor."""
        log_scale = self.log_scale if log_scale is None else log_scale
        if self.per_row:
            return log_scale.detach().index_select(0, rows).exp().unsqueeze(1)
        return log_scale.exp().view(1, 1)

    def dequantized(self) -> torch.Tensor:
        """The whole table as fp32 values (for export and tests; allocates ``rows x dim`` floats)."""
        with torch.no_grad():
            return self.table.float() * self.scale_of(torch.arange(self.total_rows, device=self.table.device))

    def apply_update(self, rows: torch.Tensor, grad_rows: torch.Tensor) -> None:
        """One optimizer step on the rows in ``rows`` (with repeats), re-quantised stochastically."""
        with torch.no_grad():
            uniq, inverse = torch.unique(rows, return_inverse=True)
            grads = torch.zeros(uniq.numel(), self.dim, dtype=torch.float32, device=grad_rows.device)
            grads.index_add_(0, inverse, grad_rows.float())
            if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
                uniq, grads = gather_rows(uniq, grads, self.process_group)
            if self.adagrad:
                acc = self.row_sq_grad.index_select(0, uniq) + grads.pow(2).mean(dim=1)
                self.row_sq_grad.index_copy_(0, uniq, acc)
                step = grads * (self.lr / (acc.sqrt() + self.eps)).unsqueeze(1)
            else:
                step = grads * self.lr
            # (q * s - step) / s, computed without the round trip through w.
            target = self.table.index_select(0, uniq).float() - step / self.scale_of(uniq)
            gen = torch.Generator(device=self.table.device).manual_seed(
                salted_seed(self.seed, 2, int(self.updates))
            )
            codes = stochastic_round(target, gen).clamp_(-self.qmax, self.qmax)
            self.table.index_copy_(0, uniq, codes.to(self.table.dtype))
            self.updates += 1

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        keys = kjt.keys()
        values, lengths = kjt.values(), kjt.lengths()
        batch = kjt.stride()
        per_key = torch.tensor(kjt.length_per_key(), device=values.device)
        base = torch.tensor([self.offsets[k] for k in keys], dtype=torch.int64, device=values.device)
        rows = values.to(torch.int64) + torch.repeat_interleave(base, per_key)
        lengths = lengths.to(torch.int64)
        bags = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=values.device)
        torch.cumsum(lengths, 0, out=offsets[1:])
        log_scale = self.log_scale
        if not self.learned:
            # The update runs in backward, so the lookup must be in the graph even when
            # nothing it takes is trainable: a fresh leaf that wants a gradient puts it there.
            log_scale = log_scale.detach().requires_grad_(torch.is_grad_enabled())
        pooled = _LowPrecLookup.apply(log_scale, rows, bags, offsets, self)
        out = pooled.view(len(keys), batch, self.dim).transpose(0, 1).reshape(batch, len(keys) * self.dim)
        kt = KeyedTensor(keys=list(keys), length_per_key=[self.dim] * len(keys), values=out)
        return in_order(kt, self.features)

    def parameter_bytes(self) -> int:
        """Codes plus step sizes; the Adagrad accumulator is optimizer state, as for fused tables."""
        return lowprec_bytes(list(self.full_rows.values()), self.dim, self.bits, self.per_row)


def _check_params(p: LowPrecParams) -> None:
    if p.bits not in INT_DTYPES:
        raise ConfigError(f"embedding.params.bits must be 8 or 16, got {p.bits}")
    if p.scale not in ("learned", "fixed"):
        raise ConfigError(f"embedding.params.scale must be 'learned' or 'fixed', got '{p.scale}'")
    if p.scale_per not in ("row", "table"):
        raise ConfigError(f"embedding.params.scale_per must be 'row' or 'table', got '{p.scale_per}'")
    if p.optimizer not in ("rowwise_adagrad", "sgd"):
        raise ConfigError(f"embedding.params.optimizer must be 'rowwise_adagrad' or 'sgd', got '{p.optimizer}'")
    if not p.max_abs > 0:
        raise ConfigError(f"embedding.params.max_abs must be > 0, got {p.max_abs}")
    if p.lr is not None and not p.lr > 0:
        raise ConfigError(f"embedding.params.lr must be > 0, got {p.lr}")


@register_variant("lowprec", LowPrecParams)
def plan_lowprec(spec: VariantSpec) -> VariantPlan:
    """An int8/int16 table over ``spec.features``; its bytes are fixed by ``bits`` and ``scale_per``.

    A ``budget`` does not size anything: it is checked, and one below the layer's
    bytes (8 bits: a quarter of fp32 plus the step sizes) raises ``BudgetError``.
    """
    params: LowPrecParams = spec.params
    _check_params(params)
    rows = spec.vocab
    target = None
    if spec.budget is not None:
        achieved = lowprec_bytes(list(rows.values()), spec.dim, params.bits, params.scale_per == "row")
        target = budget_bytes(spec.budget, full_bytes(list(rows.values()), [spec.dim] * len(rows)))
        if achieved > target * (1 + TOLERANCE):
            smallest = lowprec_bytes(list(rows.values()), spec.dim, 8, per_row=False)
            raise BudgetError(
                f"embedding.kind=lowprec with bits={params.bits}, scale_per={params.scale_per} takes "
                f"{achieved:,} bytes, over the budget of {target:,}; its bytes are fixed by bits "
                f"(the smallest, bits=8 and scale_per=table, is {smallest:,}): raise embedding.budget or drop it"
            )
    lr = params.lr if params.lr is not None else float(spec.extra.get("lr", DEFAULT_LR))
    salt = zlib.crc32(spec.prefix.encode("utf-8"))
    solved = {
        "bits": params.bits, "scale": params.scale, "scale_per": params.scale_per, "max_abs": params.max_abs,
        "optimizer": params.optimizer, "lr": lr, "eps": params.eps,
        "init_std": spec.init_std if spec.init_std is not None else DEFAULT_INIT_STD,
        "init_seed": salted_seed(spec.seed, salt),
        "initial_accumulator": float(spec.extra.get("initial_accumulator", 0.0)),
        "offsets": stack_offsets(rows),
    }
    return spec.plan("lowprec", [], storage="module", multihot=True, params=solved,
                     budget={"solver": "fixed_by_bits", "budget": spec.budget, "target_bytes": target})


@register_module_assembler("lowprec")
def assemble_lowprec(plan: VariantPlan, device: torch.device | None = None) -> LowPrecEmbeddingLayer:
    """The low-precision layer of a plan."""
    return LowPrecEmbeddingLayer.from_plan(plan, device)


__all__ = [
    "LowPrecEmbeddingLayer",
    "LowPrecParams",
    "lowprec_bytes",
    "max_code",
    "plan_lowprec",
    "stack_offsets",
    "stochastic_round",
]
