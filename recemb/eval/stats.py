"""Paired statistics for offline A/B: a vectorised paired bootstrap, DeLong's test, Holm, group AUC.

Every arm scores the same rows, so differences are measured *paired*: each bootstrap
resample weights the rows once and all arms are scored under the same weights, and
DeLong's test uses the covariance of the arms' AUCs on the same rows. Both remove the
row-to-row noise that unpaired intervals would carry, which is most of it.

The bootstrap draws Poisson(1)-like row weights (integers 0..3 from three random bits, mean 1
and variance 1 like Poisson(1)) for a block of resamples at once, as one ``[rows, block]``
matrix: the mean metrics (log loss, NE, calibration) are one matrix product of it with
per-row columns; AUC reuses one sort per arm made before any resample (the smaller class in
score order, and where each row of the larger class falls in it): per block, the smaller
class's weights are gathered in that order, prefix-summed down the rows, read back at each
larger-class row and weighted by its own weight. AP is the same with cumulative true
positives over all rows. No Python loop runs over resamples, only over blocks of them; arms
run as parallel tasks and the next block's weights are drawn while they do.

Example:
    >>> rng = np.random.default_rng(0)
    >>> y = (rng.random(2000) < 0.3).astype(np.float64)
    >>> a = y + rng.normal(size=2000)
    >>> out = paired_bootstrap(y, np.stack([a, a + rng.normal(scale=0.5, size=2000)]), resamples=200)
    >>> out.deltas[0]["auc"] < 0, out.low[0]["auc"] < out.deltas[0]["auc"] < out.high[0]["auc"]
    (True, True)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from recemb.errors import DataError
from recemb.eval.metrics import EPS

# Bootstrap weights w = a + 2 (b & c) from three random bits: P(0) = P(1) = 3/8, P(2) = P(3) = 1/8,
# mean 1 and variance 1 like Poisson(1) (whose first four probabilities are .37, .37, .18, .06).
_LANES = 0x0101010101010101
_LOGIT_CLIP = math.log((1.0 - EPS) / EPS)
CTR_METRICS = ("auc", "logloss", "ne", "calibration")
ANOMALY_METRICS = ("auc", "ap")
# +1: higher is better; -1: lower is better; 0: closer to 1 is better (judged on |value - 1|).
DIRECTION = {"auc": 1, "ap": 1, "gauc": 1, "logloss": -1, "ne": -1, "calibration": 0}


def _draw(rng: np.random.Generator, out: np.ndarray) -> np.ndarray:
    """Fill the uint8 array ``out`` (C-contiguous) with bootstrap weights in 0..3, mean 1, variance 1.

    Three random bits make one weight, eight weights are made per 64-bit word operation (torch's
    bitwise kernels, on every thread; an arithmetic right shift by at most 7 leaves every masked
    byte lane as a logical shift would).
    """
    flat = torch.from_numpy(out.reshape(-1))
    total = flat.numel()
    words = -(-total // 64)  # each triple of random words gives 64 weights
    bits = torch.from_numpy(rng.bit_generator.random_raw(3 * words).view(np.int64)).view(3, words)
    a, bc = bits[0], torch.bitwise_and(bits[1], bits[2], out=bits[1])
    packed = torch.empty(8, words, dtype=torch.int64)
    tmp = torch.empty(words, dtype=torch.int64)
    for k in range(8):
        torch.bitwise_and(torch.bitwise_right_shift(a, k, out=packed[k]), _LANES, out=packed[k])
        torch.bitwise_and(torch.bitwise_right_shift(bc, k, out=tmp), _LANES, out=tmp)
        torch.bitwise_left_shift(tmp, 1, out=tmp)
        torch.bitwise_or(packed[k], tmp, out=packed[k])
    flat.copy_(packed.view(-1).view(torch.uint8)[:total])
    return out


def bootstrap_weights(rng: np.random.Generator, resamples: int, rows: int) -> np.ndarray:
    """``[resamples, rows]`` uint8 bootstrap weights in 0..3 with mean 1 and variance 1 (see above).

    Drawn row by row (a row's weights in all resamples are adjacent: the result is the
    transpose of a C-contiguous ``[rows, resamples]`` array), as ``paired_bootstrap`` draws a
    block of ``resamples`` for rows in ``resample_order``.

    Example:
        >>> w = bootstrap_weights(np.random.default_rng(0), 64, 10_000).astype(float)
        >>> float(w.mean().round(2)), float(w.var().round(1)), sorted(np.unique(w).tolist())
        (1.0, 1.0, [0.0, 1.0, 2.0, 3.0])
    """
    return _draw(rng, np.empty((rows, resamples), np.uint8)).T


# ----------------------------------------------------------------------------- prefix sums down rows

_K = 64  # rows per block of the triangular GEMM in _prefix_sums
_TRIL = torch.tril(torch.ones(_K, _K))


def _padded(rows: int) -> int:
    return -(-rows // _K) * _K


def _prefix_sums(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Inclusive prefix sums down the rows of ``x`` ``[m, B]`` (``m`` a multiple of 64) into ``out``.

    Each 64-row block is one small lower-triangular GEMM (batched over blocks), then the
    blocks' running totals are added: a cumsum down the rows that reads memory twice instead
    of striding down every column (numpy's and torch's column cumsums run at ~15 ns an
    element here, this at ~2). Exact for integers while partial sums stay below 2**24.

    Example:
        >>> x = torch.arange(256.0).reshape(128, 2)
        >>> bool((_prefix_sums(x, torch.empty(128, 2)) == torch.cumsum(x, 0)).all())
        True
    """
    m, b = x.shape
    y = out.view(m // _K, _K, b)
    torch.matmul(_TRIL, x.view(m // _K, _K, b), out=y)
    if m > _K:
        carry = torch.from_numpy(np.cumsum(y[:-1, -1, :].numpy(), axis=0))
        y[1:] += carry.unsqueeze(1)
    return out


# ----------------------------------------------------------------------------- AUC and AP under weights


def resample_order(labels: np.ndarray) -> np.ndarray:
    """The rows in the order ``paired_bootstrap`` draws their weights: the smaller class first, then the
    larger (ties: the positives first), each in row order. Row ``order[p]`` gets the ``p``-th weight of each
    resample, so the larger class's weights are one contiguous slice in every block.

    Example:
        >>> resample_order(np.array([0, 1, 0, 0, 1])).tolist()
        [1, 4, 0, 2, 3]
    """
    positive = np.asarray(labels).reshape(-1).astype(bool)
    minority_is_positive = bool(positive.sum() * 2 <= len(positive))
    return np.concatenate([np.flatnonzero(positive == minority_is_positive),
                           np.flatnonzero(positive != minority_is_positive)])


@dataclass
class _AucIndex:
    """One arm's AUC under weights, prepared once (rows in ``resample_order``): the smaller class's rows in
    score order, and for each row ``j`` of the larger class how many of them score below it (``lo``) or not
    above it (``hi``). ``sum_j w_j * count below j`` is then ``sum_j w_j mid_j`` (a GEMM column) plus
    ``sum_j w_j (D(lo_j) + D(hi_j)) / 2``, ``D(k)`` the weight of the first ``k`` minority rows minus ``k``.

    The second sum reads one row per ``j`` from the prefix sums ``D``: ``D(lo_j)`` when no minority score
    ties ``j``'s, else a row appended after ``D`` holding ``(D(start) + D(end)) / 2`` of its tie group
    (``index`` says which row; ``starts``/``ends`` are the tied groups, one appended row each).
    """

    minority_order: torch.Tensor  # int64 positions (< n_min) by ascending score
    index: torch.Tensor  # int64 per majority row: its row of D, or of the appended tie rows
    starts: torch.Tensor  # int64 tie groups of minority scores that a majority score equals: [start, end)
    ends: torch.Tensor
    mid: np.ndarray  # (lo + hi) / 2 per row, 0 for minority rows
    minority_is_positive: bool


def _auc_index(scores: np.ndarray, n_min: int, minority_is_positive: bool) -> _AucIndex:
    """``scores`` in ``resample_order``: the first ``n_min`` rows are the smaller class."""
    order = np.argsort(scores[:n_min], kind="stable")
    sorted_scores = scores[:n_min][order]
    major = np.argsort(scores[n_min:], kind="stable")  # sorted queries: each search starts where the last ended
    queries = scores[n_min:][major]
    lo, hi = np.empty(len(major), np.int64), np.empty(len(major), np.int64)
    lo[major] = np.searchsorted(sorted_scores, queries, "left")
    hi[major] = np.searchsorted(sorted_scores, queries, "right")
    mid = np.zeros(len(scores))
    mid[n_min:] = (lo + hi) / 2
    tied = lo != hi  # a tied row's group is fixed by its lo: the minority scores equal to its own
    starts, first = np.unique(lo[tied], return_index=True)
    ends = hi[tied][first]
    index = lo.copy()
    index[tied] = _padded(n_min) + 1 + np.searchsorted(starts, lo[tied])
    return _AucIndex(torch.from_numpy(order), torch.from_numpy(index), torch.from_numpy(starts),
                     torch.from_numpy(ends), mid, minority_is_positive)


class _AucWork:
    """One arm's buffers, reused by every block: the centred minority weights, their prefix sums, a gather."""

    CHUNK = 16384  # majority rows gathered, weighted and summed at a time: the gather stays in cache

    def __init__(self, n_min: int, block: int, idx: _AucIndex) -> None:
        self.n_min = n_min
        self.x = torch.zeros(_padded(n_min), block)  # rows past n_min stay 0
        self.d = torch.zeros(_padded(n_min) + 1 + len(idx.starts), block)  # row 0 stays 0: D(0)
        self.below = torch.empty(self.CHUNK, block)

    def term(self, wf: torch.Tensor, idx: _AucIndex) -> np.ndarray:
        """``sum_j w_j (D(lo_j) + D(hi_j)) / 2`` per resample (the columns of ``wf`` ``[rows, b]``, whose
        first ``n_min`` rows hold the minority weights minus 1, the others the majority weights)."""
        b = wf.shape[1]
        x, d = self.x[:, :b], self.d[:, :b]
        torch.index_select(wf[:self.n_min], 0, idx.minority_order, out=x[:self.n_min])
        rows = len(x) + 1
        _prefix_sums(x, d[1:rows])  # centred: D(k) is of order sqrt(k), so float32 sums below stay exact enough
        if len(idx.starts):
            torch.add(d.index_select(0, idx.starts), d.index_select(0, idx.ends), out=d[rows:])
            d[rows:] *= 0.5
        major = wf[self.n_min:]
        acc = torch.zeros(b)
        for start in range(0, len(idx.index), self.CHUNK):
            end = min(start + self.CHUNK, len(idx.index))
            below = self.below[:end - start, :b]
            torch.index_select(d, 0, idx.index[start:end], out=below)
            below *= major[start:end]
            acc += below.sum(0)
        return acc.double().numpy()


@dataclass
class _RankIndex:
    """What one arm's weighted AP needs, computed once (rows in ``resample_order``): the descending score
    order, the positives' places in it, and where each positive's tie group ends going down."""

    order: torch.Tensor  # int64 positions by descending score
    positive: torch.Tensor  # float32 [n, 1]: 1 for positives, in that order
    pos_at: torch.Tensor  # places of the positives in the order
    threshold: torch.Tensor  # per positive: the last place of its tie group


def _rank_index(scores: np.ndarray, positive: np.ndarray) -> _RankIndex:
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    pos_at = np.flatnonzero(positive[order])
    last = np.ones(len(s), bool)
    last[:-1] = s[1:] != s[:-1]
    # the end of each tie group, carried back to every place in it
    ends = np.flatnonzero(last)
    end_of = ends[np.searchsorted(ends, np.arange(len(s)))]
    return _RankIndex(torch.from_numpy(order), torch.from_numpy(positive[order].astype(np.float32)).reshape(-1, 1),
                      torch.from_numpy(pos_at), torch.from_numpy(end_of[pos_at]))


def _weighted_ap(wf: torch.Tensor, idx: _RankIndex) -> np.ndarray:
    """Average precision under weights ``wf`` ``[rows, b]``: sum over positives of w * precision at its
    threshold (tied rows enter together), / sum of the positives' w. One value per column."""
    n, b = wf.shape
    ws = torch.zeros(_padded(n), b)
    torch.index_select(wf, 0, idx.order, out=ws[:n])
    seen = _prefix_sums(ws, torch.empty_like(ws))
    tp = _prefix_sums(ws * torch.cat([idx.positive, torch.zeros(len(ws) - n, 1)]), torch.empty_like(ws))
    prec = tp.index_select(0, idx.threshold) / seen.index_select(0, idx.threshold).clamp(min=1e-12)
    w_pos = ws.index_select(0, idx.pos_at)
    return ((w_pos.double() * prec.double()).sum(0) / w_pos.sum(0, dtype=torch.float64)).numpy()


# ----------------------------------------------------------------------------- the bootstrap


@dataclass
class BootstrapResult:
    """Paired bootstrap of every metric delta (treatment - control), in the order of ``treatments``.

    ``deltas[i][metric]`` is the full-sample delta of treatment ``i``; ``low``/``high`` the
    percentile interval at ``level``; ``p`` the two-sided bootstrap p-value (floored at
    ``2/(resamples+1)``); for calibration ``p`` tests the distance to 1 (``calibration_distance``).
    """

    metrics: tuple[str, ...]
    control: int
    treatments: tuple[int, ...]
    level: float
    resamples: int
    seconds: float
    deltas: list[dict[str, float]]
    low: list[dict[str, float]]
    high: list[dict[str, float]]
    p: list[dict[str, float]]
    replicates: list[dict[str, np.ndarray]] = field(repr=False, default_factory=list)


def _entropy(rate: np.ndarray) -> np.ndarray:
    r = np.clip(rate, 1e-300, 1 - 1e-16)
    return -(r * np.log(r) + (1 - r) * np.log1p(-r))


# Columns summed exactly (integers below 2**24 in float32); the others are centred first.
_EXACT = ("one", "y")


def _columns(positive: np.ndarray, scores: np.ndarray, control: int, task: str,
             mids: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-row columns whose weighted sums give every mean metric (and AUC's rank part)."""
    cols = {"one": np.ones(len(positive)), "y": positive.astype(np.float64)}
    for a, mid in enumerate(mids):
        cols[f"mid{a}"] = mid
    if task == "ctr":
        x = np.clip(scores.astype(np.float64), -_LOGIT_CLIP, _LOGIT_CLIP)
        loss = np.logaddexp(0.0, x) - positive * x
        prob = 1.0 / (1.0 + np.exp(-x))
        for a in range(len(scores)):
            cols[f"prob{a}"] = prob[a]
            cols[f"dloss{a}"] = loss[a] - loss[control]
            cols[f"dprob{a}"] = prob[a] - prob[control]
    return cols


def _pvalue(rep: np.ndarray) -> float:
    b = len(rep)
    return float(min(1.0, 2 * min((np.sum(rep <= 0) + 1) / (b + 1), (np.sum(rep >= 0) + 1) / (b + 1))))


class _Done:
    """A result computed on the spot, shaped like a finished ``Future``."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


def _submit(pool: ThreadPoolExecutor | None, fn: Callable[..., Any], *args: Any) -> Any:
    return pool.submit(fn, *args) if pool is not None else _Done(fn(*args))


def _map(pool: ThreadPoolExecutor | None, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterable[Any]:
    return pool.map(fn, items) if pool is not None else map(fn, items)


def _replicates(positive: np.ndarray, cols: dict[str, np.ndarray], aucs: list[_AucIndex], ranks: list[_RankIndex],
                task: str, resamples: int, seed: int, block: int, pool: ThreadPoolExecutor | None,
                ) -> dict[str, np.ndarray]:
    """Every arm's metric replicates (``auc/0``, ``logloss/1``, ...), ``block`` resamples at a time.

    Rows are in ``resample_order``. Per block: the weights are one ``[rows, block]`` matrix,
    the mean metrics one GEMM with the centred columns, each arm's AUC (and AP) one task;
    the next block's weights are drawn while this block's tasks run.
    """
    n, arms = len(positive), len(aucs)
    n_min = int((positive == positive[0]).sum())
    names = list(cols)
    means = np.array([0.0 if k in _EXACT else cols[k].mean() for k in names])
    xt = torch.from_numpy(np.stack([cols[k] - m for k, m in zip(names, means, strict=True)]).astype(np.float32))
    # The weight matrix holds w - 1 in the minority rows (what the AUC's prefix sums take): add those rows back.
    minority_sums = xt[:, :n_min].double().sum(1).numpy()
    at = {k: i for i, k in enumerate(names)}
    block = block or max(1, min(resamples, (1 << 25) // n))
    if block > 16:
        block -= block % 16  # whole cache lines per row of weights
    rng = np.random.default_rng(seed)
    buffers = [(np.empty(n * block, np.uint8), torch.empty(n * block)) for _ in range(2)]  # this block, the next
    works = [_AucWork(n_min, block, idx) for idx in aucs]
    sizes = [min(block, resamples - start) for start in range(0, resamples, block)]

    def fill(k: int, b: int) -> torch.Tensor:
        w8, wf = buffers[k % 2]
        w8v, wfv = w8[:n * b].reshape(n, b), wf[:n * b].view(n, b)
        _draw(rng, w8v)
        w8t = torch.from_numpy(w8v)
        w8t[:n_min] -= 1  # uint8 wraps: 0 becomes 255, read back as int8 -1
        wfv[:n_min].copy_(w8t[:n_min].view(torch.int8))
        wfv[n_min:].copy_(w8t[n_min:])
        return wfv

    def weighted_ap(wfv: torch.Tensor, idx: _RankIndex) -> np.ndarray:
        whole = wfv.clone()
        whole[:n_min] += 1.0
        return _weighted_ap(whole, idx)

    parts: dict[str, list[np.ndarray]] = {}

    def keep(name: str, value: np.ndarray) -> None:
        parts.setdefault(name, []).append(np.asarray(value, dtype=np.float64))

    current = fill(0, sizes[0])
    for i in range(len(sizes)):
        wfv = current
        following = _submit(pool, fill, i + 1, sizes[i + 1]) if i + 1 < len(sizes) else None
        terms = [_submit(pool, works[a].term, wfv, aucs[a]) for a in range(arms)]
        aps = [_submit(pool, weighted_ap, wfv, ranks[a]) for a in range(arms)] if task == "anomaly" else []
        # [b, columns]: sum_r w_r (x_r - mean), mean 0 for _EXACT
        sums = (xt @ wfv).double().numpy().T + minority_sums
        total = sums[:, at["one"]].copy()
        sums += np.outer(total, means)
        w_pos = sums[:, at["y"]]
        pairs = w_pos * (total - w_pos)
        for a in range(arms):
            t = sums[:, at[f"mid{a}"]] + terms[a].result()
            keep(f"auc/{a}", 1 - t / pairs if aucs[a].minority_is_positive else t / pairs)
            if task == "ctr":
                keep(f"logloss/{a}", sums[:, at[f"dloss{a}"]] / total)
                keep(f"ne/{a}", sums[:, at[f"dloss{a}"]] / total / _entropy(w_pos / total))
                keep(f"calibration/{a}", sums[:, at[f"dprob{a}"]] / w_pos)
                keep(f"abs_cal/{a}", sums[:, at[f"prob{a}"]] / w_pos)
            else:
                keep(f"ap/{a}", aps[a].result())
        if following is not None:
            current = following.result()
    return {k: np.concatenate(v) for k, v in parts.items()}


def paired_bootstrap(
    labels: np.ndarray, scores: np.ndarray, control: int = 0, resamples: int = 1000, level: float = 0.95,
    seed: int = 0, task: str = "ctr", block: int = 0,
) -> BootstrapResult:
    """Paired bootstrap of every metric delta against arm ``control``.

    ``labels``: 0/1 per row (1 = click, or anomaly for ``task="anomaly"``); ``scores``:
    ``[arms, rows]`` logits (CTR) or anomaly scores (higher = more anomalous). CTR metrics:
    auc, logloss, ne, calibration; anomaly: auc, ap. ``block`` resamples are drawn at a
    time (default: about 32M weights per block), as a ``[rows, block]`` matrix whose rows
    follow ``resample_order``. Weighted sums run in float32: counts of weights exactly,
    other columns centred (their errors are far below the intervals). The arms run as
    ``torch.get_num_threads()`` parallel tasks, torch kept to one thread meanwhile (restored after).

    Example:
        >>> y = np.array([0, 1, 0, 1, 1, 0] * 50, float); s = np.stack([y * 2 - 1.0, np.zeros(300)])
        >>> r = paired_bootstrap(y, s, resamples=100)
        >>> r.deltas[0]["auc"], r.high[0]["auc"] < 0
        (-0.5, True)
    """
    t0 = time.perf_counter()
    positive = np.asarray(labels).reshape(-1).astype(bool)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    arms, n = scores.shape
    if n == 0 or len(positive) != n:
        raise DataError(f"bootstrap needs one label per scored row (got {len(positive)} labels, {n} rows)")
    if not 0 < level < 1:
        raise DataError(f"level {level}: must lie strictly between 0 and 1 (e.g. 0.95)")
    if not 0 <= control < arms:
        raise DataError(f"control arm {control} out of range for {arms} arms")
    if positive.all() or not positive.any():
        raise DataError("the rows hold one class only: AUC and the deltas are undefined")
    if n * 3 >= 1 << 24:
        raise DataError(f"{n:,} rows: the bootstrap's float32 weight counts are exact up to 5.5M rows; "
                        "sample the rows first")
    metrics = CTR_METRICS if task == "ctr" else ANOMALY_METRICS
    treatments = tuple(a for a in range(arms) if a != control)
    order = resample_order(positive)
    positive, scores = positive[order], scores[:, order]
    n_min = int((positive == positive[0]).sum())
    threads = max(1, torch.get_num_threads())
    pool = ThreadPoolExecutor(min(threads, arms + 1)) if threads > 1 else None
    torch.set_num_threads(1)  # tasks run side by side instead: no thread barriers inside each kernel
    try:
        aucs = list(_map(pool, lambda a: _auc_index(scores[a], n_min, bool(positive[0])), range(arms)))
        ranks = list(_map(pool, lambda a: _rank_index(scores[a], positive), range(arms))) if task == "anomaly" \
            else []
        cols = _columns(positive, scores, control, task, [i.mid for i in aucs])
        rep = _replicates(positive, cols, aucs, ranks, task, resamples, seed, block, pool)
    finally:
        torch.set_num_threads(threads)
        if pool is not None:
            pool.shutdown()
    point = _point(positive, scores, cols, aucs, ranks, task)
    tail = (1 - level) / 2
    result = BootstrapResult(metrics, control, treatments, level, resamples, 0.0, [], [], [], [])
    for t in treatments:
        d, lo, hi, p, kept = {}, {}, {}, {}, {}
        for m in metrics:
            if m in ("auc", "ap"):  # per arm: the delta is a difference of replicates
                r = rep[f"{m}/{t}"] - rep[f"{m}/{control}"]
                d[m] = point[t][m] - point[control][m]
            else:  # the delta columns already hold treatment - control
                r = rep[f"{m}/{t}"]
                d[m] = point[t][m]
            lo[m], hi[m] = (float(v) for v in np.quantile(r, [tail, 1 - tail]))
            p[m] = _pvalue(r)
            kept[m] = r
        if task == "ctr":  # calibration is judged on the distance to 1
            closer = np.abs(rep[f"abs_cal/{t}"] - 1) - np.abs(rep[f"abs_cal/{control}"] - 1)
            p["calibration"] = _pvalue(closer)
            kept["calibration_distance"] = closer
            d["calibration_distance"] = abs(point[t]["abs_cal"] - 1) - abs(point[control]["abs_cal"] - 1)
            lo["calibration_distance"], hi["calibration_distance"] = (
                float(v) for v in np.quantile(closer, [tail, 1 - tail]))
        result.deltas.append(d)
        result.low.append(lo)
        result.high.append(hi)
        result.p.append(p)
        result.replicates.append(kept)
    result.seconds = time.perf_counter() - t0
    return result


def _point(positive: np.ndarray, scores: np.ndarray, cols: dict[str, np.ndarray], aucs: list[_AucIndex],
           ranks: list[_RankIndex], task: str) -> dict[int, dict[str, float]]:
    """Full-sample values (every weight 1) in the same terms as the replicates."""
    n = len(positive)
    w_pos = float(positive.sum())
    pairs = w_pos * (n - w_pos)
    out: dict[int, dict[str, float]] = {}
    for a, idx in enumerate(aucs):
        t = float(cols[f"mid{a}"].sum())
        out[a] = {"auc": 1 - t / pairs if idx.minority_is_positive else t / pairs}
        if task == "ctr":
            dloss = float(cols[f"dloss{a}"].sum())
            out[a].update(logloss=dloss / n, ne=dloss / n / float(_entropy(np.array(w_pos / n))),
                          calibration=float(cols[f"dprob{a}"].sum()) / w_pos,
                          abs_cal=float(cols[f"prob{a}"].sum()) / w_pos)
        else:
            out[a]["ap"] = float(_weighted_ap(torch.ones(n, 1), ranks[a])[0])
    return out


# ----------------------------------------------------------------------------- DeLong


def midranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with tied values sharing the mean of their ranks.

    Example:
        >>> midranks(np.array([0.3, 0.1, 0.3, 0.2])).tolist()
        [3.5, 1.0, 3.5, 2.0]
    """
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.ones(len(xs), bool)
    new[1:] = xs[1:] != xs[:-1]
    group = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(xs))
    mid = (starts + 1 + ends) / 2.0
    out = np.empty(len(xs))
    out[order] = mid[group]
    return out


@dataclass(frozen=True)
class DeLong:
    """DeLong's AUCs of paired arms and their covariance matrix (``cov[a, b]``)."""

    aucs: np.ndarray
    cov: np.ndarray

    def diff(self, treatment: int, control: int, level: float = 0.95) -> tuple[float, float, float, float]:
        """``(delta, low, high, p)`` of AUC[treatment] - AUC[control]: normal interval, two-sided p."""
        delta = float(self.aucs[treatment] - self.aucs[control])
        var = float(self.cov[treatment, treatment] + self.cov[control, control] - 2 * self.cov[treatment, control])
        if var <= 0:  # identical rankings: no difference, no spread
            return delta, delta, delta, 1.0 if delta == 0 else 0.0
        sd = math.sqrt(var)
        z = NormalDist().inv_cdf(0.5 + level / 2)
        return delta, delta - z * sd, delta + z * sd, math.erfc(abs(delta) / sd / math.sqrt(2))


def delong(scores: np.ndarray, labels: np.ndarray) -> DeLong:
    """DeLong's AUC covariance of ``scores`` ``[arms, rows]`` on shared 0/1 ``labels``, in O(n log n) (Sun & Xu 2014).

    Structural components from midranks: ``V10_i = (rank of positive i among all - its rank
    among positives) / n_neg``, ``V01_j = 1 - (rank of negative j among all - its rank
    among negatives) / n_pos``; ``cov = S10 / n_pos + S01 / n_neg``.

    Example:
        >>> d = delong(np.array([[0.1, 0.4, 0.35, 0.8]]), np.array([0, 0, 1, 1]))
        >>> float(d.aucs[0]), round(float(d.cov[0, 0]), 4)
        (0.75, 0.125)
    """
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    positive = np.asarray(labels).reshape(-1).astype(bool)
    m, n = int(positive.sum()), int((~positive).sum())
    if m < 2 or n < 2:
        raise DataError(f"DeLong's test needs at least 2 positives and 2 negatives (got {m} and {n})")
    x, y = scores[:, positive], scores[:, ~positive]
    v10 = np.empty((len(scores), m))
    v01 = np.empty((len(scores), n))
    aucs = np.empty(len(scores))
    for a in range(len(scores)):  # arms: a handful
        tz = midranks(np.concatenate([x[a], y[a]]))
        tx, ty = midranks(x[a]), midranks(y[a])
        aucs[a] = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
        v10[a] = (tz[:m] - tx) / n
        v01[a] = 1.0 - (tz[m:] - ty) / m
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return DeLong(aucs, cov)


# ----------------------------------------------------------------------------- Holm


def holm(pvalues: list[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (same order as given); NaN stays NaN and is not counted.

    Example:
        >>> holm([0.01, 0.04, 0.03, 0.005]).tolist()
        [0.03, 0.06, 0.06, 0.02]
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(len(p), np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    k = len(order)
    adjusted = np.minimum(1.0, np.maximum.accumulate((k - np.arange(k)) * p[order]))
    out[order] = adjusted
    return out


# ----------------------------------------------------------------------------- group AUC


@dataclass(frozen=True)
class GroupAUC:
    """Per-group AUCs of one arm (groups with both classes) and the impression-weighted mean."""

    value: float
    groups: np.ndarray  # group codes kept
    aucs: np.ndarray
    impressions: np.ndarray


def group_auc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> GroupAUC:
    """Mean per-group AUC weighted by each group's rows; groups with one class are skipped.

    Example:
        >>> g = group_auc(np.array([.1, .9, .2, .3, .5, .6]), np.array([0, 1, 1, 0, 1, 1]), np.array([0, 0, 1, 1, 2, 2]))
        >>> g.value, g.aucs.tolist(), g.impressions.tolist()
        (0.5, [1.0, 0.0], [2, 2])
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(labels).reshape(-1).astype(bool)
    _, code = np.unique(np.asarray(groups), return_inverse=True)
    code = code.reshape(-1)
    order = np.lexsort((scores, code))
    g, s, p = code[order], scores[order], positive[order]
    n_groups = int(code.max()) + 1 if len(code) else 0
    pos = np.bincount(g, weights=p, minlength=n_groups)
    rows = np.bincount(g, minlength=n_groups)
    neg_cum = np.cumsum(~p)
    start = np.concatenate([[0], np.cumsum(rows)[:-1]])
    neg_before_group = np.where(start > 0, neg_cum[np.maximum(start - 1, 0)], 0)
    # Ties (same group and score): negatives strictly below plus half the tied ones.
    new = np.ones(len(s), bool)
    new[1:] = (s[1:] != s[:-1]) | (g[1:] != g[:-1])
    first = np.flatnonzero(new)
    run = np.cumsum(new) - 1
    last = np.append(first[1:], len(s)) - 1
    below = np.where(first > 0, neg_cum[np.maximum(first - 1, 0)], 0)[run] - neg_before_group[g]
    tied = neg_cum[last][run] - np.where(first > 0, neg_cum[np.maximum(first - 1, 0)], 0)[run]
    wins = np.bincount(g, weights=np.where(p, below + 0.5 * tied, 0.0), minlength=n_groups)
    neg = rows - pos
    keep = (pos > 0) & (neg > 0)
    aucs = wins[keep] / (pos[keep] * neg[keep])
    value = float(np.average(aucs, weights=rows[keep])) if keep.any() else math.nan
    return GroupAUC(value, np.flatnonzero(keep), aucs, rows[keep])


def group_auc_bootstrap(per_arm: list[GroupAUC], control: int, resamples: int = 1000, seed: int = 0,
                        ) -> np.ndarray:
    """Replicates ``[arms, resamples]`` of each arm's group AUC minus control's, resampling groups (Poisson weights).

    Groups, not rows, are the unit: a user's impressions move together. Only groups kept by
    every arm count (they are the same groups: every arm scores the same rows and labels).
    """
    common = per_arm[0].groups
    for g in per_arm[1:]:
        common = np.intersect1d(common, g.groups)
    aucs = np.stack([g.aucs[np.searchsorted(g.groups, common)] for g in per_arm])
    imp = per_arm[0].impressions[np.searchsorted(per_arm[0].groups, common)].astype(np.float64)
    w = bootstrap_weights(np.random.default_rng(seed), resamples, len(common)).astype(np.float64) * imp
    values = (w @ aucs.T) / w.sum(1, keepdims=True)  # [resamples, arms]
    return (values - values[:, [control]]).T


__all__ = ["ANOMALY_METRICS", "CTR_METRICS", "DIRECTION", "BootstrapResult", "DeLong", "GroupAUC", "delong",
           "group_auc", "group_auc_bootstrap", "holm", "midranks", "paired_bootstrap", "bootstrap_weights"]
