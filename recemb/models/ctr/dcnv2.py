"""DCN-V2: explicit feature crosses (cross network) next to or before an MLP.

Input ``x_0`` is the flattened embeddings concatenated with the dense features.
``stacked``: the MLP reads the cross network's output; ``parallel``: the cross
network and the MLP both read ``x_0`` and a linear layer reads both outputs.
``low_rank > 0`` factorises each cross matrix as ``U V^T`` (the paper's
cost-saving variant). Embeddings may have per-feature dims.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from recemb.data.batch import Batch
from recemb.embeddings.base import EmbeddingLayer
from recemb.models.ctr.layers import MLP, CrossNetwork, check_mlp
from recemb.models.ctr.objective import BinaryObjective


@dataclass
class DCNv2Params:
    """Cross network depth and rank, how it meets the MLP, and the MLP's settings."""

    cross_layers: int = 3
    low_rank: int = 0
    structure: Literal["stacked", "parallel"] = "stacked"
    mlp: list[int] = field(default_factory=lambda: [400, 400, 400])
    dropout: float = 0.0
    batch_norm: bool = False

    def __post_init__(self) -> None:
        if self.cross_layers < 0 or self.low_rank < 0:
            raise ValueError("cross_layers and low_rank must be >= 0")
        check_mlp("mlp", self.mlp, self.dropout)


class DCNv2(BinaryObjective, nn.Module):
    """Deep & Cross Network V2 over the embedding layer and the dense features.

    Example:
        >>> params = DCNv2Params(cross_layers=2, low_rank=8, structure="parallel", mlp=[64])
        >>> model = DCNv2(embedding, num_dense=13, params=params)   # doctest: +SKIP
        >>> model(batch).shape                                       # doctest: +SKIP
        torch.Size([4096])
    """

    def __init__(self, embedding: EmbeddingLayer, num_dense: int, params: DCNv2Params) -> None:
        super().__init__()
        self.params = params
        self.embedding = embedding
        in_dim = sum(embedding.dims.values()) + num_dense
        self.cross = CrossNetwork(in_dim, params.cross_layers, params.low_rank)
        mlp_kw = {"dropout": params.dropout, "batch_norm": params.batch_norm}
        self.parallel = params.structure == "parallel"
        if self.parallel:
            self.mlp = MLP(in_dim, params.mlp, out_dim=None, **mlp_kw)
            self.head = MLP(in_dim + self.mlp.out_features, [], out_dim=1)
        else:
            self.mlp = MLP(in_dim, params.mlp, out_dim=1, **mlp_kw)
            self.head = None

    def forward(self, batch: Batch) -> torch.Tensor:
        pooled = self.embedding(batch.sparse)
        x0 = torch.cat([pooled.values(), batch.dense], dim=1)
        crossed = self.cross(x0)
        if self.head is not None:
            return self.head(torch.cat([crossed, self.mlp(x0)], dim=1)).squeeze(-1)
        return self.mlp(crossed).squeeze(-1)
