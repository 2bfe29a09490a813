"""Exact metrics: CTR (AUC, log loss, normalized entropy, calibration) and anomaly detection
(ROC AUC and average precision with the anomaly as positive, precision@k, recall@k).

Everything is computed in float64 from the full set of scores (no binning), and
``MetricAccumulator`` gathers every rank's rows so all ranks report the same global numbers.
Labels follow the task's convention: CTR labels are 0/1; anomaly labels are read through an
``AnomalyLabels`` convention (event data: ``1`` normal, ``-1`` anomaly).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from recemb.errors import DataError

# Probabilities are clipped to [EPS, 1 - EPS] so one confident mistake costs ~36 nats, not inf.
EPS = float(torch.finfo(torch.float64).eps)
_LOGIT_CLIP = math.log((1.0 - EPS) / EPS)
# What compute_metrics and anomaly_metrics return that train.monitor may weight.
CTR_METRICS = ("auc", "logloss", "ne", "calibration")
ANOMALY_METRICS = ("auc", "ap", "precision_at_k", "recall_at_k")


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



@dataclass(frozen=True)
class AnomalyLabels:
    """Which label value marks an anomaly and which a normal row (a task's label convention).

    The default is the event data's convention (IDS2017, ``recemb synth events``): ``1``
    normal, ``-1`` anomaly. Any other value is refused: a 0/1 CTR label fed to an anomaly
    model is a mistake to report, not to guess at.

    Example:
        >>> AnomalyLabels().is_anomaly(torch.tensor([1.0, -1.0, 1.0])).tolist()
        [False, True, False]
    """

    normal: float = 1.0
    anomaly: float = -1.0

    def __post_init__(self) -> None:
        if self.normal == self.anomaly:
            raise ValueError(f"the normal and the anomaly label must differ, both are {self.normal}")

    def is_anomaly(self, labels: torch.Tensor) -> torch.Tensor:
        """Boolean ``[N]``: which rows are anomalies (``MetricInputError`` on any other value)."""
        labels = torch.as_tensor(labels).detach().reshape(-1)
        anomaly = labels == self.anomaly
        if not (anomaly | (labels == self.normal)).all():
            raise MetricInputError(f"anomaly labels must be {self.normal:g} (normal) or {self.anomaly:g} (anomaly)")
        return anomaly


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Average precision: ``sum_n (R_n - R_{n-1}) P_n`` over distinct score thresholds, high first.

    As scikit-learn's ``average_precision_score`` (tied scores enter together). ``nan`` when
    there is no positive.

    Example:
        >>> average_precision(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        0.8333333333333333
    """
    scores, positive = _prepare(scores, torch.as_tensor(positive).to(torch.float64))
    return _average_precision(scores, positive)


def _average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float:
    n_pos = int(positive.sum())
    if n_pos == 0:
        return math.nan
    sorted_scores, order = torch.sort(scores, descending=True, stable=True)
    pos = positive[order]
    # The last row of each run of equal scores is a threshold.
    last = torch.ones_like(sorted_scores, dtype=torch.bool)
    last[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    tps = torch.cumsum(pos, 0)[last]
    seen = torch.nonzero(last).reshape(-1).to(torch.float64) + 1.0
    precision = tps / seen
    recall_step = torch.diff(tps, prepend=torch.zeros(1, dtype=tps.dtype)) / n_pos
    return float((recall_step * precision).sum())


def anomaly_metrics(scores: torch.Tensor, labels: torch.Tensor, convention: AnomalyLabels = AnomalyLabels(),
                    k: int = 100) -> dict[str, float]:
    """Anomaly-detection metrics of anomaly ``scores`` (higher = more anomalous).

    ``auc`` (ROC AUC) and ``ap`` (average precision) with the anomaly as the positive class;
    ``precision_at_k`` / ``recall_at_k``: the share of the ``k`` highest-scored rows that are
    anomalies, and the share of all anomalies among them (ties broken by row order; ``k`` is
    capped at the row count and reported). ``auc`` is ``nan`` with one class only, ``ap`` and
    ``recall_at_k`` without anomalies.

    Example:
        >>> m = anomaly_metrics(torch.tensor([0.9, 0.1, 0.8, 0.2]), torch.tensor([-1, 1, 1, 1]), k=1)
        >>> m["auc"], m["ap"], m["precision_at_k"], m["recall_at_k"], m["anomaly_rate"]
        (1.0, 1.0, 1.0, 1.0, 0.25)
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    positive = convention.is_anomaly(labels).to(torch.float64)
    scores, positive = _prepare(scores, positive)
    n_pos = int(positive.sum())
    top = min(k, scores.numel())
    hits = float(positive[torch.sort(scores, descending=True, stable=True).indices[:top]].sum())
    return {
        "auc": _auc(scores, positive),
        "ap": _average_precision(scores, positive),
        "precision_at_k": hits / top,
        "recall_at_k": hits / n_pos if n_pos else math.nan,
        "k": float(top),
        "count": float(scores.numel()),
        "anomaly_rate": n_pos / scores.numel(),
    }


MetricsFn = Callable[[torch.Tensor, torch.Tensor], dict[str, float]]


class MetricAccumulator:
    """Keeps every (logit, label) seen across ``update`` calls so ``compute`` is exact.

    ``compute_fn(values, labels)`` turns the rows into metrics (default ``compute_metrics``,
    the CTR metrics); a model whose rows carry several values (``[B, C]``, e.g. an anomaly
    score and more) passes its own and gets ``[N, C]`` values. Rows are stored as float32 on
    CPU (8 bytes/row for one value). When ``torch.distributed`` is initialised
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

    def __init__(self, group: dist.ProcessGroup | None = None, compute_fn: MetricsFn = compute_metrics) -> None:
        self.group = group
        self.compute_fn = compute_fn
        self._rows: list[torch.Tensor] = []
        self._width = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch; ``labels`` hold one value per example, ``logits`` one (any shape) or
        ``C`` (``[B, C]``, for a ``compute_fn`` that reads several values per row)."""
        labels = labels.detach().reshape(-1)
        logits = logits.detach()
        n = labels.numel()
        if logits.dim() >= 2 and logits.numel() != n:  # several values per row
            if logits.shape[0] != n:
                raise MetricInputError(f"got {logits.shape[0]} rows of values but {n} labels; pass one row per label")
            values = logits.reshape(n, -1)
        else:
            logits = logits.reshape(-1)
            if logits.numel() != n:
                raise MetricInputError(
                    f"got {logits.numel()} logits but {n} labels; pass one logit per label"
                )
            values = logits.reshape(n, 1)
        if n == 0:
            return
        values = values.to("cpu", torch.float32)
        if self._width and values.shape[1] != self._width:
            raise MetricInputError(f"got {values.shape[1]} values per row, earlier batches had {self._width}")
        self._width = values.shape[1]
        self._rows.append(torch.cat([values, labels.to("cpu", torch.float32)[:, None]], 1))

    def reset(self) -> None:
        """Drop everything seen so far (e.g. before the next eval epoch)."""
        self._rows = []
        self._width = 0

    def compute(self) -> dict[str, float]:
        """Metrics over all rows seen on this rank, or on all ranks when running distributed."""
        rows = torch.cat(self._rows) if self._rows else torch.empty(0, 1 + (self._width or 1), dtype=torch.float32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            rows = self._gather(rows)
        values = rows[:, 0] if rows.shape[1] == 2 else rows[:, :-1]
        return self.compute_fn(values, rows[:, -1])

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
        # A rank without rows may not know the width: agree on the widest.
        width = torch.tensor([rows.shape[1]], dtype=torch.int64, device=device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX, group=self.group)
        if rows.shape[0] == 0:
            rows = torch.empty(0, int(width), dtype=torch.float32)
        padded = torch.zeros(max(counts), int(width), dtype=torch.float32, device=device)
        padded[: rows.shape[0]] = rows.to(device)
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded, group=self.group)
        return torch.cat([g[:n] for g, n in zip(gathered, counts, strict=True)]).cpu()
