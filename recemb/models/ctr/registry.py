"""Model registry (YAML ``model.name`` -> params dataclass and model class) and ``build_model``.

``build_model`` checks ``model.params`` against the model's dataclass (unknown
keys and wrong types are ``ConfigError``s), builds the embedding layer(s) the
model needs and hands them to the model's constructor. Models never build their
own embeddings, so every variant works with every model.

Example:
    >>> model = build_model(ModelConfig(name="deepfm", params={"mlp": [64]}), fm,
    ...                     EmbeddingConfig(kind="full", dim=8))     # doctest: +SKIP
    >>> model(batch).shape                                           # doctest: +SKIP
    torch.Size([4096])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from recemb.config.experiment import EmbeddingConfig, ModelConfig
from recemb.config.loader import from_dict
from recemb.data.schema import FeatureMap
from recemb.embeddings.base import EmbeddingLayer
from recemb.embeddings.registry import build_embedding_layer
from recemb.errors import ConfigError
from recemb.models.ctr.dcnv2 import DCNv2, DCNv2Params
from recemb.models.ctr.deepfm import DeepFM, DeepFMParams
from recemb.models.ctr.dlrm import DLRM, DLRMParams
from recemb.models.ctr.fm import FM, FMParams
from recemb.models.ctr.lr import LR, LRParams
from recemb.models.ctr.wdl import WDL, WDLParams

MODELS: dict[str, tuple[type, type[nn.Module]]] = {
    "lr": (LRParams, LR),
    "fm": (FMParams, FM),
    "deepfm": (DeepFMParams, DeepFM),
    "dcnv2": (DCNv2Params, DCNv2),
    "dlrm": (DLRMParams, DLRM),
    "wdl": (WDLParams, WDL),
}


@dataclass(frozen=True)
class ModelNeeds:
    """What a model asks of the embedding side.

    ``equal_dims``: every feature must come out with ``embedding.dim`` (FM,
    DLRM's dot products), so mixed-dim variants get projected. ``linear``: the
    model also takes a 1-dim embedding layer for its first-order term.
    ``embedding``: the model takes the ``d``-dim layer (LR alone does not).
    """

    equal_dims: bool
    linear: bool
    embedding: bool = True


_NEEDS: dict[str, ModelNeeds] = {
    "lr": ModelNeeds(equal_dims=False, linear=True, embedding=False),
    "fm": ModelNeeds(equal_dims=True, linear=True),
    "deepfm": ModelNeeds(equal_dims=True, linear=True),
    "dcnv2": ModelNeeds(equal_dims=False, linear=False),
    "dlrm": ModelNeeds(equal_dims=True, linear=False),
    "wdl": ModelNeeds(equal_dims=False, linear=True),
}


def model_names() -> list[str]:
    """Registered model names."""
    return sorted(MODELS)


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise ConfigError(f"model.name '{name}' is unknown (known: {', '.join(model_names())})")


def model_needs(name: str) -> ModelNeeds:
    """What model ``name`` needs from the embedding layer (``ConfigError`` if unknown)."""
    _check_name(name)
    return _NEEDS[name]


# FBGEMM's fused kernels need table widths divisible by 4, so the "1-dim" first-order
# tables are 4 wide and FirstOrder sums the 4 columns (4 weights per id, same function class).
LINEAR_DIM = 4


def linear_embedding_config(embedding_cfg: EmbeddingConfig) -> EmbeddingConfig:
    """The config of the first-order tables (``LINEAR_DIM`` wide) derived from the main embedding config.

    For now the linear part is always a plain ``full`` layer without groups or
    budget, whatever variant the main layer uses: it is ``1/dim`` of the main
    tables' bytes, and compressing it too is a later choice (it would keep
    ``kind``/``params`` here instead).
    """
    return dataclasses.replace(
        embedding_cfg, kind="full", dim=LINEAR_DIM, budget=None, params={}, groups=[]
    )


def build_model(
    cfg: ModelConfig,
    feature_map: FeatureMap,
    embedding_cfg: EmbeddingConfig,
    device: torch.device | None = None,
) -> nn.Module:
    """Build model ``cfg.name`` with its embedding layer(s) over ``feature_map``'s features.

    Pass ``device=torch.device("meta")`` to build without allocating tables
    (``DistributedModelParallel`` materialises them, and every dense module
    re-initialises through ``reset_parameters``).
    """
    needs = model_needs(cfg.name)
    params_cls, model_cls = MODELS[cfg.name]
    params = from_dict(params_cls, cfg.params, where="model.params")
    kwargs: dict[str, object] = {"num_dense": len(feature_map.dense_features), "params": params}
    if needs.embedding:
        project_to = embedding_cfg.dim if needs.equal_dims else None
        kwargs["embedding"] = build_embedding_layer(feature_map, embedding_cfg, device=device, project_to=project_to)
    if needs.linear:
        kwargs["linear"] = build_embedding_layer(
            feature_map, linear_embedding_config(embedding_cfg), device=device, name_prefix="lin_"
        )
    model = model_cls(**kwargs)
    if device is not None:
        model.to(device)
    return model


def embedding_layers(model: nn.Module) -> dict[str, EmbeddingLayer]:
    """The model's top-level embedding layers by attribute name (``embedding``, ``linear``).

    For byte reports and export, which need the layers without knowing the model.
    """
    return {name: m for name, m in model.named_children() if isinstance(m, EmbeddingLayer)}
