"""Tests for recemb.eval.metrics: exact agreement with scikit-learn, edge cases, and a 2-rank gloo run.

The distributed test spawns two CPU processes, gives each an unequal slice, and checks both
ranks report the single-process metrics of the concatenation.
"""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import log_loss, roc_auc_score

from recemb.errors import DataError
from recemb.eval.metrics import (
    MetricAccumulator,
    MetricInputError,
    auc,
    calibration,
    compute_metrics,
    logloss,
    normalized_entropy,
)


def _random_data(n: int, seed: int, decimals: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits correlated with labels; rounding the logits makes many ties."""
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=gen) < 0.3).to(torch.float32)
    logits = torch.randn(n, generator=gen) + 1.5 * labels - 1.0
    if decimals is not None:
        logits = torch.round(logits, decimals=decimals)
    return logits, labels


@pytest.mark.parametrize("decimals", [None, 1, 0])
@pytest.mark.parametrize("seed", [0, 1])
def test_auc_and_logloss_match_sklearn(decimals: int | None, seed: int) -> None:
    logits, labels = _random_data(5000, seed, decimals)
    if decimals is not None:
        assert torch.unique(logits).numel() < logits.numel() // 10  # really has ties
    probs = torch.sigmoid(logits.double())
    y, p = labels.numpy(), probs.numpy()

    assert auc(logits, labels) == pytest.approx(roc_auc_score(y, logits.double().numpy()), abs=1e-9)
    # AUC depends only on order, so probabilities give the same answer.
    assert auc(probs, labels) == pytest.approx(roc_auc_score(y, p), abs=1e-9)
    assert logloss(logits, labels) == pytest.approx(log_loss(y, p), abs=1e-9)
    assert logloss(probs, labels, from_logits=False) == pytest.approx(log_loss(y, p), abs=1e-9)


def test_auc_small_cases() -> None:
    assert auc(torch.tensor([0.1, 0.4, 0.4, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.875
    assert auc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1, 0, 0])) == 1.0
    assert auc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([0, 1, 1])) == 0.0
    assert auc(torch.ones(6), torch.tensor([0, 1, 0, 1, 1, 0])) == 0.5
    # Integer and bool labels, and 2-D (B, 1) inputs, are accepted.
    assert auc(torch.tensor([[0.2], [0.9]]), torch.tensor([[False], [True]])) == 1.0


def test_single_class_gives_nan_not_error() -> None:
    logits = torch.tensor([0.1, -0.3, 2.0])
    for labels in (torch.zeros(3), torch.ones(3)):
        metrics = compute_metrics(logits, labels)
        assert math.isnan(metrics["auc"])
        assert math.isnan(metrics["ne"])
        assert math.isfinite(metrics["logloss"])
    assert math.isnan(calibration(logits, torch.zeros(3)))


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (torch.empty(0), torch.empty(0), "no rows"),
        (torch.zeros(3), torch.zeros(2), "3 scores but 2 labels"),
        (torch.tensor([0.0, math.nan]), torch.tensor([0, 1]), "NaN"),
        (torch.zeros(2), torch.tensor([0.0, 2.0]), "0 or 1"),
    ],
)
def test_bad_input_raises_value_error(logits: torch.Tensor, labels: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        compute_metrics(logits, labels)
    assert isinstance(info.value, DataError)


def test_probabilities_out_of_range_rejected() -> None:
    with pytest.raises(MetricInputError, match="from_logits=True"):
        logloss(torch.tensor([2.0, -1.0]), torch.tensor([1, 0]), from_logits=False)


def test_logloss_is_clipped_and_stable() -> None:
    labels = torch.tensor([1.0, 0.0])
    wrong_logits = torch.tensor([-1e4, 1e4])
    wrong_probs = torch.tensor([0.0, 1.0], dtype=torch.float64)
    from_logits = logloss(wrong_logits, labels)
    from_probs = logloss(wrong_probs, labels, from_logits=False)
    assert math.isfinite(from_logits) and from_logits == pytest.approx(from_probs, rel=1e-9)
    assert from_probs == pytest.approx(-math.log(torch.finfo(torch.float64).eps), rel=1e-9)
    assert logloss(-wrong_logits, labels) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.5])
def test_ne_of_base_rate_predictor_is_one(rate: float) -> None:
    n = 1000
    labels = torch.zeros(n)
    labels[: int(n * rate)] = 1.0
    probs = torch.full((n,), float(labels.double().mean()), dtype=torch.float64)
    assert normalized_entropy(probs, labels, from_logits=False) == pytest.approx(1.0, abs=1e-12)
    logits = torch.logit(probs)
    assert normalized_entropy(logits, labels) == pytest.approx(1.0, abs=1e-12)
    assert compute_metrics(logits, labels)["ne"] == pytest.approx(1.0, abs=1e-12)
    assert calibration(logits, labels) == pytest.approx(1.0, abs=1e-12)


def test_calibration() -> None:
    labels = torch.tensor([0, 1, 0, 1])
    probs = torch.tensor([0.2, 0.6, 0.3, 0.9], dtype=torch.float64)
    assert calibration(probs, labels, from_logits=False) == pytest.approx(2.0 / 2.0)
    assert calibration(probs / 2, labels, from_logits=False) == pytest.approx(0.5)
    logits = torch.logit(probs)
    assert calibration(logits, labels) == pytest.approx(1.0, abs=1e-12)


def test_compute_metrics_keys_and_values() -> None:
    logits, labels = _random_data(2000, seed=3, decimals=1)
    m = compute_metrics(logits, labels)
    assert set(m) == {"auc", "logloss", "ne", "calibration", "count", "label_rate"}
    assert all(isinstance(v, float) for v in m.values())
    assert m["count"] == 2000.0
    assert m["label_rate"] == pytest.approx(float(labels.double().mean()), abs=1e-15)
    assert m["auc"] == auc(logits, labels)
    assert m["logloss"] == logloss(logits, labels)
    assert m["ne"] == normalized_entropy(logits, labels)
    assert m["calibration"] == calibration(logits, labels)


def test_accumulator_matches_one_shot() -> None:
    logits, labels = _random_data(3001, seed=4, decimals=1)
    acc = MetricAccumulator()
    sizes = [1000, 0, 1, 2000]  # includes an empty batch
    for lo, la in zip(torch.split(logits, sizes), torch.split(labels, sizes), strict=True):
        acc.update(lo.reshape(-1, 1), la.to(torch.int64))
    assert acc.compute() == compute_metrics(logits, labels)

    acc.reset()
    with pytest.raises(ValueError, match="no rows"):
        acc.compute()
    acc.update(logits[:10], labels[:10])
    assert acc.compute() == compute_metrics(logits[:10], labels[:10])


def test_accumulator_rejects_mismatched_batch() -> None:
    with pytest.raises(MetricInputError, match="3 logits but 2 labels"):
        MetricAccumulator().update(torch.zeros(3), torch.zeros(2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_SLICES = [(0, 700), (700, 1000)]  # unequal on purpose: rank 1 is shorter and must be padded


def _rank_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        logits, labels = _random_data(1000, seed=5, decimals=1)
        start, stop = _SLICES[rank]
        acc = MetricAccumulator()
        # Two updates per rank so gathering and local concatenation are both exercised.
        mid = (start + stop) // 2
        acc.update(logits[start:mid], labels[start:mid])
        acc.update(logits[mid:stop], labels[mid:stop])
        torch.save(acc.compute(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_rank_gloo_matches_single_process(tmp_path: Path) -> None:
    mp.spawn(_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    logits, labels = _random_data(1000, seed=5, decimals=1)
    expected = compute_metrics(logits, labels)
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == expected
