"""Small building blocks shared by the CTR models: MLP, first-order term, FM term, cross network.

Models compose these (torchrec's "arch" style) instead of inheriting from a base
model. Any initialisation beyond PyTorch's defaults lives in ``reset_parameters``,
because a model built on the meta device is materialised by torchrec with
``to_empty`` followed by ``reset_parameters`` on every submodule (children
first, then parents), and that must give the same kind of start as an eager build.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedTensor


class MLP(nn.Module):
    """Linear -> [BatchNorm] -> ReLU -> [Dropout] per hidden size, then an optional output layer.

    With ``out_dim`` the last layer is a plain linear layer whose bias starts at
    0 (so a fresh model predicts from its inputs, not from a random offset);
    without it the output is the last hidden activation (``hidden == []``
    then makes the MLP the identity). ``out_features`` is the output width.

    Example:
        >>> mlp = MLP(in_dim=10, hidden=[32, 16], out_dim=1)
        >>> mlp(torch.zeros(4, 10)).shape
        torch.Size([4, 1])
    """

    def __init__(
        self,
        in_dim: int,
        hidden: list[int],
        out_dim: int | None = None,
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for size in hidden:
            layers.append(nn.Linear(width, size))
            if batch_norm:
                layers.append(nn.BatchNorm1d(size))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        self.output: nn.Linear | None = None
        if out_dim is not None:
            self.output = nn.Linear(width, out_dim)
            layers.append(self.output)
            width = out_dim
        self.layers = nn.Sequential(*layers)
        self.out_features = width
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero the output layer's bias (the hidden layers keep PyTorch's defaults)."""
        if self.output is not None:
            nn.init.zeros_(self.output.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class FirstOrder(nn.Module):
    """The linear part of LR/FM/DeepFM/Wide&Deep: sum of 1-dim sparse weights + dense linear + bias.

    The sparse weights come from a separate 1-dim embedding layer (one weight per
    id and feature), looked up by the model itself so the sharded lookup reads
    ``batch.sparse`` directly; this module only adds the pieces up.

    Example:
        >>> first = FirstOrder(num_dense=3)
        >>> logit = first(linear_layer(batch.sparse), batch.dense)   # doctest: +SKIP
    """

    def __init__(self, num_dense: int) -> None:
        super().__init__()
        self.dense = nn.Linear(num_dense, 1, bias=False) if num_dense > 0 else None
        self.bias = nn.Parameter(torch.zeros(1))

    def reset_parameters(self) -> None:
        """Bias back to 0 (the dense linear keeps its own reset)."""
        nn.init.zeros_(self.bias)

    def forward(self, weights: KeyedTensor, dense: torch.Tensor) -> torch.Tensor:
        """``weights``: the 1-dim layer's output (``[B, F]`` values); returns ``[B]``."""
        return self.add_dense(weights.values().sum(dim=1), dense)

    def add_dense(self, sparse_logit: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """``sparse_logit`` (``[B]``, however the sparse part was computed) + dense linear + bias."""
        out = sparse_logit + self.bias
        if self.dense is not None:
            out = out + self.dense(dense).squeeze(-1)
        return out


def fm_second_order(emb: torch.Tensor) -> torch.Tensor:
    """FM pairwise term ``sum_{i<j} <e_i, e_j>`` of ``[B, F, d]`` embeddings, as ``[B]``.

    Uses the identity ``sum_{i<j} <e_i, e_j> = ((sum_i e_i)^2 - sum_i e_i^2) / 2``
    (linear in F instead of quadratic).

    Example:
        >>> fm_second_order(torch.ones(2, 3, 4))   # 3 pairs of <1, 1> = 4
        tensor([12., 12.])
    """
    square_of_sum = emb.sum(dim=1).pow(2)
    sum_of_square = emb.pow(2).sum(dim=1)
    return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)


class CrossLayer(nn.Module):
    """One DCN-V2 cross layer: ``x_{l+1} = x_0 * (W x_l + b) + x_l``.

    ``low_rank = 0`` gives a full ``[D, D]`` matrix ``W``; ``low_rank = r > 0``
    factorises it as ``W = U V^T`` with ``U, V`` of shape ``[D, r]`` (the paper's
    cheaper variant), stored as ``v`` (``D -> r``) and ``u`` (``r -> D``, with ``b``).

    Example:
        >>> layer = CrossLayer(dim=8, low_rank=2)
        >>> x0 = torch.randn(4, 8)
        >>> layer(x0, x0).shape
        torch.Size([4, 8])
    """

    def __init__(self, dim: int, low_rank: int = 0) -> None:
        super().__init__()
        self.v = nn.Linear(dim, low_rank, bias=False) if low_rank > 0 else None
        self.u = nn.Linear(low_rank if low_rank > 0 else dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Bias at 0, so a fresh layer starts near ``x_0 * W x_l + x_l``."""
        nn.init.zeros_(self.u.bias)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.v(x) if self.v is not None else x
        return x0 * self.u(h) + x


class CrossNetwork(nn.Module):
    """``num_layers`` DCN-V2 cross layers applied to ``x_0``; output has the input's width.

    Example:
        >>> net = CrossNetwork(dim=8, num_layers=3)
        >>> net(torch.randn(4, 8)).shape
        torch.Size([4, 8])
    """

    def __init__(self, dim: int, num_layers: int, low_rank: int = 0) -> None:
        super().__init__()
        self.layers = nn.ModuleList([CrossLayer(dim, low_rank) for _ in range(num_layers)])

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x


def check_mlp(name: str, sizes: list[int], dropout: float = 0.0) -> None:
    """Raise ``ValueError`` for non-positive layer sizes or a dropout outside [0, 1).

    Params dataclasses call this from ``__post_init__``; the config loader turns
    the ``ValueError`` into a ``ConfigError`` that names the block.
    """
    bad = [s for s in sizes if s < 1]
    if bad:
        raise ValueError(f"{name} sizes must be >= 1, got {bad[0]}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
