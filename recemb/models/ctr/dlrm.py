"""DLRM: bottom MLP over dense features, pairwise dot interaction, top MLP.

The bottom MLP maps the dense features to the embedding dim, so the dense vector
joins the F sparse embeddings as one more vector; the interaction keeps the
inner product of every distinct pair (the strict upper triangle of ``T T^T``),
and the top MLP reads those next to the dense vector. Embeddings must share one dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from recemb.data.batch import Batch
from recemb.embeddings.base import EmbeddingLayer
from recemb.models.ctr.layers import MLP, check_mlp
from recemb.models.ctr.objective import BinaryObjective


@dataclass
class DLRMParams:
    """Hidden sizes of the bottom MLP (a last layer to the embedding dim is added) and the top MLP."""

    bottom_mlp: list[int] = field(default_factory=lambda: [256, 128])
    top_mlp: list[int] = field(default_factory=lambda: [512, 256])
    dropout: float = 0.0
    batch_norm: bool = False

    def __post_init__(self) -> None:
        check_mlp("bottom_mlp", self.bottom_mlp, self.dropout)
        check_mlp("top_mlp", self.top_mlp, self.dropout)


class DotInteraction(nn.Module):
    """Inner products of every pair ``i < j`` of ``num_vectors`` vectors: ``[B, n, d] -> [B, n(n-1)/2]``.

    The pair indices are a non-persistent buffer, rebuilt by ``reset_parameters``
    (so a model materialised from the meta device gets real indices back).

    Example:
        >>> DotInteraction(num_vectors=4)(torch.randn(2, 4, 8)).shape
        torch.Size([2, 6])
    """

    def __init__(self, num_vectors: int) -> None:
        super().__init__()
        self.num_vectors = num_vectors
        self.num_pairs = num_vectors * (num_vectors - 1) // 2
        self.register_buffer("pairs", torch.empty(2, self.num_pairs, dtype=torch.long), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)compute the upper-triangle indices on the buffer's device."""
        n = self.num_vectors
        self.pairs = torch.triu_indices(n, n, offset=1, device=self.pairs.device)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        gram = torch.bmm(vectors, vectors.transpose(1, 2))
        return gram[:, self.pairs[0], self.pairs[1]]


class DLRM(BinaryObjective, nn.Module):
    """Deep Learning Recommendation Model (Naumov et al. 2019) over the embedding layer.

    Without dense features the bottom MLP is dropped and the interaction runs
    over the sparse embeddings alone.

    Example:
        >>> params = DLRMParams(bottom_mlp=[32], top_mlp=[64, 32])
        >>> model = DLRM(embedding, num_dense=13, params=params)   # doctest: +SKIP
        >>> model(batch).shape                                      # doctest: +SKIP
        torch.Size([4096])
    """

    def __init__(self, embedding: EmbeddingLayer, num_dense: int, params: DLRMParams) -> None:
        super().__init__()
        self.params = params
        self.embedding = embedding
        dims = {embedding.dims[f] for f in embedding.features}
        if len(dims) != 1:
            raise ValueError(f"DLRM needs one embedding dim, got {sorted(dims)}: build with project_to")
        dim = dims.pop()
        mlp_kw = {"dropout": params.dropout, "batch_norm": params.batch_norm}
        self.bottom = MLP(num_dense, [*params.bottom_mlp, dim], **mlp_kw) if num_dense > 0 else None
        self.interaction = DotInteraction(len(embedding.features) + (1 if num_dense > 0 else 0))
        top_in = self.interaction.num_pairs + (dim if num_dense > 0 else 0)
        self.top = MLP(top_in, params.top_mlp, out_dim=1, **mlp_kw)

    def forward(self, batch: Batch) -> torch.Tensor:
        pooled = self.embedding(batch.sparse)
        sparse = self.embedding.stack(pooled)
        if self.bottom is None:
            return self.top(self.interaction(sparse)).squeeze(-1)
        dense = self.bottom(batch.dense)
        pairs = self.interaction(torch.cat([dense.unsqueeze(1), sparse], dim=1))
        return self.top(torch.cat([dense, pairs], dim=1)).squeeze(-1)
