"""Every config error a run can hit, checked before anything is tracked, written or trained.

``recemb config show`` and ``recemb train`` call ``check_run`` before an MLflow run or a
run folder exists, so a mistake (an unknown ``embedding.kind``, a budget too small for one
block, an optimizer the device cannot fuse) is a one-line ``ConfigError`` and not a FAILED
run. The model is built on the meta device for this (no table is allocated).

Example:
    >>> check_run(load_experiment("configs/experiments/deepfm_synthetic_ctr.yaml",
    ...                           ["embedding.kind=bogus"]), fm)                # doctest: +SKIP
    Traceback (most recent call last):
    recemb.errors.ConfigError: embedding.kind 'bogus' is unknown (known: ...)
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recemb.config.experiment import ExperimentConfig
from recemb.data.schema import FeatureMap
from recemb.embeddings.base import FBGEMM_WIDTH, pad_for_fbgemm
from recemb.embeddings.sharding import (
    check_initial_accumulator,
    check_sparse_optimizer,
    check_weight_decay,
    table_sharding,
)
from recemb.errors import ConfigError
from recemb.models.registry import build_model, check_model_config
from recemb.train.loop import resolve_device


def planned_device(cfg: ExperimentConfig) -> torch.device:
    """The device the run's ranks will train on.

    In this process (``cluster.workers == 0``): ``train.device`` resolved here (``cuda``
    without a GPU is a ``ConfigError``). On Ray workers, which get a GPU only for
    ``train.device=cuda``: that device's type, unchecked here (the driver may have no GPU).
    """
    if cfg.cluster.workers <= 0:
        return resolve_device(cfg.train.device)
    return torch.device("cuda" if cfg.train.device == "cuda" else "cpu")


def check_run(cfg: ExperimentConfig, feature_map: FeatureMap | None) -> None:
    """Raise the ``ConfigError`` that building and sharding ``cfg`` would raise, without doing either.

    Checks the model and embedding blocks (names, params, kinds, budgets, group features),
    the sparse optimizer's settings on the planned device and, given the prepared data's
    ``feature_map``, builds the model on the meta device: budgets too small for a block
    fail there, naming the block.
    """
    check_model_config(cfg.model, cfg.embedding, feature_map)
    device = planned_device(cfg)
    emb = cfg.embedding
    check_sparse_optimizer(emb.optimizer, device, emb.sharding)
    check_initial_accumulator(emb)
    fused = True
    if feature_map is not None:
        model = build_model(cfg.model, feature_map, emb, device=torch.device("meta"))
        pad_for_fbgemm(model)  # as training does
        check_table_widths(model, cfg.embedding.kind)
        requested = table_sharding(model)
        # Only data-parallel tables run without FBGEMM's fused kernels ("auto" is planned fused here).
        fused = not requested or any(kind != "data_parallel" for kind in requested.values())
    check_weight_decay(emb, device, fused=fused)


def check_table_widths(model: nn.Module, kind: str) -> None:
    """Refuse tables FBGEMM cannot run: widths not divisible by 4 that no layer padded.

    Run after ``pad_for_fbgemm`` (as training does). Every layer that holds torchrec tables pads
    such widths itself today: the table-backed variants (``TableEmbeddingLayer``, also inside
    grouped and projected layers) and ``pruned`` (``PrunedLayer``, since it pads its compact
    tables too). What this still guards is any other ``EmbeddingBagCollection`` in the model, one
    that no layer's ``pad_for_fbgemm`` reaches (a layer added later that keeps a collection and
    does not pad it): without this check torchrec would stop with an assertion deep in sharding
    instead of a ``ConfigError`` before the run.
    """
    narrow = [(t.name, t.embedding_dim) for m in model.modules() if isinstance(m, EmbeddingBagCollection)
              for t in m.embedding_bag_configs() if t.embedding_dim % FBGEMM_WIDTH]
    if narrow:
        name, dim = narrow[0]
        raise ConfigError(
            f"table '{name}' is {dim} wide ({len(narrow)} such tables), and FBGEMM's kernels run only widths "
            f"divisible by {FBGEMM_WIDTH}; embedding.kind={kind} does not pad its tables: set embedding.dim "
            f"(and any groups' dim) to a multiple of {FBGEMM_WIDTH} (4, 8, 12, 16, ...)"
        )


__all__ = ["check_run", "check_table_widths", "planned_device"]
