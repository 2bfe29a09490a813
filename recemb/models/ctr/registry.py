"""CTR models (``lr``, ``fm``, ``deepfm``, ``dcnv2``, ``dlrm``, ``wdl``) in the top-level model registry.

Each CTR model is registered in ``recemb.models.registry`` with its params dataclass
and ``build_ctr_model``, which builds the embedding layer(s) the model needs (a
``d``-dim layer, a first-order layer) and hands them to the model's constructor.
Models never build their own embeddings, so every variant works with every model.
``build_model``, ``check_model_config``, ``model_needs``, ``embedding_layers`` and
``ModelNeeds`` live in ``recemb.models.registry``; the names here are the same objects,
for importers written before the move.

Example:
    >>> model = build_model(ModelConfig(name="deepfm", params={"mlp": [64]}), fm,
    ...                     EmbeddingConfig(kind="full", dim=8))     # doctest: +SKIP
    >>> model(batch).shape                                           # doctest: +SKIP
    torch.Size([4096])
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from recemb.config.experiment import EmbeddingConfig, ModelConfig
from recemb.data.schema import FeatureMap
from recemb.embeddings.base import EmbeddingLayer
from recemb.embeddings.budget import MIN_BYTE_BUDGET
from recemb.embeddings.registry import build_embedding_layer
from recemb.errors import ConfigError
from recemb.eval.metrics import CTR_METRICS
from recemb.models.ctr.dcnv2 import DCNv2, DCNv2Params
from recemb.models.ctr.deepfm import DeepFM, DeepFMParams
from recemb.models.ctr.dlrm import DLRM, DLRMParams
from recemb.models.ctr.fm import FM, FMParams
from recemb.models.ctr.layers import LINEAR_DIM
from recemb.models.ctr.lr import LR, LRParams
from recemb.models.ctr.wdl import WDL, WDLParams
from recemb.models.registry import (
    ModelEntry,
    ModelNeeds,
    build_model,
    check_model_config,
    embedding_layers,
    model_needs,
    register_model,
)

MODELS: dict[str, tuple[type, type[nn.Module]]] = {
    "lr": (LRParams, LR),
    "fm": (FMParams, FM),
    "deepfm": (DeepFMParams, DeepFM),
    "dcnv2": (DCNv2Params, DCNv2),
    "dlrm": (DLRMParams, DLRM),
    "wdl": (WDLParams, WDL),
}


_NEEDS: dict[str, ModelNeeds] = {
    "lr": ModelNeeds(equal_dims=False, linear=True, embedding=False),
    "fm": ModelNeeds(equal_dims=True, linear=True),
    "deepfm": ModelNeeds(equal_dims=True, linear=True),
    "dcnv2": ModelNeeds(equal_dims=False, linear=False),
    "dlrm": ModelNeeds(equal_dims=True, linear=False),
    "wdl": ModelNeeds(equal_dims=False, linear=True),
}


def model_names() -> list[str]:
    """Registered CTR model names."""
    return sorted(MODELS)


def takes_linear_layer(needs: ModelNeeds, params: object) -> bool:
    """Whether a model with ``params`` gets a first-order embedding layer: it needs a linear term
    and does not take it from the main embeddings (``first_order: embedding`` of DeepFM, WDL and
    FM). LR has no main embeddings: its first-order table is its only lookup, so it always has one."""
    return needs.linear and getattr(params, "first_order", "table") == "table"


# Variants that cannot also serve the first-order tables (no budget of their own, or search-only).
_LINEAR_STAYS_FULL = frozenset({"full", "optembed", "pruned", "lowprec"})


def linear_embedding_config(embedding_cfg: EmbeddingConfig, alone: bool = False) -> EmbeddingConfig:
    """The config of the first-order tables (``LINEAR_DIM`` wide) derived from the main embedding config.

    With a ``budget``, the first-order tables use the same variant at the same
    budget, with the variant's default params (the main layer's may not suit
    width 4), so the budget covers all of the model's embedding bytes. A byte
    budget (> 1) is split between the two layers in proportion to their widths
    (see ``main_embedding_config``), unless the model has no main layer
    (``alone``, e.g. LR). Without a budget, and for variants in
    ``_LINEAR_STAYS_FULL``, they are plain ``full`` tables (``1/4`` of the main
    tables' bytes at dim 16). Groups keep their kind and budget the same way;
    those that end up like the rest (only their dim or params differed) merge in.
    """
    def linear_kind(kind: str, budget: float | None, dim: int) -> tuple[str, float | None]:
        if budget is None or kind in _LINEAR_STAYS_FULL:
            return "full", None
        return kind, budget if budget <= 1 or alone else _byte_share(budget, LINEAR_DIM, dim)

    kind, budget = linear_kind(embedding_cfg.kind, embedding_cfg.budget, embedding_cfg.dim)
    groups = []
    for g in embedding_cfg.groups:
        g_kind, g_budget = linear_kind(g.kind or embedding_cfg.kind,
                                       g.budget if g.budget is not None else embedding_cfg.budget,
                                       g.dim or embedding_cfg.dim)
        if (g_kind, g_budget, g.sharding or embedding_cfg.sharding) != (kind, budget, embedding_cfg.sharding):
            groups.append(dataclasses.replace(g, kind=g_kind, budget=g_budget, dim=None, params={}))
    return dataclasses.replace(embedding_cfg, kind=kind, dim=LINEAR_DIM, budget=budget, params={}, groups=groups)


def _byte_share(budget: float, width: int, main_dim: int) -> float:
    """The part of a byte budget (> 1) that a layer of ``width`` gets next to a ``main_dim`` layer and the
    ``LINEAR_DIM`` first-order layer: ``width / (main_dim + LINEAR_DIM)``, so both keep the same fraction."""
    return max(float(MIN_BYTE_BUDGET), budget * width / (main_dim + LINEAR_DIM))


def main_embedding_config(embedding_cfg: EmbeddingConfig, with_linear: bool) -> EmbeddingConfig:
    """The main layer's config: byte budgets (> 1) shrink to their share when first-order tables share them."""
    if not with_linear:
        return embedding_cfg

    def share(budget: float | None, kind: str, dim: int) -> float | None:
        if budget is None or budget <= 1 or kind in _LINEAR_STAYS_FULL:
            return budget
        return _byte_share(budget, dim, dim)

    groups = [dataclasses.replace(g, budget=share(g.budget, g.kind or embedding_cfg.kind, g.dim or embedding_cfg.dim))
              for g in embedding_cfg.groups]
    return dataclasses.replace(
        embedding_cfg, budget=share(embedding_cfg.budget, embedding_cfg.kind, embedding_cfg.dim), groups=groups)


class _BlockError(ConfigError):
    """A layer of the model could not be built; the message names it."""


def _layer(block: str, feature_map: FeatureMap, cfg: EmbeddingConfig, device: torch.device | None,
           **kwargs: Any) -> EmbeddingLayer:
    try:
        return build_embedding_layer(feature_map, cfg, device=device, **kwargs)
    except ConfigError as exc:
        budget = "" if cfg.budget is None else (
            f", its budget {int(cfg.budget):,} bytes" if cfg.budget > 1 else f", its budget {cfg.budget:g}")
        raise _BlockError(f"the {block} ({cfg.kind}, {cfg.dim} wide{budget}): {exc}") from None


def _build(name: str, params: Any, feature_map: FeatureMap, embedding_cfg: EmbeddingConfig,
           device: torch.device | None) -> nn.Module:
    needs = _NEEDS[name]
    kwargs: dict[str, object] = {"num_dense": len(feature_map.dense_features), "params": params}
    if needs.embedding:
        project_to = embedding_cfg.dim if needs.equal_dims else None
        # Without first-order tables the main tables get the whole budget.
        main_cfg = main_embedding_config(embedding_cfg, with_linear=takes_linear_layer(needs, params))
        kwargs["embedding"] = _layer("main embedding tables", feature_map, main_cfg, device, project_to=project_to)
    if needs.linear and not takes_linear_layer(needs, params):
        kwargs["linear"] = None
    elif needs.linear:
        linear_cfg = linear_embedding_config(embedding_cfg, alone=not needs.embedding)
        kwargs["linear"] = _layer("first-order tables", feature_map, linear_cfg, device, name_prefix="lin_")
    return MODELS[name][1](**kwargs)


def smallest_budget(name: str, params: Any, feature_map: FeatureMap, embedding_cfg: EmbeddingConfig) -> float | None:
    """The smallest top-level ``embedding.budget`` with which every layer of model ``name`` builds
    (bytes for a byte budget, else a fraction to 4 decimals); None without a budget, or when none works.

    Found by building on the meta device (nothing is allocated), doubling then bisecting.
    """
    budget = embedding_cfg.budget
    if budget is None:
        return None

    def builds(value: float) -> bool:
        try:
            _build(name, params, feature_map, dataclasses.replace(embedding_cfg, budget=value), torch.device("meta"))
        except ConfigError:
            return False
        return True

    if budget > 1:
        lo, hi = int(budget), int(budget) * 2
        while not builds(hi):
            lo, hi = hi, hi * 2
            if hi > 1 << 50:
                return None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if builds(mid) else (mid, hi)
        return float(hi)
    lo_f, hi_f = budget, 1.0
    if not builds(hi_f):
        return None
    while hi_f - lo_f > 1e-4:
        mid_f = (lo_f + hi_f) / 2
        lo_f, hi_f = (lo_f, mid_f) if builds(mid_f) else (mid_f, hi_f)
    return math.ceil(hi_f * 1e4) / 1e4


def build_ctr_model(
    name: str, params: Any, feature_map: FeatureMap, embedding_cfg: EmbeddingConfig,
    device: torch.device | None = None,
) -> nn.Module:
    """Build CTR model ``name`` from its checked ``params`` with its embedding layer(s) over
    ``feature_map``'s sparse features (``recemb.models.registry.build_model`` calls this).

    A layer that cannot be built is a ``ConfigError`` naming it (the main tables or the
    first-order tables, and the feature group) and, for a budget too small, the smallest
    ``embedding.budget`` that builds this model.
    """
    try:
        return _build(name, params, feature_map, embedding_cfg, device)
    except _BlockError as exc:
        smallest = smallest_budget(name, params, feature_map, embedding_cfg)
        hint = ""
        if smallest is not None:
            shown = f"{smallest:,.0f} bytes" if smallest > 1 else f"{smallest:g}"
            hint = f"; the smallest embedding.budget this model ({name}) builds with is {shown}"
        raise ConfigError(f"{exc}{hint}") from None


def _register() -> None:
    for name, (params_cls, _) in MODELS.items():
        def build(params: Any, fm: FeatureMap, emb: EmbeddingConfig, device: torch.device | None,
                  name: str = name) -> nn.Module:
            return build_ctr_model(name, params, fm, emb, device)

        register_model(ModelEntry(name=name, family="ctr", params=params_cls, build=build, needs=_NEEDS[name],
                                  metrics=CTR_METRICS))


_register()

__all__ = ["LINEAR_DIM", "MODELS", "ModelConfig", "ModelNeeds", "build_ctr_model", "build_model", "check_model_config",
           "embedding_layers", "linear_embedding_config", "main_embedding_config", "model_names", "model_needs",
           "smallest_budget", "takes_linear_layer"]
