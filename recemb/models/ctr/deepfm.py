"""DeepFM: an FM (first + second order) and an MLP sharing the same embeddings.

The MLP reads the flattened embeddings concatenated with the dense features; its
output is added to the FM logit. Embeddings must share one dim (for the FM part).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from recemb.data.batch import Batch
from recemb.embeddings.base import EmbeddingLayer
from recemb.models.ctr.layers import MLP, FirstOrder, check_mlp, fm_second_order
from recemb.models.ctr.objective import BinaryObjective


@dataclass
class DeepFMParams:
    """Hidden sizes of the deep part, its dropout and whether it uses batch norm.

    ``first_order``: ``table`` (default) reads a weight per id from a separate
    4-wide first-order layer (the classic form, a second lookup of every id);
    ``embedding`` takes ``sum_f <w_f, e_f>`` of the main embeddings (FwFM-style,
    one learned vector per field: no second lookup, no first-order tables).
    Measured on the 1M-row synthetic data, 1 epoch, seeds 0 and 1: ``embedding``
    reaches test AUC 0.7444/0.7447 against 0.7422/0.7422, trains 1.22x faster and
    uses 20% fewer bytes; but on a 20k-row sample it had not learned after one
    epoch (AUC 0.51) where ``table`` had, so it is opt-in.
    """

    mlp: list[int] = field(default_factory=lambda: [400, 400, 400])
    dropout: float = 0.0
    batch_norm: bool = False
    first_order: Literal["table", "embedding"] = "table"

    def __post_init__(self) -> None:
        check_mlp("mlp", self.mlp, self.dropout)


class DeepFM(BinaryObjective, nn.Module):
    """``logit = FM(x) + MLP([e_1, ..., e_F, dense])``.

    Example:
        >>> model = DeepFM(embedding, linear_layer, num_dense=13, params=DeepFMParams(mlp=[64]))  # doctest: +SKIP
        >>> model(batch).shape                                                                     # doctest: +SKIP
        torch.Size([4096])
    """

    def __init__(
        self, embedding: EmbeddingLayer, linear: EmbeddingLayer | None, num_dense: int, params: DeepFMParams
    ) -> None:
        super().__init__()
        self.params = params
        self.embedding = embedding
        self.linear = linear
        self.first_order = FirstOrder(num_dense)
        # FwFM-style first-order term from the main embeddings (when there is no first-order layer).
        self.field_weights = nn.Linear(sum(embedding.dims.values()), 1, bias=False) if linear is None else None
        in_dim = sum(embedding.dims.values()) + num_dense
        self.mlp = MLP(in_dim, params.mlp, out_dim=1, dropout=params.dropout, batch_norm=params.batch_norm)

    def forward(self, batch: Batch) -> torch.Tensor:
        pooled = self.embedding(batch.sparse)
        if self.linear is not None:
            first = self.first_order(self.linear(batch.sparse), batch.dense)
        else:
            assert self.field_weights is not None
            first = self.first_order.add_dense(self.field_weights(pooled.values()).squeeze(-1), batch.dense)
        second = fm_second_order(self.embedding.stack(pooled))
        deep = self.mlp(torch.cat([pooled.values(), batch.dense], dim=1)).squeeze(-1)
        return first + second + deep
