"""Paired statistics for offline A/B: a vectorised paired bootstrap, DeLong's test, Holm, group AUC.

Every arm scores the same rows, so differences are measured *paired*: each bootstrap
resample weights the rows once and all arms are scored under the same weights, and
DeLong's test uses the covariance of the arms' AUCs on the same rows. Both remove the
row-to-row noise that unpaired intervals would carry, which is most of it.

The bootstrap draws Poisson(1)-like row weights (integers 0..5 with mean 1 and variance 1,
each probability within 1/256 of Poisson(1)'s) for blocks of resamples at once: the mean
metrics (log loss, NE, calibration) are one matrix product of the weights with per-row
columns, and AUC (or AP) is a cumulative sum of weights in each arm's score order, so there
is no Python loop over resamples, only over blocks of them.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import torch

from recemb.errors import DataError
from recemb.eval.metrics import EPS

# Bootstrap weights w = a + 2 (b & c) from three random bits: P(0) = P(1) = 3/8, P(2) = P(3) = 1/8,
# mean 1 and variance 1 like Poisson(1) (whose first four probabilities are .37, .37, .18, .06).
_LANES = np.uint64(0x0101010101010101)
_LOGIT_CLIP = math.log((1.0 - EPS) / EPS)
CTR_METRICS = ("auc", "logloss", "ne", "calibration")
ANOMALY_METRICS = ("auc", "ap")
# +1: higher is better; -1: lower is better; 0: closer to 1 is better (judged on |value - 1|).
DIRECTION = {"auc": 1, "ap": 1, "gauc": 1, "logloss": -1, "ne": -1, "calibration": 0}


def bootstrap_weights(rng: np.random.Generator, resamples: int, rows: int, out: np.ndarray | None = None,
                      ) -> np.ndarray:
    """``[resamples, rows]`` uint8 bootstrap weights in 0..3 with mean 1 and variance 1 (see above).

    Three random bits make one weight, eight weights are made per 64-bit word operation.

    Example:
        >>> w = bootstrap_weights(np.random.default_rng(0), 64, 10_000).astype(float)
        >>> float(w.mean().round(2)), float(w.var().round(1)), sorted(np.unique(w).tolist())
        (1.0, 1.0, [0.0, 1.0, 2.0, 3.0])
    """
    total = resamples * rows
    words = -(-total // 64)  # each triple of random words gives 64 weights
    bits = rng.bit_generator.random_raw(3 * words).reshape(3, words)
    a, bc = bits[0], bits[1] & bits[2]
    packed = np.empty((8, words), np.uint64)
    tmp = np.empty(words, np.uint64)
    for k in range(8):
        np.bitwise_and(np.right_shift(a, np.uint64(k), out=packed[k]), _LANES, out=packed[k])
        np.bitwise_and(np.right_shift(bc, np.uint64(k), out=tmp), _LANES, out=tmp)
        np.left_shift(tmp, np.uint64(1), out=tmp)
        np.bitwise_or(packed[k], tmp, out=packed[k])
    flat = packed.reshape(-1).view(np.uint8)[:total].reshape(resamples, rows)
    if out is None:
        return flat
    out[...] = flat
    return out


# ----------------------------------------------------------------------------- AUC and AP under weights


@dataclass
class _AucIndex:
    """One arm's AUC under weights, prepared once: the smaller class in score order, and for each row of
    the larger class how many of them score below it (``lo``) or not above it (``hi``)."""

    minority_order: np.ndarray  # rows of the smaller class by score, after a leading ``n`` (a zero-weight row)
    lo: np.ndarray  # int64 per majority row (in row order)
    hi: np.ndarray | None  # None when no majority score ties a minority score
    mid: np.ndarray  # (lo + hi) / 2 per row, 0 for minority rows: its weighted sum is a GEMM column
    minority_is_positive: bool


def _auc_index(scores: np.ndarray, positive: np.ndarray, majority: np.ndarray) -> _AucIndex:
    minority_is_positive = bool(positive.sum() * 2 <= len(positive))
    minority = np.flatnonzero(positive == minority_is_positive)
    order = minority[np.argsort(scores[minority], kind="stable")]
    sorted_scores = scores[order]
    lo = np.searchsorted(sorted_scores, scores[majority], "left")
    hi = np.searchsorted(sorted_scores, scores[majority], "right")
    mid = np.zeros(len(scores))
    mid[majority] = (lo + hi) / 2
    return _AucIndex(np.concatenate([[len(scores)], order]), lo, None if np.array_equal(lo, hi) else hi, mid,
                     minority_is_positive)


def _auc_term(w8: np.ndarray, w_major: np.ndarray, idx: _AucIndex) -> np.ndarray:
    """``sum_r w_r (D(lo_r) + D(hi_r)) / 2`` over majority rows r, where ``D(k)`` is the weight of the first
    ``k`` minority rows minus ``k``: the part of the weighted pair count that the GEMM column ``mid`` lacks."""
    taken = torch.from_numpy(np.take(w8, idx.minority_order, axis=1))  # [B, 1 + n_min], column 0 is 0
    cum = torch.cumsum(taken, 1, dtype=torch.float32)  # integers: exact below 2**24
    cum -= torch.arange(cum.shape[1], dtype=torch.float32)  # centred: D(k), of order sqrt(k)
    below = np.take(cum.numpy(), idx.lo, axis=1)
    if idx.hi is not None:
        below += np.take(cum.numpy(), idx.hi, axis=1)
        below *= 0.5
    return np.einsum("ij,ij->i", w_major, below).astype(np.float64)


@dataclass
class _RankIndex:
    """What one arm's weighted AP needs, computed once: the score order and where ties end."""

    order: torch.Tensor  # row indices by ascending score
    positive: torch.Tensor  # float32 [n]
    pos_at: torch.Tensor  # positions (in sorted order) of the positives
    before: torch.Tensor | None  # per positive: last position before its tie group; None: no ties


def _rank_index(scores: np.ndarray, positive: np.ndarray) -> _RankIndex:
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    pos_sorted = positive[order]
    pos_at = np.flatnonzero(pos_sorted)
    before = None
    if np.any(s[1:] == s[:-1]):
        new = np.ones(len(s), bool)
        new[1:] = s[1:] != s[:-1]
        start = np.maximum.accumulate(np.where(new, np.arange(len(s)), 0))
        before = torch.from_numpy(start[pos_at] - 1)
    return _RankIndex(torch.from_numpy(order), torch.from_numpy(pos_sorted.astype(np.float32)),
                      torch.from_numpy(pos_at), before)


def _weighted_ap(w: torch.Tensor, idx: _RankIndex) -> torch.Tensor:
    """Average precision under weights: sum over positives of w * precision at its threshold, / sum w (positives)."""
    ws = w.index_select(1, idx.order).flip(1)  # descending score: thresholds from the top
    n = ws.shape[1]
    tp = torch.cumsum(ws * idx.positive.flip(0), 1)
    seen = torch.cumsum(ws, 1)
    # A positive at ascending position k sits at n-1-k going down; tied rows enter together, so its
    # threshold is where its tie group ends going down (the ascending group's start).
    at = n - 1 - idx.pos_at if idx.before is None else n - 2 - idx.before
    prec = tp.index_select(1, at) / seen.index_select(1, at).clamp(min=1e-12)
    w_pos = ws.index_select(1, n - 1 - idx.pos_at)
    return (w_pos.double() * prec.double()).sum(1) / w_pos.sum(1, dtype=torch.float64)


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


def paired_bootstrap(
    labels: np.ndarray, scores: np.ndarray, control: int = 0, resamples: int = 1000, level: float = 0.95,
    seed: int = 0, task: str = "ctr", block: int = 0,
) -> BootstrapResult:
    """Paired bootstrap of every metric delta against arm ``control``.

    ``labels``: 0/1 per row (1 = click, or anomaly for ``task="anomaly"``); ``scores``:
    ``[arms, rows]`` logits (CTR) or anomaly scores (higher = more anomalous). CTR metrics:
    auc, logloss, ne, calibration; anomaly: auc, ap. ``block`` resamples are drawn at a
    time (default: about 32M weights per block). Weighted sums run in float32 over centred
    columns (their errors are far below the intervals), counts of weights are exact.

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
    minority_is_positive = bool(positive.sum() * 2 <= n)
    majority = np.flatnonzero(positive != minority_is_positive)
    aucs = [_auc_index(scores[a], positive, majority) for a in range(arms)]
    ranks = [_rank_index(scores[a], positive) for a in range(arms)] if task == "anomaly" else []
    cols = _columns(positive, scores, control, task, [i.mid for i in aucs])
    names = list(cols)
    means = np.array([cols[k].mean() for k in names])
    # Centred columns: a weighted sum is mean * sum(w) + sum(w * (x - mean)), the second term small.
    x = torch.from_numpy(np.stack([cols[k] - m for k, m in zip(names, means, strict=True)], 1).astype(np.float32))
    at = {k: i for i, k in enumerate(names)}
    pool = ThreadPoolExecutor(max(1, min(arms, torch.get_num_threads())))
    block = block or max(1, min(resamples, (1 << 25) // n))
    rng = np.random.default_rng(seed)
    w8 = np.zeros((block, n + 1), np.uint8)  # column n: the zero-weight row that _AucIndex starts with
    w32 = torch.empty(block, n)
    parts: dict[str, list[np.ndarray]] = {}

    def keep(name: str, value: torch.Tensor | np.ndarray) -> None:
        parts.setdefault(name, []).append(np.asarray(value, dtype=np.float64))

    done = 0
    while done < resamples:
        b = min(block, resamples - done)
        w8v, wf = w8[:b], w32[:b]
        bootstrap_weights(rng, b, n, out=w8v[:, :n])
        wf.copy_(torch.from_numpy(w8v[:, :n]))
        total = wf.sum(1, dtype=torch.float64).numpy()  # exact: integers
        sums = (wf @ x).double().numpy() + np.outer(total, means)
        w_pos = sums[:, at["y"]]
        w_major = np.take(w8v, majority, axis=1)
        pairs = w_pos * (total - w_pos)
        terms = list(pool.map(_auc_term, [w8v] * arms, [w_major] * arms, aucs))  # numpy/torch drop the GIL
        for a in range(arms):
            t = sums[:, at[f"mid{a}"]] + terms[a]
            keep(f"auc/{a}", 1 - t / pairs if aucs[a].minority_is_positive else t / pairs)
            if task == "ctr":
                keep(f"logloss/{a}", sums[:, at[f"dloss{a}"]] / total)
                keep(f"ne/{a}", sums[:, at[f"dloss{a}"]] / total / _entropy(w_pos / total))
                keep(f"calibration/{a}", sums[:, at[f"dprob{a}"]] / w_pos)
                keep(f"abs_cal/{a}", sums[:, at[f"prob{a}"]] / w_pos)
            else:
                keep(f"ap/{a}", _weighted_ap(wf, ranks[a]).numpy())
        done += b
    pool.shutdown()
    rep = {k: np.concatenate(v) for k, v in parts.items()}
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
            out[a]["ap"] = float(_weighted_ap(torch.ones(1, n), ranks[a])[0])
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
