"""The shared half of the variant tests' "two ranks train like one process on the global batch" check.

A variant's test trains a tiny model on two gloo ranks (each rank its own ``local`` rows a step)
and again in one process on the global batch (both ranks' rows joined), and asks for the same
logits and tables. This module holds what those tests share: the tiny model (``TinyHead``), each
step's per-rank batches (``rank_batches``), joining them into the global batch (``concat_batches``)
and the training loop that records each step's logits (``train_logits``). Each test file keeps its
own config, optimizers (auxiliary parameters, in-backward filters) and assertions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from twin_utils import as_kjt, feature_map, random_ids

LabelledBatch = tuple[KeyedJaggedTensor, torch.Tensor]


class TinyHead(nn.Module):
    """An embedding layer and a linear head over its ``features`` pooled vectors, ``dim`` wide each."""

    def __init__(self, emb: nn.Module, features: int, dim: int) -> None:
        super().__init__()
        self.emb = emb
        self.head = nn.Linear(dim * features, 1)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(self.emb(kjt).values()).squeeze(1)


def rank_batches(step: int, world: int, local: int) -> list[LabelledBatch]:
    """Step ``step``'s batch for each of ``world`` ranks: ``local`` rows of ``feature_map(True)`` ids
    (seed ``100 * step + rank``) and 0/1 labels (seed ``step + 7 * rank``)."""
    fm = feature_map(True)
    out = []
    for rank in range(world):
        labels = torch.randint(0, 2, (local,), generator=torch.Generator().manual_seed(step + 7 * rank)).float()
        out.append((as_kjt(random_ids(fm, local, seed=100 * step + rank)), labels))
    return out


def concat_batches(parts: Sequence[LabelledBatch]) -> LabelledBatch:
    """The ranks' batches as one global batch, key by key (rank 0's rows first, as the ranks' logits join)."""
    keys = parts[0][0].keys()
    values = [kjt[k].values() for k in keys for kjt, _ in parts]
    lengths = [kjt[k].lengths() for k in keys for kjt, _ in parts]
    return (KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths)),
            torch.cat([y for _, y in parts]))


def train_logits(model: nn.Module, batches: Sequence[LabelledBatch],
                 optimizers: Sequence[torch.optim.Optimizer],
                 extra_loss: Callable[[], torch.Tensor | float] | None = None) -> list[np.ndarray]:
    """One training step per batch on binary cross-entropy (plus ``extra_loss()``, e.g. a regularization
    term), stepping every optimizer; returns each step's logits (from before its update)."""
    out = []
    for kjt, labels in batches:
        logits = model(kjt)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        if extra_loss is not None:
            loss = loss + extra_loss()
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()
        out.append(logits.detach().numpy().copy())
    return out
