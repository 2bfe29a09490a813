"""The CTR objective every click model shares: binary cross-entropy on logits, CTR metrics.

A CTR model's ``forward(batch)`` returns logits ``[B]``; mixing ``BinaryObjective`` in
gives it the ``loss``/``eval_rows``/``metrics`` of the ``recemb.models.registry.TaskModel``
contract, so the trainer needs to know nothing about clicks.

Example:
    >>> import torch
    >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    >>> from recemb.data.batch import Batch
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["C1"], torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long))
    >>> batch = Batch(dense=torch.zeros(2, 0), sparse=kjt, labels=torch.tensor([0.0, 1.0]))
    >>> round(float(BinaryObjective().loss(batch, torch.zeros(2))), 4)
    0.6931
"""

from __future__ import annotations

import torch
from torch import nn

from recemb.data.batch import Batch
from recemb.eval.metrics import compute_metrics


class BinaryObjective:
    """Mixin for click models: BCE loss (weighted by ``batch.weights`` when set), AUC/logloss/NE/calibration."""

    def loss(self, batch: Batch, output: torch.Tensor) -> torch.Tensor:
        """Mean binary cross-entropy of the logits ``output`` against ``batch.labels`` (0/1)."""
        return nn.functional.binary_cross_entropy_with_logits(output, batch.labels, weight=batch.weights)

    def predict(self, batch: Batch) -> torch.Tensor:
        """What the model serves per row: the logit ``[B]`` (``forward``; the serving runtime,
        evaluate and ``recemb ab`` call this, so every family serves one number per row)."""
        return self(batch)  # type: ignore[operator]

    def eval_rows(self, batch: Batch, output: torch.Tensor) -> torch.Tensor:
        """The logits, one per row."""
        return output.detach()

    def metrics(self, rows: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """``compute_metrics`` over all rows: auc, logloss, ne, calibration, count, label_rate."""
        return compute_metrics(rows, labels)
