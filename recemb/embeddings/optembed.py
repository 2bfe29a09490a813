"""The ``optembed`` variant: OptEmbed's supernet (Lyu et al., CIKM 2022) over full tables.

One ordinary torchrec table per feature (so it shards like ``full``), followed by a
mask combiner: a learnable threshold per field (or one global) prunes a row when
its L1 norm is at or under the threshold (a step, trained through a sigmoid's
derivative as straight-through gradient; ``alpha * sum exp(-t)`` pushes the
thresholds up), and in training each sample keeps a random prefix of each field's
vector (dims from ``dim_step`` to ``dim``), so one supernet scores every per-field
dimension choice. ``pipelines/search.py`` trains it, searches dims, and retrains
on the compact ``pruned`` variant.

Example (YAML):
    embedding: {kind: optembed, dim: 16, params: {alpha: 1.0e-4, threshold_lr: 1.0e-3}}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedTensor

from recemb.embeddings.base import Combiner, in_order, register_combiner
from recemb.embeddings.plan import CombinerPlan, VariantPlan
from recemb.embeddings.registry import VariantSpec, register_variant
from recemb.errors import ConfigError

PrunedVector = Literal["zero", "oov"]


@dataclass
class OptEmbedParams:
    """Supernet settings.

    ``alpha``: weight of the threshold prior ``sum_f exp(-t_f)``; ``threshold_lr``: Adam lr of
    the thresholds (their own optimizer); ``threshold_init``: start value; ``threshold_scope``:
    ``field`` (one per feature) or ``global`` (one shared); ``ste_slope``: slope k of the
    sigmoid whose derivative is the straight-through gradient of the row mask; ``dim_step``:
    candidate dims are ``dim_step, 2*dim_step, ..., dim`` (it must divide ``dim``; multiples of 4
    need no FBGEMM padding, other widths are padded in training);
    ``pruned_vector``: what a pruned row returns, ``zero`` or a learned per-field ``oov`` vector.
    """

    alpha: float = 1e-4
    threshold_lr: float = 1e-3
    threshold_init: float = 0.0
    threshold_scope: Literal["field", "global"] = "field"
    ste_slope: float = 10.0
    dim_step: int = 4
    pruned_vector: PrunedVector = "zero"


def candidate_dims(dim: int, step: int) -> list[int]:
    """``[step, 2*step, ..., dim]``: the per-field dims the supernet trains and the search picks from.

    Any dim works with a step that divides it; widths FBGEMM cannot run (5 or 10 at ``dim: 10``,
    ``dim_step: 5``) are held padded in training, the supernet's tables and the ``pruned`` tables alike.

    Example:
        >>> candidate_dims(16, 4), candidate_dims(10, 5)
        ([4, 8, 12, 16], [5, 10])
    """
    if step < 1 or dim % step:
        divisors = [d for d in range(1, dim + 1) if dim % d == 0]
        raise ConfigError(f"embedding.dim={dim} must be a multiple of embedding.params.dim_step={step}: set "
                          f"dim_step to a divisor of {dim} ({', '.join(map(str, divisors))}) or embedding.dim "
                          f"to a multiple of {step}")
    return list(range(step, dim + 1, step))


def row_keep_mask(weights: torch.Tensor, threshold: float) -> torch.Tensor:
    """Rows of a ``[rows, dim]`` table the supernet keeps: L1 norm above ``threshold``."""
    return weights.abs().sum(dim=-1) > threshold


class _StraightThroughStep(torch.autograd.Function):
    """Forward: exact step ``gap > 0`` (so kept rows pass unchanged); backward: ``d sigmoid(k * gap)``."""

    @staticmethod
    def forward(ctx: Any, gap: torch.Tensor, slope: float) -> torch.Tensor:
        ctx.save_for_backward(gap)
        ctx.slope = slope
        return (gap > 0).to(gap.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (gap,) = ctx.saved_tensors
        s = torch.sigmoid(ctx.slope * gap)
        return grad * ctx.slope * s * (1.0 - s), None


@register_combiner("optembed_mask")
class OptEmbedMask(Combiner):
    """Row mask (learned thresholds, straight-through) and random prefix dims on pooled vectors.

    ``eval_dims`` (set by the search through ``set_eval_dims``) fixes each field's prefix
    at evaluation; without it evaluation uses the full dim. The row mask is always on.
    ``eval_dims`` is search-time state, not part of the plan: the numpy twin
    (``recemb.serving.variants.optembed``) applies the mask at full dims, as eval does without it.

    Plan params: ``dim``, ``init_std`` (of the OOV vectors; None = 1e-3) and the ``OptEmbedParams`` fields; dense:
    ``thresholds`` (and ``oov`` with ``pruned_vector: oov``).
    """

    def __init__(self, features: list[str], dim: int, params: OptEmbedParams, init_std: float | None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.features = list(features)
        self.dim = dim
        self.params = params
        self.init_std = init_std if init_std is not None else 1e-3
        self.candidates = candidate_dims(dim, params.dim_step)
        n = len(features) if params.threshold_scope == "field" else 1
        self.thresholds = nn.Parameter(torch.empty(n, device=device))
        self.oov = (nn.Parameter(torch.empty(len(features), dim, device=device))
                    if params.pruned_vector == "oov" else None)
        self.eval_dims: list[int] | None = None
        self.reset_parameters()

    @classmethod
    def from_plan(cls, plan: VariantPlan, device: torch.device | None = None) -> OptEmbedMask:
        p = plan.combiner.params
        params = OptEmbedParams(**{f.name: p[f.name] for f in dataclasses.fields(OptEmbedParams)})
        return cls(plan.features, p["dim"], params, p["init_std"], device=device)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.thresholds.fill_(self.params.threshold_init)
            if self.oov is not None:
                self.oov.normal_(0.0, self.init_std)

    def regularization(self) -> torch.Tensor:
        """``alpha * sum exp(-t)``: the prior that raises thresholds (added to the training loss)."""
        return self.params.alpha * torch.exp(-self.thresholds).sum()

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The thresholds train with their own learning rate (the loop's aux optimizer)."""
        return [{"params": [self.thresholds], "lr": self.params.threshold_lr}]

    def threshold_of(self) -> dict[str, float]:
        """Each feature's current threshold."""
        t = self.thresholds.detach().float().cpu()
        return {f: float(t[i if t.numel() > 1 else 0]) for i, f in enumerate(self.features)}

    def set_eval_dims(self, dims: dict[str, int] | None) -> None:
        """Evaluate with each field cut to ``dims[f]`` (None: full dims)."""
        if dims is None:
            self.eval_dims = None
            return
        bad = [f for f in self.features if dims.get(f) not in self.candidates]
        if bad:
            raise ConfigError(f"eval dim of '{bad[0]}' must be one of {self.candidates}, got {dims.get(bad[0])}")
        self.eval_dims = [dims[f] for f in self.features]

    def forward(self, pooled: KeyedTensor) -> KeyedTensor:
        ordered = in_order(pooled, self.features)
        e = ordered.values().view(-1, len(self.features), self.dim)
        t = self.thresholds.view(1, -1)
        gap = e.abs().sum(dim=-1) - t
        mask = _StraightThroughStep.apply(gap, self.params.ste_slope).unsqueeze(-1)
        out = e * mask
        if self.oov is not None:
            out = out + (1.0 - mask) * self.oov.unsqueeze(0)
        dims = self._dims(e)
        if dims is not None:
            width = torch.arange(self.dim, device=e.device).view(1, 1, -1)
            out = out * (width < dims.unsqueeze(-1)).to(e.dtype)
        return KeyedTensor(keys=list(self.features), length_per_key=[self.dim] * len(self.features),
                           values=out.reshape(e.shape[0], -1))

    def _dims(self, e: torch.Tensor) -> torch.Tensor | None:
        """Per sample and field prefix width: random in training, ``eval_dims`` or none at eval."""
        if self.training:
            cand = torch.tensor(self.candidates, device=e.device)
            pick = torch.randint(len(self.candidates), (e.shape[0], e.shape[1]), device=e.device)
            return cand[pick]
        if self.eval_dims is None:
            return None
        return torch.tensor(self.eval_dims, device=e.device).view(1, -1).expand(e.shape[0], -1)


def optembed_masks(model: nn.Module) -> list[OptEmbedMask]:
    """Every OptEmbed mask in ``model`` (the search sets their eval dims)."""
    return [m for m in model.modules() if isinstance(m, OptEmbedMask)]


@register_variant("optembed", OptEmbedParams)
def plan_optembed(spec: VariantSpec) -> VariantPlan:
    """Full tables (``t_<feature>``) and an ``OptEmbedMask`` combiner over them."""
    params: OptEmbedParams = spec.params
    if spec.budget is not None:
        raise ConfigError("embedding.kind=optembed trains full tables and takes no budget; "
                          "the size comes out of `recemb search` (remove embedding.budget)")
    multi = [f.name for f in spec.features if f.kind == "multihot"]
    if multi:
        # The mask acts on pooled vectors: for a bag it would prune the bag's sum, not its rows.
        raise ConfigError(f"embedding.kind=optembed needs single-valued features; '{multi[0]}' is multi-hot "
                          "(put it in an embedding.groups entry with another kind)")
    candidate_dims(spec.dim, params.dim_step)
    tables = [spec.table(f"t_{f}", rows, spec.dim, [f]) for f, rows in spec.vocab.items()]
    mask = {"dim": spec.dim, "init_std": spec.init_std, **dataclasses.asdict(params)}
    dense = ["thresholds", "oov"] if params.pruned_vector == "oov" else ["thresholds"]
    return spec.plan("optembed", tables, combiner=CombinerPlan("optembed_mask", mask, dense=dense),
                     multihot=False, budget={"solver": "none", "sizes_from": "recemb search"})
