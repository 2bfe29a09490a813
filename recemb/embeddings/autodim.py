"""The ``autodim`` variant: a width per field, found by a relaxed bi-level search, then retrained (Zhao et al., WWW 2021).

One training run in two phases held in the layer's state (its update counts), as ``pep``
does, so a resumed run continues where it stopped: no ``recemb search`` stages, whose
hand-over of a searched layout between runs the phases make unnecessary:

1. search (the first ``search_steps`` training batches): each field has candidate widths
   (``candidates``, default 1, 2, 4, ... up to ``embedding.dim``; per field, only those the
   budget can afford while every other field is at its narrowest). Candidate ``d`` reads the
   first ``d`` columns of the field's ``dim``-wide row (AutoDim's weight-sharing
   architecture, one table instead of one per candidate) and a learned linear transform
   ``P[f, d]`` (``dim x d``, initialised to zero padding) brings it to ``dim``. A field's
   vector is ``sum_d softmax(alpha_f / temperature)_d * P[f, d] @ row[:d]``. Bi-level, first
   order (DARTS): every ``arch_every``-th batch updates only the architecture weights
   ``alpha`` (Adam of its own, ``arch_lr``; the rows do not move on it), the other batches
   only the rows. The transforms are dense parameters and train on every batch.
2. retrain: the chosen width of each field is fixed, the columns beyond it are zeroed, the
   rows rewound to their initial values (``rewind: false`` keeps the searched ones) and
   trained at the chosen widths, each through its transform ``P[f, d_f]`` (the transforms
   and the dense model are not rewound: they keep training).

The budget is binding: the choice (``choose_widths``) is each field's argmax, then fields are
narrowed, the smallest loss of log-softmax weight per byte saved first, until the layout fits
``embedding.budget``, then widened, the best gain per byte first, while a widening fits, so
the layout uses the budget (never over it). The search decides where the bytes go, the budget
how many. ``chosen`` (state) is refreshed after every architecture update and serves at
evaluation, so every checkpoint is a model of the budget's bytes. Stored: per field its
``rows x d_f`` table and its ``dim x d_f`` transform, fp32, and the widths (int32); numpy
twin: ``recemb.serving.variants.autodim``.

Where this departs from the paper: no batch norm after the transforms (its batch statistics
would differ between ranks and between training and a numpy twin; the zero-padding start
keeps the candidates on one scale instead); plain softmax with a fixed ``temperature``, no
Gumbel noise (deterministic on every rank and across a resume); the architecture batches are
training batches set aside in turn, not a validation split, and the dense model trains on them
(the loop steps it on every batch); the budget, which the paper does not have, picks the
widths jointly. Training holds the ``dim``-wide stacked table (a ``RowTableLayer``: row-wise
Adagrad in backward, data parallel); row-wise Adagrad's mean square is over the width in use.

Example (YAML):
    embedding: {kind: autodim, dim: 16, budget: 0.1, params: {search_steps: 40, arch_every: 2}}
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from recemb.embeddings.budget import BudgetError, budget_bytes, full_bytes
from recemb.embeddings.hashing import salted_seed
from recemb.embeddings.lowprec import stack_offsets
from recemb.embeddings.plan import BYTES_PER_FLOAT, VariantPlan
from recemb.embeddings.registry import VariantSpec, register_module_assembler, register_variant
from recemb.embeddings.rowwise import RowTableLayer, gather_rows, resolve_update, row_init_std, row_table_args
from recemb.errors import ConfigError

WIDTH_BYTES = 4  # the stored widths are int32
_BETAS = (0.9, 0.999)  # the architecture weights' Adam
_EPS = 1e-8


@dataclass
class AutoDimParams:
    """``candidates`` (widths a field may take, ascending, at most ``embedding.dim``; None: 1, 2, 4,
    ... and ``dim``), ``search_steps`` (training batches of search before the retrain phase),
    ``arch_every`` (every such batch of the search updates the architecture weights, the others the
    rows), ``arch_lr`` (their Adam learning rate), ``temperature`` (of their softmax), ``rewind``
    (retrain from the initial rows; else from the searched ones), ``optimizer`` and ``lr`` (the
    rows' update; None: ``embedding.lr``)."""

    candidates: list[int] | None = None
    search_steps: int = 1000
    arch_every: int = 2
    arch_lr: float = 0.01
    temperature: float = 1.0
    rewind: bool = True
    optimizer: str = "rowwise_adagrad"
    lr: float | None = None


def default_candidates(dim: int) -> list[int]:
    """Powers of two below ``dim``, and ``dim``.

    Example:
        >>> default_candidates(16), default_candidates(12)
        ([1, 2, 4, 8, 16], [1, 2, 4, 8, 12])
    """
    out = [1 << i for i in range(dim.bit_length()) if 1 << i < dim]
    return [*out, dim]


def layout_bytes(rows: Sequence[int], dim: int, widths: Sequence[int]) -> int:
    """Stored bytes: each field's ``rows x width`` table and ``dim x width`` transform (fp32), and the widths.

    Example:
        >>> layout_bytes([100, 10], dim=8, widths=[2, 8])   # (108 * 2 + 18 * 8) * 4 + 2 * 4
        1448
    """
    return sum((r + dim) * w for r, w in zip(rows, widths, strict=True)) * BYTES_PER_FLOAT + WIDTH_BYTES * len(rows)


def _costs(rows: Sequence[int], dim: int, candidates: Sequence[int]) -> np.ndarray:
    """``[F, C]`` bytes of each field at each candidate width (its table and transform)."""
    return (np.asarray(rows, np.int64)[:, None] + dim) * np.asarray(candidates, np.int64)[None, :] * BYTES_PER_FLOAT


def affordable(rows: Sequence[int], dim: int, candidates: Sequence[int], target: int | None) -> np.ndarray:
    """``[F, C]`` bool: the widths a field can take while every other field is at the narrowest
    (all of them without a target). ``BudgetError`` when not even the narrowest layout fits.

    Example:
        >>> affordable([1000, 10], 4, [1, 2, 4], target=9000).astype(int).tolist()
        [[1, 1, 0], [1, 1, 1]]
    """
    cost = _costs(rows, dim, candidates)
    if target is None:
        return np.ones(cost.shape, bool)
    narrowest = int(cost[:, 0].sum()) + WIDTH_BYTES * len(rows)
    if narrowest > target:
        raise BudgetError(f"embedding.kind=autodim: every field at width {candidates[0]} takes {narrowest:,} bytes, "
                          f"over the budget of {target:,} bytes; raise embedding.budget (width 1 is 1/dim of the "
                          "full tables)")
    return cost + (narrowest - cost[:, :1]) <= target


def choose_widths(scores: np.ndarray, rows: Sequence[int], dim: int, candidates: Sequence[int],
                  target: int | None) -> np.ndarray:
    """Candidate index per field: the argmax of ``scores`` (``[F, C]``, higher preferred, ``-inf``:
    not allowed; ties to the widest), then, with a ``target``, narrowed (least score lost per byte
    saved first) until the layout fits and widened (most score gained per byte first) while a
    widening fits. Ties go to the larger move, then the first field: deterministic on every rank.

    Example:
        >>> s = np.zeros((2, 3))                           # no preference: the budget decides
        >>> choose_widths(s, [1000, 10], 4, [1, 2, 4], target=9000).tolist()   # 8032 + 224 + 8 bytes
        [1, 2]
        >>> s[0] = [0.0, 0.0, -np.inf]; s[1] = [0.0, -5.0, -5.0]
        >>> choose_widths(s, [1000, 10], 4, [1, 2, 4], target=None).tolist()
        [1, 0]
    """
    scores = np.asarray(scores, np.float64)
    allowed = np.isfinite(scores)
    cost = _costs(rows, dim, candidates)
    n = scores.shape[1]
    chosen = np.array([max(j for j in range(n) if allowed[f, j] and scores[f, j] == scores[f][allowed[f]].max())
                       for f in range(len(scores))], np.int64)
    if target is None:
        return chosen
    total = int(cost[np.arange(len(chosen)), chosen].sum()) + WIDTH_BYTES * len(chosen)

    def step(f: int, up: bool) -> int | None:
        js = range(chosen[f] + 1, n) if up else range(chosen[f] - 1, -1, -1)
        return next((j for j in js if allowed[f, j]), None)

    while total > target:
        moves = []
        for f in range(len(chosen)):
            j = step(f, up=False)
            if j is not None:
                saved = int(cost[f, chosen[f]] - cost[f, j])
                moves.append(((scores[f, chosen[f]] - scores[f, j]) / saved, -saved, f, j))
        if not moves:
            raise BudgetError(f"embedding.kind=autodim: the narrowest layout takes {total:,} bytes, over "
                              f"{target:,}")
        _, minus_saved, f, j = min(moves)
        chosen[f], total = j, total + minus_saved
    while True:
        moves = []
        for f in range(len(chosen)):
            j = step(f, up=True)
            if j is not None:
                added = int(cost[f, j] - cost[f, chosen[f]])
                if total + added <= target:
                    moves.append((-(scores[f, j] - scores[f, chosen[f]]) / added, -added, f, j))
        if not moves:
            return chosen
        _, minus_added, f, j = min(moves)
        chosen[f], total = j, total - minus_added


class _ArchWeights(torch.autograd.Function):
    """Forward: the architecture weights; backward: the layer updates them with their gradient."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, layer: AutoDimLayer) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer.alpha.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:  # type: ignore[override]
        ctx.layer.apply_arch_update(grad)
        return None, None


class AutoDimLayer(RowTableLayer):
    """AutoDim's table: the stacked ``dim``-wide rows, the transforms ``proj [F, C, dim, dim]`` (candidate
    ``c`` reads columns ``< candidates[c]``), the architecture weights ``alpha [F, C]`` with their Adam state,
    and ``chosen`` (candidate index per field); see the module docstring."""

    def __init__(self, plan: VariantPlan, device: torch.device | None = None) -> None:
        p = plan.params
        rows, dim, update = row_table_args(plan)
        super().__init__(rows, dim, update, dict(p["init_std"]), p["init_seed"], device)
        self.candidates = [int(w) for w in p["candidates"]]
        self.target: int | None = p["target_bytes"]
        self.search_steps, self.arch_every, self.rewind = int(p["search_steps"]), int(p["arch_every"]), \
            bool(p["rewind"])
        self.arch_lr, self.temperature = float(p["arch_lr"]), float(p["temperature"])
        self._allowed = np.array([p["allowed"][f] for f in self.features], bool)
        self._initial = [self.candidates.index(int(p["initial"][f])) for f in self.features]
        n, c = len(self.features), len(self.candidates)
        self.proj = nn.Parameter(torch.empty(n, c, dim, dim, device=device))
        self.register_buffer("alpha", torch.empty(n, c, device=device))
        self.register_buffer("alpha_m", torch.empty(n, c, device=device))
        self.register_buffer("alpha_v", torch.empty(n, c, device=device))
        self.register_buffer("arch_updates", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("chosen", torch.empty(n, dtype=torch.int64, device=device))
        self.register_buffer("allowed", torch.empty(n, c, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("columns", torch.empty(c, dim, device=device), persistent=False)
        self.materialize(device)

    def reset_parameters(self) -> None:
        """Each transform starts as zero padding: ``P[f, d] @ row[:d]`` is ``row[:d]`` followed by zeros."""
        with torch.no_grad():
            self.proj.zero_()
            for c, d in enumerate(self.candidates):
                self.proj[:, c, torch.arange(d), torch.arange(d)] = 1.0

    def reset_buffers(self) -> None:
        """Initial rows, uniform architecture weights and the budget's choice of them (retraining from the
        start when ``search_steps`` is 0)."""
        super().reset_buffers()
        with torch.no_grad():
            self.allowed.copy_(torch.from_numpy(self._allowed))
            self.columns.copy_((torch.arange(self.dim)[None, :] < torch.tensor(self.candidates)[:, None]).float())
            for buffer in (self.alpha, self.alpha_m, self.alpha_v):
                buffer.zero_()
            self.arch_updates.zero_()
            self.chosen.copy_(torch.tensor(self._initial))
            if self.search_steps == 0:
                self.weight.mul_(self._kept_columns(torch.arange(self.total_rows, device=self.weight.device)))

    # ------------------------------------------------------------ phases

    @property
    def steps(self) -> int:
        """Training batches done: row updates and architecture updates."""
        return int(self.updates) + int(self.arch_updates)

    @property
    def retraining(self) -> bool:
        """Whether the search is over (widths fixed, rows rewound)."""
        return self.steps >= self.search_steps

    def arch_batch(self) -> bool:
        """Whether the next training batch updates the architecture weights (and not the rows)."""
        s = self.steps
        return s < self.search_steps and (s + 1) % self.arch_every == 0

    def widths(self) -> dict[str, int]:
        """The chosen width of each field (the plan's initial choice on the meta device)."""
        chosen = self._initial if self.chosen.device.type == "meta" else self.chosen.tolist()
        return {f: self.candidates[c] for f, c in zip(self.features, chosen, strict=True)}

    def parameter_bytes(self) -> int:
        """The stored bytes at the chosen widths (what a bundle holds)."""
        widths = self.widths()
        return layout_bytes([self.full_rows[f] for f in self.features], self.dim, [widths[f] for f in self.features])

    def scores(self) -> torch.Tensor:
        """``log_softmax(alpha / temperature)`` over each field's allowed candidates (``-inf`` elsewhere)."""
        return torch.log_softmax((self.alpha / self.temperature).masked_fill(~self.allowed, -torch.inf), dim=1)

    def refresh_chosen(self) -> None:
        """``chosen`` from the architecture weights as they are, within the budget (``choose_widths``)."""
        picked = choose_widths(self.scores().detach().cpu().double().numpy(),
                               [self.full_rows[f] for f in self.features], self.dim, self.candidates, self.target)
        self.chosen.copy_(torch.from_numpy(picked))

    def _kept_columns(self, rows: torch.Tensor) -> torch.Tensor:
        """``[len(rows), dim]``: 1 on the columns of each stacked row's chosen width, else 0."""
        feature = torch.searchsorted(self.bounds, rows, right=True) - 1
        return self.columns.index_select(0, self.chosen.index_select(0, feature))

    def _fix(self) -> None:
        """End of the search: the final choice, the columns beyond it zeroed, rows rewound (or kept)."""
        self.refresh_chosen()
        kept = self._kept_columns(torch.arange(self.total_rows, device=self.weight.device))
        if self.rewind:
            self.weight.copy_(self.initial_rows() * kept)
            self.row_sq_grad.fill_(self.update.initial_accumulator)
        else:
            self.weight.mul_(kept)

    # ------------------------------------------------------------ updates

    def apply_update(self, rows: torch.Tensor, grads: torch.Tensor) -> None:
        """The row update of ``RowTableLayer``, but row-wise Adagrad's mean square is over the width in use
        (the chosen one once retraining: the zero columns beyond it would otherwise shrink it)."""
        with torch.no_grad():
            grads = grads.float()
            if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
                rows, grads = gather_rows(rows, grads, self.process_group)
            if self.update.optimizer == "rowwise_adagrad":
                width = self._kept_columns(rows).sum(1) if self.retraining else torch.full_like(rows, self.dim)
                acc = self.row_sq_grad.index_select(0, rows) + grads.pow(2).sum(dim=1) / width
                self.row_sq_grad.index_copy_(0, rows, acc)
                step = grads * (self.lr / (acc.sqrt() + self.update.eps)).unsqueeze(1)
            else:
                step = grads * self.lr
            self.weight.index_add_(0, rows, step, alpha=-1.0)
            self.updates += 1
            self.after_update(rows)

    def apply_arch_update(self, grad: torch.Tensor) -> None:
        """One Adam step of the architecture weights (gradient averaged over ranks as DDP does), then the choice."""
        with torch.no_grad():
            grad = grad.float().clone()
            if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
                dist.all_reduce(grad, group=self.process_group)
                grad /= dist.get_world_size(self.process_group)
            t = int(self.arch_updates) + 1
            self.alpha_m.mul_(_BETAS[0]).add_(grad, alpha=1 - _BETAS[0])
            self.alpha_v.mul_(_BETAS[1]).addcmul_(grad, grad, value=1 - _BETAS[1])
            m_hat = self.alpha_m / (1 - _BETAS[0] ** t)
            v_hat = self.alpha_v / (1 - _BETAS[1] ** t)
            self.alpha.sub_(self.arch_lr * m_hat / (v_hat.sqrt() + _EPS))
            self.arch_updates += 1
            self.refresh_chosen()
            self.after_update(torch.empty(0, dtype=torch.int64, device=grad.device))

    def after_update(self, rows: torch.Tensor) -> None:
        """At ``search_steps`` training batches: fix the widths and rewind."""
        if self.steps == self.search_steps:
            self._fix()

    # ------------------------------------------------------------ lookups

    def mixture(self, arch: bool) -> torch.Tensor:
        """``[F, C]`` candidate weights: the softmax while training in the search (differentiable in ``alpha``
        on an architecture batch), else the chosen widths (one-hot)."""
        if self.training and not self.retraining:
            alpha = self.alpha
            if arch:
                alpha = _ArchWeights.apply(torch.empty(0, device=alpha.device, requires_grad=True), self)
            return torch.softmax((alpha / self.temperature).masked_fill(~self.allowed, -torch.inf), dim=1)
        return torch.nn.functional.one_hot(self.chosen, len(self.candidates)).to(self.proj.dtype)

    def _project(self, w: torch.Tensor, blocks: list[tuple[int, int, int]], mix: torch.Tensor) -> torch.Tensor:
        """Rows ``w`` (in ``blocks`` by feature) through their feature's mixed transform: ``[len(w), dim]``."""
        if not blocks:
            return w
        m = torch.einsum("fc,fcij,cj->fij", mix, self.proj, self.columns)
        return torch.cat([w[a:b] @ m[i].T for i, a, b in blocks])

    def rows_of(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        arch = torch.is_grad_enabled() and self.arch_batch()
        w = self.weight.index_select(0, rows) if arch else self.query(rows)  # the rows stay on an arch batch
        return self._project(w, self.feature_slices(rows), self.mixture(arch))

    def served_rows(self, rows: torch.Tensor, blocks: list[tuple[int, int, int]]) -> torch.Tensor:
        return self._project(self.weight.index_select(0, rows), blocks, self.mixture(False))


@register_variant("autodim", AutoDimParams)
def plan_autodim(spec: VariantSpec) -> VariantPlan:
    """A searched width per field within the budget, retrained; see the module docstring."""
    params: AutoDimParams = spec.params
    if params.search_steps < 0 or params.arch_every < 2 or not params.arch_lr > 0 or not params.temperature > 0:
        raise ConfigError("embedding.params: search_steps must be >= 0, arch_every >= 2 (every arch_every-th "
                          "batch updates the architecture, the others the rows), arch_lr and temperature > 0")
    candidates = list(params.candidates) if params.candidates is not None else default_candidates(spec.dim)
    if not candidates or candidates != sorted(set(candidates)) or candidates[0] < 1 or candidates[-1] > spec.dim:
        raise ConfigError(f"embedding.params.candidates must be distinct ascending widths in [1, {spec.dim}] "
                          f"(embedding.dim), got {candidates}")
    update = resolve_update(params.optimizer, params.lr, spec.extra)
    names, rows = spec.names, [spec.vocab[f] for f in spec.names]
    target = None if spec.budget is None else budget_bytes(spec.budget, full_bytes(rows, [spec.dim] * len(rows)))
    allowed = affordable(rows, spec.dim, candidates, target)
    scores = np.where(allowed, 0.0, -np.inf)
    initial = {f: candidates[c] for f, c in zip(names, choose_widths(scores, rows, spec.dim, candidates, target),
                                                strict=True)}
    solved = layout_bytes(rows, spec.dim, [initial[f] for f in names])
    plan_params = {
        "offsets": stack_offsets(spec.vocab), **update.to_dict(),
        "init_std": {f: row_init_std(spec.init_std, n) for f, n in spec.vocab.items()},
        "init_seed": salted_seed(spec.seed, zlib.crc32(f"autodim:{spec.prefix}".encode())),
        "candidates": candidates, "allowed": {f: allowed[i].tolist() for i, f in enumerate(names)},
        "initial": initial, "target_bytes": target, "search_steps": params.search_steps,
        "arch_every": params.arch_every, "arch_lr": params.arch_lr, "temperature": params.temperature,
        "rewind": params.rewind,
    }
    budget = {"solver": "autodim_widths", "budget": spec.budget, "target_bytes": target, "candidates": candidates,
              "initial_widths": initial, "solved_bytes": solved}
    return spec.plan("autodim", [], storage="module", multihot=True, params=plan_params, budget=budget)


@register_module_assembler("autodim")
def assemble_autodim(plan: VariantPlan, device: torch.device | None = None) -> AutoDimLayer:
    """The layer of an ``autodim`` plan."""
    return AutoDimLayer(plan, device)


__all__ = ["AutoDimLayer", "AutoDimParams", "affordable", "choose_widths", "default_candidates", "layout_bytes",
           "plan_autodim"]
