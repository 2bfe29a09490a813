"""Variant registry (YAML ``embedding.kind`` -> builder) and the layer factory.

Each variant file registers a builder and a params dataclass; ``build_embedding_layer``
resolves per-group overrides, checks each group's ``params`` against its
variant's dataclass (unknown keys are errors) and assembles one ``EmbeddingLayer``.

Example:
    >>> layer = build_embedding_layer(fm, EmbeddingConfig(kind="full", dim=8))  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from recemb.config.experiment import EmbeddingConfig
from recemb.config.loader import from_dict
from recemb.data.schema import FeatureInfo, FeatureMap
from recemb.embeddings.base import EmbeddingLayer, GroupedEmbeddingLayer, ProjectedLayer, TableEmbeddingLayer
from recemb.embeddings.budget import MIN_BYTE_BUDGET, check_budget
from recemb.embeddings.plan import Capabilities, CombinerPlan, TablePlan, TransformPlan, VariantPlan
from recemb.errors import ConfigError


@dataclass
class VariantSpec:
    """What a builder gets for one group: its features and resolved settings.

    ``prefix`` makes physical table names unique across groups; ``sharding``
    is recorded on the layer for the planner (see ``recemb.embeddings.sharding``).
    ``extra`` carries ``embedding.lr``, ``eps`` and ``initial_accumulator`` for variants that update their own
    storage (``lowprec``). ``hash_name`` is ``embedding.hash``: the bucket hash the hashing variants
    write into their plans (``recemb.embeddings.idhash.HASHES``).
    """

    features: list[FeatureInfo]
    dim: int
    budget: float | None
    params: Any
    init_std: float | None = None
    sharding: str = "auto"
    prefix: str = ""
    device: torch.device | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    feature_map: FeatureMap | None = None
    seed: int = 0
    hash_name: str = "mulshift"

    def id_counts(self, name: str) -> np.ndarray | None:
        """Training counts per id of feature ``name`` (``None`` when unknown), for frequency-aware variants."""
        return None if self.feature_map is None else self.feature_map.id_counts(name)

    @property
    def names(self) -> list[str]:
        """The group's feature names, in order."""
        return [f.name for f in self.features]

    @property
    def vocab(self) -> dict[str, int]:
        """Logical ids (rows of a full table) per feature."""
        return {f.name: f.num_embeddings for f in self.features}

    def table(self, name: str, rows: int, dim: int, keys: list[str], init_mean: float = 0.0) -> TablePlan:
        """A physical table of this group: name prefixed, the group's sharding and init std."""
        return TablePlan(name=self.prefix + name, rows=rows, dim=dim, keys=list(keys), sharding=self.sharding,
                         init_mean=init_mean, init_std=self.init_std)

    def plan(self, kind: str, tables: list[TablePlan], dims: dict[str, int] | None = None,
             transform: TransformPlan | None = None, combiner: CombinerPlan | None = None,
             arrays: dict[str, np.ndarray] | None = None, params: dict[str, Any] | None = None,
             **capabilities: Any) -> VariantPlan:
        """The plan of variant ``kind`` over this group's features (dims default to ``self.dim``);
        ``params`` are a module variant's solved settings; ``capabilities`` are ``Capabilities``
        fields (``storage``, ``multihot``, ``budget``)."""
        return VariantPlan(
            kind=kind, features=self.names, dims=dims or {f: self.dim for f in self.names}, full_rows=self.vocab,
            transform=transform or TransformPlan(), tables=tables, combiner=combiner or CombinerPlan(),
            capabilities=Capabilities(**capabilities), params=dict(params or {}), seed=self.seed,
            arrays=dict(arrays or {}),
        )


# A builder returns the variant's plan (``assemble`` builds the layer from it); builders not yet
# converted return the layer itself.
Builder = Callable[[VariantSpec], "VariantPlan | EmbeddingLayer"]
ModuleAssembler = Callable[[VariantPlan, "torch.device | None"], EmbeddingLayer]
_REGISTRY: dict[str, tuple[type, Builder]] = {}
_MODULE_ASSEMBLERS: dict[str, ModuleAssembler] = {}


def register_variant(kind: str, params_cls: type) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder`` (spec -> ``VariantPlan``) for ``embedding.kind == kind``."""

    def wrap(builder: Builder) -> Builder:
        _REGISTRY[kind] = (params_cls, builder)
        return builder

    return wrap


def register_module_assembler(kind: str) -> Callable[[ModuleAssembler], ModuleAssembler]:
    """Decorator: how a plan of ``storage: module`` (TT, DHE, lowprec) becomes its layer.
    Table variants need none: ``TableEmbeddingLayer.from_plan`` assembles them."""

    def wrap(fn: ModuleAssembler) -> ModuleAssembler:
        _MODULE_ASSEMBLERS[kind] = fn
        return fn

    return wrap


def assemble(plan: VariantPlan, device: torch.device | None = None) -> EmbeddingLayer:
    """The one way from a plan to its torch layer; the plan's ``achieved_bytes`` is set from it.

    Example:
        >>> layer = assemble(plan_of_hashed, torch.device("meta"))   # doctest: +SKIP
        >>> layer.plan is plan_of_hashed                               # doctest: +SKIP
        True
    """
    _load_builtin()
    if plan.capabilities.storage == "module":
        if plan.kind not in _MODULE_ASSEMBLERS:
            raise KeyError(f"no module assembler registered for variant '{plan.kind}'")
        layer = _MODULE_ASSEMBLERS[plan.kind](plan, device)
    else:
        layer = TableEmbeddingLayer.from_plan(plan, device)
    layer.plan = plan
    plan.capabilities.achieved_bytes = layer.parameter_bytes()
    return layer


def build_variant(kind: str, spec: VariantSpec) -> EmbeddingLayer:
    """Plan and assemble variant ``kind`` for ``spec`` (builders not yet converted build directly)."""
    _load_builtin()
    built = _REGISTRY[kind][1](spec)
    return assemble(built, spec.device) if isinstance(built, VariantPlan) else built


# Modules of recemb.embeddings that are infrastructure, not variants.
_NOT_VARIANTS = frozenset({"base", "budget", "hashing", "idhash", "plan", "registry", "sharding"})


@functools.cache
def _load_builtin() -> None:
    """Import every variant module of ``recemb.embeddings`` (each registers itself)."""
    import recemb.embeddings as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _NOT_VARIANTS and not info.name.startswith("_"):
            importlib.import_module(f"recemb.embeddings.{info.name}")


def variant_kinds() -> list[str]:
    """Registered ``embedding.kind`` names."""
    _load_builtin()
    return sorted(_REGISTRY)


def init_fn(std: float | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Normal(0, std) initialiser for tables, or None for torchrec's default."""
    if std is None:
        return None
    return functools.partial(torch.nn.init.normal_, mean=0.0, std=std)


def _split_byte_budget(
    feature_map: FeatureMap, blocks: list[Any], inherits: list[bool], budget: float
) -> list[Any]:
    """Share a byte budget (> 1) among the blocks that inherit it, in proportion to their full bytes."""
    full = [sum(feature_map.feature(f).num_embeddings for f in b[1]) * b[3] for b in blocks]
    total = sum(n for n, inherit in zip(full, inherits, strict=True) if inherit)
    out = []
    for block, n, inherit in zip(blocks, full, inherits, strict=True):
        if inherit and total:
            block = (*block[:4], max(float(MIN_BYTE_BUDGET), budget * n / total), *block[5:])
        out.append(block)
    return out


def _group_owners(cfg: EmbeddingConfig, sparse: Sequence[str] | None) -> dict[str, int]:
    """Feature -> index of the group that names it; unknown (when ``sparse`` is given) or
    doubly claimed features are ``ConfigError``s."""
    owner: dict[str, int] = {}
    for gi, group in enumerate(cfg.groups):
        for name in group.features:
            if sparse is not None and name not in sparse:
                known = ", ".join(sparse)
                raise ConfigError(f"embedding.groups[{gi}]: unknown sparse feature '{name}' (sparse features: {known})")
            if name in owner:
                raise ConfigError(f"embedding.groups[{gi}]: feature '{name}' is already in group {owner[name]}")
            owner[name] = gi
    return owner


def _typed_params(kind: str, params: dict[str, Any], where: str) -> Any:
    """``params`` checked against variant ``kind``'s dataclass (unknown kind or key: ``ConfigError``)."""
    _load_builtin()
    if kind not in _REGISTRY:
        raise ConfigError(f"embedding.kind '{kind}' is unknown (known: {', '.join(sorted(_REGISTRY))})")
    return from_dict(_REGISTRY[kind][0], params, where=where)


def check_embedding_config(cfg: EmbeddingConfig, sparse_features: Sequence[str] | None = None) -> None:
    """Check all of ``cfg`` without building anything: every kind (top level and groups) is
    registered, every ``params`` fits its variant's dataclass, budgets are in range, and (with
    ``sparse_features``) every group names existing features, each once.

    Models call this on the whole block even where they build only part of it (LR builds only
    first-order tables, which drop ``params``), so a typo is an error for every model.

    Example:
        >>> check_embedding_config(EmbeddingConfig(kind="bogus"))  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        recemb.errors.ConfigError: embedding.kind 'bogus' is unknown (known: ...)
    """
    _group_owners(cfg, sparse_features)
    if cfg.budget is not None:
        check_budget(cfg.budget)
    _typed_params(cfg.kind, cfg.params, "embedding.params")
    for gi, group in enumerate(cfg.groups):
        same = group.kind is None or group.kind == cfg.kind
        if group.budget is not None:
            check_budget(group.budget)
        if group.params or not same:
            _typed_params(group.kind or cfg.kind, group.params, f"embedding.groups[{gi}].params")


def _group_specs(
    feature_map: FeatureMap, cfg: EmbeddingConfig, device: torch.device | None, name_prefix: str = ""
) -> list[tuple[str, str, VariantSpec]]:
    sparse = feature_map.sparse_features
    owner = _group_owners(cfg, sparse)
    out: list[tuple[str, str, VariantSpec]] = []
    rest = [f for f in sparse if f not in owner]
    blocks: list[tuple[str, list[str], str, int, float | None, str, dict[str, Any]]] = []
    inherits: list[bool] = []  # whether the block takes the top-level budget
    if rest:
        blocks.append(("default", rest, cfg.kind, cfg.dim, cfg.budget, cfg.sharding, cfg.params))
        inherits.append(True)
    for gi, group in enumerate(cfg.groups):
        # Budget and params are the top-level ones only for a group of the same kind: another
        # variant's params would not fit, and a group switched to e.g. `full` asks for no compression.
        same = group.kind is None or group.kind == cfg.kind
        blocks.append((
            f"g{gi}", group.features, group.kind or cfg.kind, group.dim or cfg.dim,
            group.budget if group.budget is not None else cfg.budget if same else None,
            group.sharding or cfg.sharding, group.params if group.params or not same else cfg.params,
        ))
        inherits.append(same and group.budget is None)
    for block in blocks:
        if block[4] is not None:
            check_budget(block[4])
    if cfg.budget is not None and cfg.budget > 1:
        blocks = _split_byte_budget(feature_map, blocks, inherits, cfg.budget)
    for name, feats, kind, dim, budget, sharding, params in blocks:
        where = "embedding.params" if name == "default" else f"embedding.groups[{name[1:]}].params"
        typed = _typed_params(kind, params, where)
        spec = VariantSpec(
            features=[feature_map.feature(f) for f in feats], dim=dim, budget=budget, params=typed,
            init_std=cfg.init_std, sharding=sharding, prefix=name_prefix + ("" if name == "default" else f"{name}_"),
            device=device, feature_map=feature_map, seed=cfg.seed, hash_name=cfg.hash, extra={"lr": cfg.lr, "eps": cfg.eps, "initial_accumulator": cfg.initial_accumulator},
        )
        out.append((name, kind, spec))
    return out


def _build_block(name: str, kind: str, spec: VariantSpec, several: bool) -> EmbeddingLayer:
    """``build_variant``; with several feature groups, an error names the group that failed."""
    try:
        return build_variant(kind, spec)
    except ConfigError as exc:
        if not several:
            raise
        features = [f.name for f in spec.features]
        shown = ", ".join(features[:4]) + (f", ... ({len(features)} features)" if len(features) > 4 else "")
        group = "the features in no embedding.groups entry" if name == "default" else f"embedding.groups[{name[1:]}]"
        raise ConfigError(f"{group} ({shown}): {exc}") from None


def build_embedding_layer(
    feature_map: FeatureMap,
    cfg: EmbeddingConfig,
    device: torch.device | None = None,
    project_to: int | None = None,
    name_prefix: str = "",
) -> EmbeddingLayer:
    """Build the embedding layer for ``feature_map``'s sparse features from ``cfg``.

    With ``project_to`` every feature comes out with that dim (projected where
    the variant gives another). ``name_prefix`` keeps physical table names
    unique when a model has several layers (e.g. ``lin_`` for first-order tables). Pass ``device=torch.device("meta")`` to build
    without allocating tables (DistributedModelParallel materialises the shards).
    """
    specs = _group_specs(feature_map, cfg, device, name_prefix)
    layers = {name: _build_block(name, kind, spec, several=len(specs) > 1) for name, kind, spec in specs}
    layer = next(iter(layers.values())) if len(layers) == 1 else GroupedEmbeddingLayer(
        layers, feature_map.sparse_features
    )
    if project_to is not None and any(d != project_to for d in layer.dims.values()):
        layer = ProjectedLayer(layer, project_to)
    return layer
