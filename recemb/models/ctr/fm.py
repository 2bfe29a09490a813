"""Factorization machine: first-order weights plus all pairwise inner products of embeddings.

``logit = b + <w, dense> + sum_f w_f[id_f] + sum_{i<j} <e_i, e_j>`` over the
sparse features' ``d``-dim embeddings (which must share one dim; the registry
asks the embedding layer to project when a variant gives mixed dims).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recemb.data.batch import Batch
from recemb.embeddings.base import EmbeddingLayer
from recemb.models.ctr.layers import FirstOrder, fm_second_order
from recemb.models.ctr.objective import BinaryObjective


@dataclass
class FMParams:
    """FM has no settings of its own (the factor dim is ``embedding.dim``)."""


class FM(BinaryObjective, nn.Module):
    """Second-order factorization machine over the embedding layer.

    Example:
        >>> model = FM(embedding, linear_layer, num_dense=13, params=FMParams())   # doctest: +SKIP
        >>> model(batch).shape                                                      # doctest: +SKIP
        torch.Size([4096])
    """

    def __init__(
        self, embedding: EmbeddingLayer, linear: EmbeddingLayer, num_dense: int, params: FMParams
    ) -> None:
        super().__init__()
        self.params = params
        self.embedding = embedding
        self.linear = linear
        self.first_order = FirstOrder(num_dense)

    def forward(self, batch: Batch) -> torch.Tensor:
        pooled = self.embedding(batch.sparse)
        first = self.first_order(self.linear(batch.sparse), batch.dense)
        return first + fm_second_order(self.embedding.stack(pooled))
