"""The ``pep`` variant: learnable soft thresholds, then retraining on the found mask (Liu et al., ICLR 2021).

Plug-in embedding pruning in two phases of one training run (no ``recemb search`` stages:
the layer switches itself after ``search_steps`` row updates, and its phase is in its
state, so a resumed run continues where it was):

1. search: a row serves ``sign(v) * relu(|v| - g(s))`` with ``g = sigmoid`` and learnable
   thresholds ``s`` per ``threshold`` scope (``global``, ``field``, ``dimension`` or
   ``field_dimension``; PEP's per-id scopes are not offered), trained with their own Adam
   learning rate (``threshold_lr``). Weights under their threshold take no gradient.
2. retrain (PEP's lottery-ticket step): the mask found is fixed, the weights are rewound to
   their initial values (regenerated from the plan's seed; ``rewind: false`` keeps the
   searched weights instead) and trained again, masked. The dense model is not rewound: it
   keeps training.

The mask is the budget's: of the weights above their thresholds, the ``nnz`` with the
largest margin ``|v| - g(s)`` (all of them when fewer), so the stored CSR never exceeds
the budget even where the thresholds have not learned that much sparsity yet. During the
search, ``kept`` (refreshed every ``mask_every`` updates) applies it at evaluation, so every
checkpoint is a model of the budget's bytes. Stored as DeepLight is (CSR; see
``recemb.embeddings.deeplight``). numpy twin: ``recemb.serving.variants.pep``.

Example (YAML):
    embedding: {kind: pep, dim: 16, budget: 0.1, params: {search_steps: 200, threshold_init: -8.0}}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from recemb.embeddings.deeplight import SparseRowLayer, solve_sparse, sparse_params
from recemb.embeddings.plan import VariantPlan
from recemb.embeddings.registry import VariantSpec, register_module_assembler, register_variant
from recemb.embeddings.rowwise import resolve_update, top_k_mask
from recemb.errors import ConfigError

ThresholdScope = Literal["global", "field", "dimension", "field_dimension"]
SCOPES = ("global", "field", "dimension", "field_dimension")


@dataclass
class PEPParams:
    """``sparsity`` (without a budget), ``threshold`` scope, ``threshold_init`` (``s`` at the start;
    PEP's -15 gives ``g(s) = 3e-7``), ``threshold_lr`` (the thresholds' Adam learning rate),
    ``search_steps`` (row updates before the retrain phase), ``mask_every`` (updates between
    refreshes of the served mask while searching), ``rewind`` (retrain from the initial weights,
    PEP's lottery ticket; else from the searched ones), ``optimizer`` and ``lr`` (the rows' update)."""

    sparsity: float | None = None
    threshold: ThresholdScope = "field_dimension"
    threshold_init: float = -15.0
    threshold_lr: float = 1e-3
    search_steps: int = 1000
    mask_every: int = 10
    rewind: bool = True
    optimizer: str = "rowwise_adagrad"
    lr: float | None = None


def threshold_shape(scope: str, features: int, dim: int) -> tuple[int, int]:
    """Shape of ``s``: ``(features or 1, dim or 1)`` by scope."""
    return (features if scope in ("field", "field_dimension") else 1,
            dim if scope in ("dimension", "field_dimension") else 1)


class SoftThresholdLayer(SparseRowLayer):
    """PEP's table: ``thresholds`` (dense parameter, own learning rate) and ``kept`` (the budget's mask;
    the training mask too once retraining); see the module docstring."""

    def __init__(self, plan: VariantPlan, device: torch.device | None = None) -> None:
        super().__init__(plan, persistent=True, device=device)
        p = plan.params
        self.scope = p["threshold"]
        self.threshold_init, self.threshold_lr = float(p["threshold_init"]), float(p["threshold_lr"])
        self.search_steps, self.mask_every, self.rewind = int(p["search_steps"]), int(p["mask_every"]), \
            bool(p["rewind"])
        self.thresholds = nn.Parameter(torch.empty(threshold_shape(self.scope, len(self.features), self.dim),
                                                   device=device))
        self.materialize(device)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.thresholds.fill_(self.threshold_init)

    def reset_buffers(self) -> None:
        """Initial rows; the served mask of the initial margins (retraining from the start when ``search_steps`` is 0)."""
        super().reset_buffers()
        with torch.no_grad():
            self._refresh_kept()
            if self.search_steps == 0:
                self.weight.mul_(self.kept)

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The thresholds train with their own learning rate (the loop's auxiliary Adam)."""
        return [{"params": [self.thresholds], "lr": self.threshold_lr}]

    @property
    def retraining(self) -> bool:
        """Whether the search is over (the mask is fixed and the weights were rewound)."""
        return int(self.updates) >= self.search_steps

    def _threshold_of(self, feature: torch.Tensor) -> torch.Tensor:
        """``g(s)`` for rows of the given feature indices: ``[n, dim or 1]``."""
        g = torch.sigmoid(self.thresholds)
        return g.index_select(0, feature) if g.shape[0] > 1 else g.expand(feature.numel(), -1)

    def _soft(self, v: torch.Tensor, rows: torch.Tensor, feature: torch.Tensor | None = None) -> torch.Tensor:
        """``sign(v) * relu(|v| - g(s))`` for rows ``v`` at stacked ``rows`` (of features ``feature``, found from
        ``rows`` when not given)."""
        if feature is None:
            feature = torch.searchsorted(self.bounds, rows, right=True) - 1
        return torch.sign(v) * torch.relu(v.abs() - self._threshold_of(feature))

    def _refresh_kept(self) -> None:
        """``kept``: of the weights above their thresholds, the ``nnz`` largest margins."""
        with torch.no_grad():
            rows = torch.arange(self.total_rows, device=self.weight.device)
            feature = torch.searchsorted(self.bounds, rows, right=True) - 1
            margin = (self.weight.abs() - self._threshold_of(feature)).reshape(-1)
            above = margin > 0
            score = torch.where(above, margin, torch.full_like(margin, -torch.inf))
            self.kept.copy_(top_k_mask(score, min(self.nnz, int(above.sum()))).view_as(self.kept))

    def rows_of(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if self.retraining:
            # DDP runs a static graph: the thresholds stay in it (with no effect) once the search is over.
            return self.query(rows) * self.kept.index_select(0, rows) + 0.0 * self.thresholds.sum()
        return self._soft(self.query(rows), rows)

    def served_rows(self, rows: torch.Tensor, blocks: list[tuple[int, int, int]]) -> torch.Tensor:
        w = self.weight.index_select(0, rows)
        if not self.retraining:
            feature = torch.repeat_interleave(torch.tensor([i for i, _, _ in blocks], device=rows.device),
                                              torch.tensor([b - a for _, a, b in blocks], device=rows.device))
            w = self._soft(w, rows, feature)
        return w * self.kept.index_select(0, rows)

    def after_update(self, rows: torch.Tensor) -> None:
        """Refresh ``kept`` while searching; at ``search_steps`` fix it and rewind the weights (and Adagrad's
        state), or keep the searched weights (soft-thresholded, as they served) without ``rewind``."""
        step = int(self.updates)
        if step == self.search_steps:
            self._refresh_kept()
            if self.rewind:
                self.weight.copy_(self.initial_rows() * self.kept)
                self.row_sq_grad.fill_(self.update.initial_accumulator)
            else:
                rows = torch.arange(self.total_rows, device=self.weight.device)
                self.weight.copy_(self._soft(self.weight, rows) * self.kept)
        elif step < self.search_steps and step % self.mask_every == 0:
            self._refresh_kept()


@register_variant("pep", PEPParams)
def plan_pep(spec: VariantSpec) -> VariantPlan:
    """A soft-thresholded table over the group, retrained on its mask, stored as CSR; see the module docstring."""
    params: PEPParams = spec.params
    if params.threshold not in SCOPES:
        raise ConfigError(f"embedding.params.threshold must be one of {', '.join(SCOPES)}, got '{params.threshold}'")
    if params.search_steps < 0 or not params.threshold_lr > 0:
        raise ConfigError("embedding.params: search_steps must be >= 0 and threshold_lr > 0")
    nnz, budget = solve_sparse(spec, "pep", params.sparsity)
    update = resolve_update(params.optimizer, params.lr, spec.extra)
    if params.mask_every < 1:
        raise ConfigError(f"embedding.params.mask_every must be >= 1, got {params.mask_every}")
    solved = {**sparse_params(spec, "pep", nnz, update), "mask_every": params.mask_every, "rewind": params.rewind,
              "threshold": params.threshold,
              "threshold_init": params.threshold_init, "threshold_lr": params.threshold_lr,
              "search_steps": params.search_steps}
    return spec.plan("pep", [], storage="module", multihot=True, params=solved, budget=budget)


@register_module_assembler("pep")
def assemble_pep(plan: VariantPlan, device: torch.device | None = None) -> SoftThresholdLayer:
    """The soft-threshold layer of a ``pep`` plan."""
    return SoftThresholdLayer(plan, device)


__all__ = ["PEPParams", "SoftThresholdLayer", "plan_pep", "threshold_shape"]
