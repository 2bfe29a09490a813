"""Wide & Deep: a linear (wide) part over ids and dense features plus an MLP (deep) part.

The wide part is the first-order term of LR (a 1-dim embedding layer, a dense
linear and a bias); the deep part an MLP over the flattened embeddings
concatenated with the dense features. Embeddings may have per-feature dims.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from recemb.data.batch import Batch
from recemb.embeddings.base import EmbeddingLayer
from recemb.models.ctr.layers import MLP, FirstOrder, check_mlp
from recemb.models.ctr.objective import BinaryObjective


@dataclass
class WDLParams:
    """Hidden sizes of the deep part, its dropout and whether it uses batch norm."""

    mlp: list[int] = field(default_factory=lambda: [400, 400, 400])
    dropout: float = 0.0
    batch_norm: bool = False

    def __post_init__(self) -> None:
        check_mlp("mlp", self.mlp, self.dropout)


class WDL(BinaryObjective, nn.Module):
    """``logit = wide(ids, dense) + MLP([e_1, ..., e_F, dense])``.

    Example:
        >>> model = WDL(embedding, linear_layer, num_dense=13, params=WDLParams(mlp=[64]))  # doctest: +SKIP
        >>> model(batch).shape                                                               # doctest: +SKIP
        torch.Size([4096])
    """

    def __init__(
        self, embedding: EmbeddingLayer, linear: EmbeddingLayer, num_dense: int, params: WDLParams
    ) -> None:
        super().__init__()
        self.params = params
        self.embedding = embedding
        self.linear = linear
        self.wide = FirstOrder(num_dense)
        in_dim = sum(embedding.dims.values()) + num_dense
        self.deep = MLP(in_dim, params.mlp, out_dim=1, dropout=params.dropout, batch_norm=params.batch_norm)

    def forward(self, batch: Batch) -> torch.Tensor:
        pooled = self.embedding(batch.sparse)
        wide = self.wide(self.linear(batch.sparse), batch.dense)
        deep = self.deep(torch.cat([pooled.values(), batch.dense], dim=1)).squeeze(-1)
        return wide + deep
