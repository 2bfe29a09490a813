"""Logistic regression: one learned weight per (feature, id), a dense linear term and a bias.

The per-id weights are a 1-dim embedding layer, so they shard and train like any
other table (fused sparse optimizer); LR is the floor every other model must beat.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recemb.data.batch import Batch
from recemb.embeddings.base import EmbeddingLayer
from recemb.models.ctr.layers import FirstOrder
from recemb.models.ctr.objective import BinaryObjective


@dataclass
class LRParams:
    """LR has no settings of its own (the table sizes come from the feature map)."""


class LR(BinaryObjective, nn.Module):
    """``logit = sum_f w_f[id_f] + <w_dense, dense> + b``.

    ``linear`` is a 1-dim embedding layer over the sparse features (the
    registry builds it as a ``full`` layer with ``dim=1``).

    Example:
        >>> model = LR(linear_layer, num_dense=13, params=LRParams())   # doctest: +SKIP
        >>> model(batch).shape                                           # doctest: +SKIP
        torch.Size([4096])
    """

    def __init__(self, linear: EmbeddingLayer, num_dense: int, params: LRParams) -> None:
        super().__init__()
        self.params = params
        self.linear = linear
        self.first_order = FirstOrder(num_dense)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.first_order(self.linear(batch.sparse), batch.dense)
