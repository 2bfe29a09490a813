"""The model registry over families: YAML ``model.name`` -> family, params, builder, metrics.

Families (``recemb.models.ctr``: click models; ``recemb.models.anomaly``: event models)
register their models here, so the trainer, checkpoints and pipelines ask one place
for any model. Every registered model owns its objective (the ``TaskModel`` contract):
``forward(batch)`` gives an output, ``loss(batch, output)`` the mean data loss,
``eval_rows(batch, output)`` the per-row values its ``metrics(rows, labels)`` need;
``predict(batch)`` the one number per row it serves (CTR: the logit; APE: the anomaly
score), which evaluation, ``recemb score``, ``recemb ab`` and bundles use. The trainer
knows nothing else. ``metrics`` names what ``train.monitor`` may weight.

Example:
    >>> model_family("deepfm"), model_family("ape")
    ('ctr', 'anomaly')
    >>> monitorable_metrics("deepfm"), monitorable_metrics("ape")
    (('auc', 'logloss', 'ne', 'calibration'), ('auc', 'ap', 'precision_at_k', 'recall_at_k', 'nce_loss'))
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from recemb.config.experiment import EmbeddingConfig, ModelConfig
from recemb.config.loader import from_dict
from recemb.data.batch import Batch
from recemb.data.schema import FeatureMap
from recemb.embeddings.base import EmbeddingLayer
from recemb.embeddings.registry import check_embedding_config
from recemb.errors import ConfigError

# Modules that register their family's models when imported (in this order).
_FAMILY_MODULES = ("recemb.models.ctr.registry", "recemb.models.anomaly.registry")


@runtime_checkable
class TaskModel(Protocol):
    """What the trainer needs of a model: batch in, loss out, metrics at eval.

    ``eval_rows`` returns ``[B]`` or ``[B, C]`` float values per row (CTR: the logits;
    APE: anomaly score and what its metrics add), gathered over ranks and passed with
    the labels to ``metrics``, which returns plain numbers.
    """

    def forward(self, batch: Batch) -> Any: ...

    def predict(self, batch: Batch) -> torch.Tensor: ...

    def loss(self, batch: Batch, output: Any) -> torch.Tensor: ...

    def eval_rows(self, batch: Batch, output: Any) -> torch.Tensor: ...

    def metrics(self, rows: torch.Tensor, labels: torch.Tensor) -> dict[str, float]: ...


@dataclass(frozen=True)
class ModelNeeds:
    """What a model asks of the embedding side.

    ``equal_dims``: every feature must come out with ``embedding.dim`` (FM,
    DLRM's dot products, APE's inner products), so mixed-dim variants get projected.
    ``linear``: the model also takes a 1-dim embedding layer for its first-order term.
    ``embedding``: the model takes the ``d``-dim layer (LR alone does not).
    """

    equal_dims: bool
    linear: bool
    embedding: bool = True


Builder = Callable[[Any, FeatureMap, EmbeddingConfig, "torch.device | None"], nn.Module]
ParamsCheck = Callable[[Any, "FeatureMap | None"], None]


@dataclass(frozen=True)
class ModelEntry:
    """One registered model.

    ``build(params, feature_map, embedding_cfg, device)`` gets the checked params
    dataclass; ``metrics`` are the names its ``metrics()`` returns that ``train.monitor``
    may weight; ``check(params, feature_map)`` adds the family's own checks of the data.
    """

    name: str
    family: str
    params: type
    build: Builder
    needs: ModelNeeds
    metrics: tuple[str, ...]
    check: ParamsCheck | None = None


_ENTRIES: dict[str, ModelEntry] = {}
_loaded = False


def register_model(entry: ModelEntry) -> ModelEntry:
    """Add ``entry`` (a family module calls this at import); a name may be registered once."""
    if entry.name in _ENTRIES and _ENTRIES[entry.name] is not entry:
        raise ValueError(f"model '{entry.name}' is registered twice")
    _ENTRIES[entry.name] = entry
    return entry


def _load_families() -> None:
    global _loaded
    if not _loaded:
        for module in _FAMILY_MODULES:
            importlib.import_module(module)
        _loaded = True


def model_names(family: str | None = None) -> list[str]:
    """Registered model names (of ``family`` when given)."""
    _load_families()
    return sorted(n for n, e in _ENTRIES.items() if family is None or e.family == family)


def model_entry(name: str) -> ModelEntry:
    """The entry of model ``name``; an unknown name is a ``ConfigError`` listing the known ones."""
    _load_families()
    if name not in _ENTRIES:
        families = sorted({e.family for e in _ENTRIES.values()}, key=lambda f: (f != "ctr", f))
        known = "; ".join(f"{', '.join(model_names(f))} ({f})" for f in families)
        raise ConfigError(f"model.name '{name}' is unknown (known: {known})")
    return _ENTRIES[name]


def model_family(name: str) -> str:
    """The family of model ``name`` (``ctr`` or ``anomaly``)."""
    return model_entry(name).family


def model_needs(name: str) -> ModelNeeds:
    """What model ``name`` needs from the embedding layer (``ConfigError`` if unknown)."""
    return model_entry(name).needs


def monitorable_metrics(name: str) -> tuple[str, ...]:
    """The validation metrics of model ``name`` that ``train.monitor`` may weight."""
    return model_entry(name).metrics


def check_monitor(name: str, monitor: dict[str, float]) -> None:
    """``ValueError`` unless ``monitor`` weights only metrics model ``name`` reports.

    An unknown model name passes here (``check_model_config`` reports it).

    Example:
        >>> check_monitor("fm", {"auc": 1.0})
        >>> check_monitor("fm", {"acc": 1.0})
        Traceback (most recent call last):
        ValueError: monitor names metrics to weight, from those of model 'fm' (ctr): auc, logloss, ne, \
calibration; got {'acc': 1.0}
    """
    _load_families()
    entry = _ENTRIES.get(name)
    if entry is None:
        return
    unknown = sorted(set(monitor) - set(entry.metrics))
    if unknown or not monitor:
        raise ValueError(f"monitor names metrics to weight, from those of model '{name}' ({entry.family}): "
                         f"{', '.join(entry.metrics)}; got {dict(monitor) or 'nothing'}")


def check_model_config(
    cfg: ModelConfig, embedding_cfg: EmbeddingConfig, feature_map: FeatureMap | None = None,
) -> None:
    """Check a model block and the whole embedding block before anything is built or tracked.

    The model's name and ``params``, every embedding setting (``check_embedding_config``:
    kinds, variant params, budgets, and with ``feature_map`` the groups' features) and the
    family's own checks of the data are checked for every model, including those that build
    only part of the block (LR). A mistake is a ``ConfigError`` naming the key.

    Example:
        >>> check_model_config(ModelConfig(name="lr"), EmbeddingConfig(params={"bogus": 1}))
        Traceback (most recent call last):
        recemb.errors.ConfigError: embedding.params: unknown key 'bogus' (known keys of FullParams: shared)
    """
    entry = model_entry(cfg.name)
    params = from_dict(entry.params, cfg.params, where="model.params")
    check_embedding_config(embedding_cfg, feature_map.sparse_features if feature_map is not None else None)
    if entry.check is not None:
        entry.check(params, feature_map)


def build_model(
    cfg: ModelConfig,
    feature_map: FeatureMap,
    embedding_cfg: EmbeddingConfig,
    device: torch.device | None = None,
) -> nn.Module:
    """Build model ``cfg.name`` of any family, with its embedding layer(s), over ``feature_map``.

    Pass ``device=torch.device("meta")`` to build without allocating tables
    (``DistributedModelParallel`` materialises them, and every dense module
    re-initialises through ``reset_parameters``).

    Example:
        >>> model = build_model(ModelConfig(name="ape"), fm, EmbeddingConfig(dim=16))  # doctest: +SKIP
        >>> model.loss(batch, model(batch))                                            # doctest: +SKIP
    """
    check_model_config(cfg, embedding_cfg, feature_map)
    entry = model_entry(cfg.name)
    params = from_dict(entry.params, cfg.params, where="model.params")
    model = entry.build(params, feature_map, embedding_cfg, device)
    if device is not None:
        model.to(device)
    return model


def embedding_layers(model: nn.Module) -> dict[str, EmbeddingLayer]:
    """The model's top-level embedding layers by attribute name (``embedding``, ``linear``, ``unary``).

    For byte reports and export, which need the layers without knowing the model.
    """
    return {name: m for name, m in model.named_children() if isinstance(m, EmbeddingLayer)}


__all__ = ["ModelEntry", "ModelNeeds", "TaskModel", "build_model", "check_model_config", "check_monitor",
           "embedding_layers", "model_entry", "model_family", "model_names", "model_needs", "monitorable_metrics",
           "register_model"]
