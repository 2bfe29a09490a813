"""The ``autosrh`` variant: per-frequency-group dimension selection (Kong et al., TKDE 2022; "AutoSrh").

Each feature's ids are split into ``groups`` frequency groups. Preparation numbers ids by
training count (``FeatureMap.id_counts``; id 0, the OOV bucket, first), so a group is an id
range and the plan records only its size. ``grouping: geometric`` (default) makes group ``k``
of a feature of ``n`` ids end at id ``round(n ** ((k + 1) / groups))``: a few hot ids, then ever
larger and rarer groups, so the budget can give the hot ids every dimension for a few bytes;
``equal`` gives every group the same number of ids (the survey's code). Features without
counts (hashed) are split the same way by id, which is then no frequency split.

One training run in two phases held in the layer's state (like ``pep``: a resumed run goes on):

1. search (``search_steps`` row updates): a row ``v`` of group ``g`` serves ``v * alpha[g]``, with
   soft selection weights ``alpha`` (one ``dim``-vector per feature and group, ``scope:
   field_group``, or per group shared by the features, ``scope: group``), initialised to 1 and
   trained by their own Adam (``alpha_lr``, ``optimizer_groups``) with ``l1 * sum |alpha|``
   added to the loss (the ``regularization`` hook ``TrainModel`` adds to the loss).
2. retrain: the dims are fixed, ``alpha`` is folded into the rows (``v * alpha``, masked; or,
   with ``rewind: true``, the rows restart from their initial values, masked) and the row
   optimizer's state starts afresh (as the survey's code starts each stage's optimizer);
   the rows train on with the fixed mask and ``alpha`` no longer serves.

The dims kept: entries of ``alpha`` in descending ``|alpha|`` (ties to the lowest index) are
taken while their rows fit the budget; one that does not fit is skipped and smaller ones are
still tried, and those with ``|alpha| <= threshold`` are never taken. So the budget binds (never
over, and filled to within a few bytes) where the paper's single global threshold on
``|alpha|`` would leave up to a whole group's column unused. The selection is per feature and
group in both scopes: with ``scope: group`` a shared column ties across the features, taken
feature by feature (the first ones first), so the budget is filled as finely. While searching,
``kept`` (the mask of the selection from the current ``alpha``, refreshed every ``mask_every``
updates) is applied at evaluation, so every checkpoint is a model of the budget's bytes.

Stored per feature and group: a dense fp32 block ``rows_g x kept_g`` (the kept columns in
order) and the group's dim mask as packed bits; no row pointers since a group's rows share
their mask. Stored bytes: ``sum rows_g * kept_g * 4 + features * groups * ceil(dim / 8)``.
``parameter_bytes`` is what a bundle may hold at most (the budget: the values' cap plus the
masks), known before any selection, as for ``pep``; ``stored_bytes`` is what the current mask
stores. Deviations from the paper: one run instead of separate pretrain/search/retrain stages
(no pretraining: the search starts from the initial rows), the budget-filling selection above,
and frequency groups per feature by id rank (the survey's code ranks the ids of all features
together into equal groups). Geometric groups beat equal ones at 1/10 on the synthetic data
(DCNv2 test AUC 0.73787 against 0.73639: equal groups spend the budget on the hottest sixth;
``configs/experiments/dcnv2_synthetic_ctr_autosrh.yaml``). numpy twin:
``recemb.serving.variants.autosrh``.

Example (YAML):
    embedding: {kind: autosrh, dim: 16, budget: 0.1, params: {groups: 6, search_steps: 40}}

Example:
    >>> group_sizes(25_000, 6, "geometric"), group_sizes(10, 3, "equal")
    ([5, 24, 129, 697, 3768, 20377], [3, 4, 3])
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from recemb.embeddings.budget import BudgetError, budget_bytes, full_bytes
from recemb.embeddings.hashing import salted_seed
from recemb.embeddings.lowprec import stack_offsets
from recemb.embeddings.plan import BYTES_PER_FLOAT, VariantPlan
from recemb.embeddings.registry import VariantSpec, register_module_assembler, register_variant
from recemb.embeddings.rowwise import RowTableLayer, resolve_update, row_init_std, row_table_args
from recemb.errors import ConfigError

Grouping = Literal["geometric", "equal"]
Scope = Literal["field_group", "group"]
GROUPINGS = ("geometric", "equal")
SCOPES = ("field_group", "group")


@dataclass
class AutoSrhParams:
    """``groups`` (frequency groups per feature) and ``grouping`` (``geometric`` or ``equal``; module
    docstring); ``scope`` of ``alpha`` (``field_group``: per feature and group; ``group``: per group, shared);
    ``l1`` (the penalty on ``sum |alpha|``), ``alpha_lr`` (alpha's Adam learning rate), ``threshold``
    (dims with ``|alpha|`` at most this are dropped even where the budget has room), ``search_steps``
    (row updates before retraining), ``mask_every`` (updates between refreshes of the served mask while
    searching), ``rewind`` (retrain from the initial rows instead of the searched ones times alpha),
    ``optimizer`` and ``lr`` (the rows' update; None: ``embedding.lr``)."""

    groups: int = 6
    grouping: Grouping = "geometric"
    scope: Scope = "field_group"
    l1: float = 1e-6
    alpha_lr: float = 0.01
    threshold: float = 0.0
    search_steps: int = 1000
    mask_every: int = 10
    rewind: bool = False
    optimizer: str = "rowwise_adagrad"
    lr: float | None = None


def group_sizes(rows: int, groups: int, grouping: str) -> list[int]:
    """Ids per frequency group of a feature of ``rows`` ids (hottest first; some may be 0 for tiny features).

    Example:
        >>> group_sizes(11, 6, "geometric")
        [1, 1, 1, 2, 2, 4]
    """
    if grouping == "equal":
        ends = [round(rows * (k + 1) / groups) for k in range(groups)]
    else:
        ends = [round(rows ** ((k + 1) / groups)) for k in range(groups)]
    ends[-1] = rows
    out, start = [], 0
    for end in ends:
        end = min(rows, max(start, end))
        out.append(end - start)
        start = end
    return out


def mask_bytes(slots: int, dim: int) -> int:
    """Bytes of the dim masks of ``slots`` (feature, group) pairs, packed 8 dims a byte.

    Example:
        >>> mask_bytes(26 * 6, 16)
        312
    """
    return slots * math.ceil(dim / 8)


_SCORE_STEPS = float(1 << 20)  # ``select_dims`` orders scores in steps of 2**-20


def select_dims(score: torch.Tensor, cost: torch.Tensor, cap: int, threshold: float) -> torch.Tensor:
    """Bool ``[A, dim]``: entries of ``score`` (``[A, dim]``) in descending order (ties to the lowest flat
    index) while their ``cost`` (bytes of a column of row ``a``: ``cost[a]``) fits ``cap``; an entry that
    does not fit is skipped and smaller ones are still tried; scores ``<= threshold`` are never taken.

    Scores are ordered at a resolution of ``2**-20`` (about 1e-6): closer ones count as tied. Weights
    that hardly moved from their common start are near-ties, and a gradient summed in another order
    (two ranks against one process) moves them by 1e-8, which must not pick other dims.

    Example:
        >>> select_dims(torch.tensor([[3.0, 1.0], [2.0, 0.5]]), torch.tensor([40, 8]), 56, 0.0).tolist()
        [[True, False], [True, True]]
    """
    flat = score.reshape(-1)
    costs = cost.repeat_interleave(score.shape[1]).tolist()
    order = torch.sort(-(flat.double() * _SCORE_STEPS).round(), stable=True).indices.tolist()
    values = flat.tolist()
    taken = torch.zeros(flat.numel(), dtype=torch.bool)
    used = 0
    for i in order:
        if values[i] <= threshold:
            break
        if used + costs[i] <= cap:
            used += costs[i]
            taken[i] = True
    return taken.view_as(score).to(score.device)


def group_rows_of(spec: VariantSpec, groups: int, grouping: str) -> dict[str, list[int]]:
    """Ids per frequency group of each feature; a feature whose known counts are not in id order is refused
    (the groups are id ranges of count-numbered ids)."""
    out = {}
    for f, rows in spec.vocab.items():
        counts = spec.id_counts(f)
        if counts is not None and counts.size > 2 and bool((np.diff(counts[1:]) > 0).any()):
            raise ConfigError(f"embedding.kind=autosrh: the ids of '{f}' are not numbered by training count "
                              "(prepare the data with recemb prepare, whose vocabularies are)")
        out[f] = group_sizes(rows, groups, grouping)
    return out


class DimSelectedLayer(RowTableLayer):
    """AutoSrh's table: rows, ``alpha`` (dense parameter, own learning rate), ``kept`` (``[features * groups,
    dim]`` bool, the budget's dims of each feature's group) and the phase in ``updates``; module docstring."""

    def __init__(self, plan: VariantPlan, device: torch.device | None = None) -> None:
        p = plan.params
        rows, dim, update = row_table_args(plan)
        super().__init__(rows, dim, update, dict(p["init_std"]), p["init_seed"], device)
        self.groups, self.scope = int(p["groups"]), str(p["scope"])
        self.group_rows = {f: [int(n) for n in p["group_rows"][f]] for f in self.features}
        self.value_cap, self.index_bytes = int(p["value_bytes"]), int(p["index_bytes"])
        self.l1, self.alpha_lr, self.threshold = float(p["l1"]), float(p["alpha_lr"]), float(p["threshold"])
        self.search_steps, self.mask_every, self.rewind = int(p["search_steps"]), int(p["mask_every"]), \
            bool(p["rewind"])
        slots = len(self.features) * self.groups
        sizes = [n for f in self.features for n in self.group_rows[f]]
        self.slot_sizes = torch.tensor(sizes, dtype=torch.int64)
        self.alpha = nn.Parameter(torch.empty(slots if self.scope == "field_group" else self.groups, dim,
                                              device=device))
        self.register_buffer("kept", torch.empty(slots, dim, dtype=torch.bool, device=device))
        self.register_buffer("slot_starts", torch.empty(slots + 1, dtype=torch.int64, device=device),
                             persistent=False)
        self.materialize(device)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.alpha.fill_(1.0)

    def reset_buffers(self) -> None:
        """Initial rows, the slots' row ranges, the served mask of the initial ``alpha`` (masked rows when
        retraining from the start, ``search_steps`` 0)."""
        super().reset_buffers()
        with torch.no_grad():
            starts = torch.zeros(self.slot_sizes.numel() + 1, dtype=torch.int64)
            torch.cumsum(self.slot_sizes, 0, out=starts[1:])
            self.slot_starts.copy_(starts)
            self._refresh_kept()
            if self.search_steps == 0:
                self.weight.mul_(self.kept.index_select(0, self.slot_of(torch.arange(self.total_rows,
                                                                                  device=self.weight.device))))

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """``alpha`` trains with its own learning rate (the loop's auxiliary Adam)."""
        return [{"params": [self.alpha], "lr": self.alpha_lr}]

    @property
    def retraining(self) -> bool:
        """Whether the search is over (dims fixed, alpha folded into the rows)."""
        return int(self.updates) >= self.search_steps

    def slot_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The (feature, group) slot ``feature * groups + group`` of stacked ``rows``."""
        return torch.searchsorted(self.slot_starts, rows.to(self.slot_starts.device), right=True) - 1

    def _alpha_row(self, slots: torch.Tensor) -> torch.Tensor:
        """Row of ``alpha`` that serves each slot."""
        return slots if self.scope == "field_group" else slots % self.groups

    def _column_cost(self) -> torch.Tensor:
        """Bytes of one dim of each slot (its rows, fp32)."""
        return self.slot_sizes * BYTES_PER_FLOAT

    def _refresh_kept(self) -> None:
        """``kept``: the budget's dims of every slot from its ``|alpha|`` row (``select_dims``)."""
        with torch.no_grad():
            alpha = self.alpha.detach().abs().cpu()
            score = alpha.index_select(0, self._alpha_row(torch.arange(self.kept.shape[0])))
            self.kept.copy_(select_dims(score, self._column_cost(), self.value_cap, self.threshold))

    def rows_of(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        slots = self.slot_of(rows)
        if self.retraining:
            # DDP runs a static graph: alpha stays in it (with no effect) once the search is over.
            return self.query(rows) * self.kept.index_select(0, slots) + 0.0 * self.alpha.sum()
        return self.query(rows) * self.alpha.index_select(0, self._alpha_row(slots))

    def served_rows(self, rows: torch.Tensor, blocks: list[tuple[int, int, int]]) -> torch.Tensor:
        slots = self.slot_of(rows)
        w = self.weight.index_select(0, rows)
        if not self.retraining:
            w = w * self.alpha.index_select(0, self._alpha_row(slots))
        return w * self.kept.index_select(0, slots)

    def regularization(self) -> torch.Tensor:
        """``l1 * sum |alpha|`` while searching (0 once retraining)."""
        if self.retraining or not self.l1:
            return self.alpha.new_zeros(())
        return self.l1 * self.alpha.abs().sum()

    def after_update(self, rows: torch.Tensor) -> None:
        """Refresh ``kept`` while searching; at ``search_steps`` fix it, fold alpha into the rows (or rewind
        them) and restart the rows' optimizer state."""
        step = int(self.updates)
        if step == self.search_steps:
            self._refresh_kept()
            every = torch.arange(self.total_rows, device=self.weight.device)
            slots = self.slot_of(every)
            mask = self.kept.index_select(0, slots)
            if self.rewind:
                self.weight.copy_(self.initial_rows() * mask)
            else:
                self.weight.mul_(self.alpha.detach().index_select(0, self._alpha_row(slots)) * mask)
            self.row_sq_grad.fill_(self.update.initial_accumulator)
        elif step < self.search_steps and step % self.mask_every == 0:
            self._refresh_kept()

    def kept_dims(self) -> dict[str, list[int]]:
        """Dims kept per group of each feature (hottest group first)."""
        per = self.kept.sum(1).view(len(self.features), self.groups).tolist()
        return {f: [int(n) for n in per[i]] for i, f in enumerate(self.features)}

    def stored_bytes(self) -> int:
        """Bytes the current mask stores: each group's kept columns of its rows (fp32) and the packed masks."""
        values = int((self.kept.sum(1).cpu() * self.slot_sizes).sum()) * BYTES_PER_FLOAT
        return values + self.index_bytes

    def parameter_bytes(self) -> int:
        """The most a bundle holds: the values' cap (what the budget leaves after the masks) and the masks."""
        return self.value_cap + self.index_bytes


@register_variant("autosrh", AutoSrhParams)
def plan_autosrh(spec: VariantSpec) -> VariantPlan:
    """Frequency groups with searched dims under the budget, retrained; see the module docstring."""
    params: AutoSrhParams = spec.params
    if params.groups < 1 or params.grouping not in GROUPINGS or params.scope not in SCOPES:
        raise ConfigError(f"embedding.params: groups must be >= 1, grouping one of {', '.join(GROUPINGS)}, scope "
                          f"one of {', '.join(SCOPES)}; got {params.groups}, '{params.grouping}', '{params.scope}'")
    if params.l1 < 0 or not params.alpha_lr > 0 or params.threshold < 0:
        raise ConfigError("embedding.params: l1 and threshold must be >= 0 and alpha_lr > 0")
    if params.search_steps < 0 or params.mask_every < 1:
        raise ConfigError("embedding.params: search_steps must be >= 0 and mask_every >= 1")
    if spec.budget is None:
        raise ConfigError("embedding.kind=autosrh needs embedding.budget (a byte share or a byte count)")
    vocab = spec.vocab
    full = full_bytes(list(vocab.values()), [spec.dim] * len(vocab))
    target = budget_bytes(spec.budget, full)
    index = mask_bytes(len(vocab) * params.groups, spec.dim)
    smallest = min(vocab.values()) * BYTES_PER_FLOAT
    if target < index + smallest:
        raise BudgetError(f"embedding.budget: autosrh needs {index:,} bytes for its dim masks and more for any "
                          f"value, over the budget of {target:,} bytes; raise embedding.budget or lower "
                          "embedding.params.groups")
    cap = min(target - index, full)
    update = resolve_update(params.optimizer, params.lr, spec.extra)
    solved = {"offsets": stack_offsets(vocab), "groups": params.groups, "grouping": params.grouping,
              "scope": params.scope, "group_rows": group_rows_of(spec, params.groups, params.grouping),
              "value_bytes": cap, "index_bytes": index, "l1": params.l1, "alpha_lr": params.alpha_lr,
              "threshold": params.threshold, "search_steps": params.search_steps, "mask_every": params.mask_every,
              "rewind": params.rewind, **update.to_dict(),
              "init_std": {f: row_init_std(spec.init_std, n) for f, n in vocab.items()},
              "init_seed": salted_seed(spec.seed, zlib.crc32(f"autosrh:{spec.prefix}".encode()))}
    budget = {"solver": "autosrh_dims", "budget": spec.budget, "target_bytes": target, "index_bytes": index,
              "value_bytes": cap, "solved_bytes": cap + index}
    return spec.plan("autosrh", [], storage="module", multihot=True, params=solved, budget=budget)


@register_module_assembler("autosrh")
def assemble_autosrh(plan: VariantPlan, device: torch.device | None = None) -> DimSelectedLayer:
    """The dim-selected layer of an ``autosrh`` plan."""
    return DimSelectedLayer(plan, device)


__all__ = ["AutoSrhParams", "DimSelectedLayer", "group_rows_of", "group_sizes", "mask_bytes", "plan_autosrh",
           "select_dims"]
