"""DeepFM: an FM (first + second order) and an MLP sharing the same embeddings.

The first-order term comes from the main embeddings by default (``first_order``).

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
from recemb.models.ctr.layers import MLP, FieldFirstOrder, FirstOrder, check_mlp, fm_second_order
from recemb.models.ctr.objective import BinaryObjective


@dataclass
class DeepFMParams:
    """Hidden sizes of the deep part, its dropout and whether it uses batch norm.

    ``first_order``: ``embedding`` (default) takes ``sum_f <w_f, e_f>`` of the main
    embeddings (FwFM-style, one learned vector per field: no second lookup, no first-order
    tables, the whole budget for the main tables), its vectors started where they learn as
    fast as the tables (``FieldFirstOrder``); ``table`` reads a weight per id from a separate
    4-wide first-order layer (the classic form, a second lookup of every id).
    Test AUC, embedding / table: 1M synthetic rows, 1 epoch, seed 0: 0.7445 / 0.7444;
    criteo-10k (``deepfm_small_data``), seeds 0/1/2: 0.7705/0.7732/0.7733 against
    0.7708/0.7706/0.7732; the 20k-row test fixture (default recipe), seeds 0/1/2:
    0.7421/0.7401/0.7368 against 0.7388/0.7423/0.7340. Training at 4.2M table rows
    (``tools/bench_train.py --settings 4m --threads 1``, samples per CPU-second, 3 runs on a
    loaded 2-core machine): 24.8k/23.5k/28.3k against the tables' 20.9k/22.8k/21.6k,
    0.81/0.75/1.00 of the dense ceiling against 0.69/0.73/0.76.
    """

    mlp: list[int] = field(default_factory=lambda: [400, 400, 400])
    dropout: float = 0.0
    batch_norm: bool = False
    first_order: Literal["embedding", "table"] = "embedding"

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
        # The first-order term from the main embeddings when there is no first-order layer.
        self.field_weights = FieldFirstOrder([embedding.dims[f] for f in embedding.features]) if linear is None else None
        in_dim = sum(embedding.dims.values()) + num_dense
        self.mlp = MLP(in_dim, params.mlp, out_dim=1, dropout=params.dropout, batch_norm=params.batch_norm)

    def forward(self, batch: Batch) -> torch.Tensor:
        pooled = self.embedding(batch.sparse)
        if self.linear is not None:
            first = self.first_order(self.linear(batch.sparse), batch.dense)
        else:
            assert self.field_weights is not None
            first = self.first_order.add_dense(self.field_weights(pooled.values()), batch.dense)
        second = fm_second_order(self.embedding.stack(pooled))
        deep = self.mlp(torch.cat([pooled.values(), batch.dense], dim=1)).squeeze(-1)
        return first + second + deep
