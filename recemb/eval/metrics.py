"""Exact metrics for binary CTR prediction: AUC, log loss, normalized entropy, calibration.

Everything is computed in float64 from the full set of scores (no binning), and
``MetricAccumulator`` gathers every rank's rows so all ranks report the same global numbers.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from recemb.errors import DataError

# Probabilities are clipped to [EPS, 1 - EPS] so one confident mistake costs ~36 nats, not inf.
EPS = float(torch.finfo(torch.float64).eps)
_LOGIT_CLIP = math.log((1.0 - EPS) / EPS)


class MetricInputError(DataError, ValueError):
    """Scores/labels cannot be evaluated: empty, mismatched lengths, NaN scores or non-0/1 labels."""


def _prepare(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten to 1-D float64 on CPU and check what a caller can get wrong."""
    scores = torch.as_tensor(scores).detach().reshape(-1).to("cpu", torch.float64)
    labels = torch.as_tensor(labels).detach().reshape(-1).to("cpu", torch.float64)
    if scores.numel() != labels.numel():
        raise MetricInputError(
            f"got {scores.numel()} scores but {labels.numel()} labels; pass one score per label"
        )
    if scores.numel() == 0:
        raise MetricInputError("no rows to evaluate; pass at least one score and label")
    if torch.isnan(scores).any():
        raise MetricInputError("scores contain NaN; check the model output before evaluating")
    if not ((labels == 0) | (labels == 1)).all():
        raise MetricInputError("labels must be 0 or 1 (binary click/no-click)")
    return scores, labels


def _to_probs(preds: torch.Tensor, from_logits: bool) -> torch.Tensor:
    if from_logits:
        return torch.sigmoid(preds)
    if ((preds < 0) | (preds > 1)).any():
        raise MetricInputError("probabilities must lie in [0, 1]; pass from_logits=True for raw logits")
    return preds


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact ROC AUC; tied scores count half (mid-rank), as in scikit-learn's ``roc_auc_score``.

    Any monotone score works (logits or probabilities). Returns ``nan`` when only one class
    is present, because AUC is undefined there; this keeps a small eval shard from crashing a run.

    Example:
        >>> auc(torch.tensor([0.1, 0.4, 0.4, 0.8]), torch.tensor([0, 0, 1, 1]))
        0.875
    """
    return _auc(*_prepare(scores, labels))


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    sorted_scores, order = torch.sort(scores, stable=True)
    is_pos = labels[order].to(torch.int64)
    # One group per distinct score; counts stay int64 so the numerator below is an exact integer.
    _, group = torch.unique_consecutive(sorted_scores, return_inverse=True)
    n_groups = int(group[-1]) + 1
    pos = torch.zeros(n_groups, dtype=torch.int64).scatter_add_(0, group, is_pos)
    neg = torch.zeros(n_groups, dtype=torch.int64).scatter_add_(0, group, 1 - is_pos)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    neg_below = torch.cumsum(neg, 0) - neg
    # Each positive beats every negative in lower groups and ties half of those in its own group.
    twice_wins = int((pos * (2 * neg_below + neg)).sum())
    return twice_wins / (2 * n_pos * n_neg)


def logloss(preds: torch.Tensor, labels: torch.Tensor, from_logits: bool = True) -> float:
    """Mean binary cross-entropy in nats, with probabilities clipped to ``[EPS, 1 - EPS]``.

    Example:
        >>> round(logloss(torch.tensor([0.0, 0.0]), torch.tensor([0, 1])), 4)
        0.6931
        >>> round(logloss(torch.tensor([0.9, 0.2]), torch.tensor([1, 0]), from_logits=False), 4)
        0.1643
    """
    return _logloss(*_prepare(preds, labels), from_logits=from_logits)


def _logloss(preds: torch.Tensor, labels: torch.Tensor, from_logits: bool) -> float:
    if from_logits:
        # softplus form is stable for large |logit|; clamping matches the probability clip.
        x = preds.clamp(-_LOGIT_CLIP, _LOGIT_CLIP)
        return float((torch.nn.functional.softplus(x) - labels * x).mean())
    p = _to_probs(preds, from_logits=False).clamp(EPS, 1.0 - EPS)
    return float(-(labels * torch.log(p) + (1.0 - labels) * torch.log1p(-p)).mean())


def _base_rate_entropy(rate: float) -> float:
    if rate <= 0.0 or rate >= 1.0:
        return 0.0
    return -(rate * math.log(rate) + (1.0 - rate) * math.log1p(-rate))


def normalized_entropy(preds: torch.Tensor, labels: torch.Tensor, from_logits: bool = True) -> float:
    """Log loss divided by the entropy of the observed click rate (lower is better; 1.0 = base rate).

    Returns ``nan`` when only one class is present (the base-rate entropy is zero).

    Example:
        >>> normalized_entropy(torch.tensor([0.25] * 4), torch.tensor([0, 0, 0, 1]), from_logits=False)
        1.0
    """
    preds, labels = _prepare(preds, labels)
    loss = _logloss(preds, labels, from_logits=from_logits)
    entropy = _base_rate_entropy(float(labels.mean()))
    return loss / entropy if entropy > 0.0 else math.nan


def calibration(preds: torch.Tensor, labels: torch.Tensor, from_logits: bool = True) -> float:
    """Mean predicted probability over observed click rate (1.0 = calibrated, >1 = over-predicts).

    Returns ``nan`` when there are no positive labels.

    Example:
        >>> calibration(torch.tensor([0.25, 0.5]), torch.tensor([0, 1]), from_logits=False)
        0.75
    """
    return _calibration(*_prepare(preds, labels), from_logits=from_logits)


def _calibration(preds: torch.Tensor, labels: torch.Tensor, from_logits: bool) -> float:
    n_pos = float(labels.sum())
    if n_pos == 0.0:
        return math.nan
    return float(_to_probs(preds, from_logits).sum()) / n_pos


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """All metrics from raw logits: auc, logloss, ne, calibration, count, label_rate.

    Example:
        >>> m = compute_metrics(torch.tensor([-1.0, 0.5, 2.0]), torch.tensor([0, 1, 1]))
        >>> sorted(m), m["auc"], m["count"]
        (['auc', 'calibration', 'count', 'label_rate', 'logloss', 'ne'], 1.0, 3.0)
    """
    logits, labels = _prepare(logits, labels)
    label_rate = float(labels.mean())
    loss = _logloss(logits, labels, from_logits=True)
    entropy = _base_rate_entropy(label_rate)
    return {
        "auc": _auc(logits, labels),
        "logloss": loss,
        "ne": loss / entropy if entropy > 0.0 else math.nan,
        "calibration": _calibration(logits, labels, from_logits=True),
        "count": float(logits.numel()),
        "label_rate": label_rate,
    }


class MetricAccumulator:
    """Keeps every (logit, label) seen across ``update`` calls so ``compute`` is exact.

    Rows are stored as float32 on CPU (8 bytes/row). When ``torch.distributed`` is initialised
    with more than one rank, ``compute`` all-gathers the rows of every rank (ranks may hold
    different counts, or none) and every rank returns the same global metrics; it is a
    collective, so call it on all ranks.

    Example:
        >>> acc = MetricAccumulator()
        >>> acc.update(torch.tensor([-1.0, 2.0]), torch.tensor([0, 1]))
        >>> acc.update(torch.tensor([0.5]), torch.tensor([0]))
        >>> acc.compute()["count"]
        3.0
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self._rows: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch; ``logits`` and ``labels`` hold one value per example (any shape)."""
        logits = logits.detach().reshape(-1)
        labels = labels.detach().reshape(-1)
        if logits.numel() != labels.numel():
            raise MetricInputError(
                f"got {logits.numel()} logits but {labels.numel()} labels; pass one logit per label"
            )
        self._rows.append(torch.stack([logits.to("cpu", torch.float32), labels.to("cpu", torch.float32)], 1))

    def reset(self) -> None:
        """Drop everything seen so far (e.g. before the next eval epoch)."""
        self._rows = []

    def compute(self) -> dict[str, float]:
        """Metrics over all rows seen on this rank, or on all ranks when running distributed."""
        rows = torch.cat(self._rows) if self._rows else torch.empty(0, 2, dtype=torch.float32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            rows = self._gather(rows)
        return compute_metrics(rows[:, 0], rows[:, 1])

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's rows in rank order; all_gather needs equal shapes, so pad."""
        world = dist.get_world_size(self.group)
        # NCCL only moves CUDA tensors; gloo works on CPU.
        if dist.get_backend(self.group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        size = torch.tensor([rows.shape[0]], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=self.group)
        counts = [int(s) for s in sizes]
        if max(counts) == 0:
            raise MetricInputError("no rows on any rank; call update() before compute()")
        padded = torch.zeros(max(counts), 2, dtype=torch.float32, device=device)
        padded[: rows.shape[0]] = rows.to(device)
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded, group=self.group)
        return torch.cat([g[:n] for g, n in zip(gathered, counts, strict=True)]).cpu()
