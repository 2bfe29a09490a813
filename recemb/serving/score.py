"""The dense half of scoring: our own model code, rebuilt from a bundle, fed numpy lookups.

``DenseScorer`` builds the bundle's model (``build_model`` from the manifest's model and
embedding config) on the meta device, swaps each top-level embedding layer for a
``PrecomputedLayer`` that hands back vectors computed by the numpy runtime, materialises
the rest on CPU and loads the bundle's dense weights (strict: every key, no other). So
the interaction arch is the trained one, not a re-implementation; no code or pickle
comes from the bundle. torch is imported when a scorer is built, never at module level
(``recemb.serving`` must import without torch).

Example:
    >>> scorer = DenseScorer(cfg["model"], cfg["embedding"], fm, dense_weights)   # doctest: +SKIP
    >>> scorer.probabilities(scorer.logits(vectors, dense))                      # doctest: +SKIP
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from recemb.data.schema import FeatureMap
from recemb.errors import DataError


@functools.cache
def _precomputed_layer_class() -> type:
    """``PrecomputedLayer`` (defined on first use: it subclasses a torch module)."""
    from torchrec.sparse.jagged_tensor import KeyedTensor

    from recemb.embeddings.base import EmbeddingLayer

    class PrecomputedLayer(EmbeddingLayer):
        """Stands in for a model's embedding layer ``name``: returns the vectors the batch carries.

        The batch's ``sparse`` is a mapping ``layer name -> {feature: [B, dim] tensor}``, so
        a forward holds no state and concurrent scores do not share anything mutable.
        """

        def __init__(self, name: str, features: list[str], dims: dict[str, int],
                     full_rows: dict[str, int]) -> None:
            super().__init__()
            self.name = name
            self.features = list(features)
            self.dims = dict(dims)
            self.full_rows = dict(full_rows)

        def forward(self, sparse: Any) -> KeyedTensor:  # type: ignore[override]
            vectors = sparse[self.name]
            return KeyedTensor.from_tensor_list(self.features, [vectors[f] for f in self.features])

    return PrecomputedLayer


class DenseScorer:
    """The bundle's model with its embedding layers replaced by precomputed vectors (see module docstring)."""

    def __init__(self, model_config: dict[str, Any], embedding_config: dict[str, Any], feature_map: FeatureMap,
                 dense_weights: dict[str, np.ndarray]) -> None:
        import torch

        from recemb.config.experiment import EmbeddingConfig, ModelConfig
        from recemb.config.loader import from_dict
        from recemb.models.registry import build_model, embedding_layers

        model = build_model(from_dict(ModelConfig, model_config, where="bundle model config"), feature_map,
                            from_dict(EmbeddingConfig, embedding_config, where="bundle embedding config"),
                            device=torch.device("meta"))
        stand_in = _precomputed_layer_class()
        self.layers: dict[str, list[str]] = {}
        for name, layer in embedding_layers(model).items():
            setattr(model, name, stand_in(name, layer.features, layer.dims, layer.full_rows))
            self.layers[name] = list(layer.features)
        model.to_empty(device=torch.device("cpu"))
        for module in model.modules():  # non-persistent buffers (e.g. DLRM's pair indices) are rebuilt here
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
        try:
            model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in dense_weights.items()}, strict=True)
        except RuntimeError as e:
            raise DataError(f"the bundle's dense weights do not fit its model config "
                            f"({str(e).splitlines()[0]}); export it again") from None
        model.eval()
        self.model = model

    def _batch(self, vectors: dict[str, dict[str, np.ndarray]], dense: np.ndarray) -> Any:
        import torch

        from recemb.data.batch import Batch

        sparse = {name: {f: torch.from_numpy(np.ascontiguousarray(vectors[name][f], dtype=np.float32))
                         for f in features} for name, features in self.layers.items()}
        n = dense.shape[0]
        return Batch(dense=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
                     sparse=sparse, labels=torch.zeros(n))  # type: ignore[arg-type]

    def logits(self, vectors: dict[str, dict[str, np.ndarray]], dense: np.ndarray) -> np.ndarray:
        """What the model serves per row ``[B]`` (its ``predict``: a CTR logit, APE's anomaly
        score) from each layer's vectors per feature and the dense inputs ``[B, D]``."""
        import torch

        with torch.no_grad():
            return self.model.predict(self._batch(vectors, dense)).float().reshape(-1).numpy()

    @property
    def explains(self) -> bool:
        """Whether the model says why a row scores as it does (``explain``: APE's top pair)."""
        return callable(getattr(self.model, "explain", None))

    def explain(self, vectors: dict[str, dict[str, np.ndarray]], dense: np.ndarray) -> dict[str, np.ndarray]:
        """The model's ``explain`` columns per row (empty when it has none)."""
        import torch

        if not self.explains:
            return {}
        with torch.no_grad():
            out = self.model.explain(self._batch(vectors, dense))
        return {k: v.numpy() for k, v in out.items()}

    @staticmethod
    def probabilities(logits: np.ndarray) -> np.ndarray:
        """``sigmoid(logits)`` as torch computes it (what ``recemb evaluate`` writes as ``prob``)."""
        import torch

        return torch.sigmoid(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))).numpy()


__all__ = ["DenseScorer"]
