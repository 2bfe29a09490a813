"""Offline A/B comparison of scored arms on the same rows: metrics, paired deltas, slices, verdicts.

``compare`` takes each arm's scores keyed by row (every arm must score exactly the rows of
the data), the control's name and the data's labels, slice columns and id-frequency
classes, and returns an ``ABResult``: per arm AUC/log loss/NE/calibration (or ROC AUC and
AP with the anomaly as positive), bytes and speed; per treatment and metric the delta
against control with a paired-bootstrap interval, DeLong's p for AUC, Holm's correction
across treatments and metrics, and a plain-words verdict; the same metrics per slice
(DeLong intervals for AUC, paired normal intervals for log loss), whose deltas form a
second Holm family of their own (every slice x treatment x metric), so a slice verdict
is corrected for the many slices looked at but never dilutes the headline verdicts.
Scoring lives in ``pipelines/ab.py``; this module knows no Ray, MLflow or files.

Example:
    >>> rows = EvalRows(keys=np.arange(4), labels=np.array([0, 1, 0, 1]), fingerprint="f")   # doctest: +SKIP
    >>> result = compare([control_arm, treatment_arm], "full", rows)                           # doctest: +SKIP
    >>> print(result.verdicts[0].text)                                                          # doctest: +SKIP
    unified vs full: auc worse at 95% (Holm), by -0.0123 (CI -0.0150..-0.0097)
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from recemb.data.schema import FeatureMap
from recemb.errors import DataError
from recemb.eval.metrics import auc as exact_auc
from recemb.eval.metrics import average_precision, compute_metrics
from recemb.eval.stats import DIRECTION, delong, group_auc, group_auc_bootstrap, holm, paired_bootstrap

# Id-frequency slices: head ids cover the top HEAD share of training occurrences, torso the next
# share up to TORSO, tail the rest (and ids never counted: the OOV id, hashed values).
HEAD, TORSO = 0.5, 0.9
CLASSES = ("head", "torso", "tail")
MAX_SLICE_VALUES = 20  # a slice column with more values keeps the most frequent ones, the rest as "other"
SHARD_BITS = 40  # a row key is shard index << 40 | row


def row_key(shard: np.ndarray, row: np.ndarray) -> np.ndarray:
    """int64 keys of ``(shard index, row in shard)`` pairs."""
    return (np.asarray(shard, np.int64) << SHARD_BITS) | np.asarray(row, np.int64)


# ----------------------------------------------------------------------------- fitting the data


def feature_map_fingerprint(fm: FeatureMap) -> str:
    """sha256 of what encodes rows: label and every feature's spec (vocabulary contents included), not shards.

    Two prepared folders of the same data and config share it; a model trained on one scores the other.
    """
    return hashlib.sha256(json.dumps(_encoding(fm), sort_keys=True).encode()).hexdigest()


def _encoding(fm: FeatureMap) -> dict[str, Any]:
    out: dict[str, Any] = {"label": fm.label, "features": {}}
    root = getattr(fm, "root", None)
    for info in fm.features:
        spec = asdict(info)
        if info.vocab_file and root is not None:
            spec["vocab_file"] = hashlib.sha256((root / info.vocab_file).read_bytes()).hexdigest()
        out["features"][info.name] = spec
    return out


def fit_problem(arm: FeatureMap, data: FeatureMap) -> str | None:
    """``None`` when ``arm``'s feature map encodes rows as ``data``'s does, else what differs first."""
    if feature_map_fingerprint(arm) == feature_map_fingerprint(data):
        return None
    a, d = _encoding(arm), _encoding(data)
    if a["label"] != d["label"]:
        return f"label column '{a['label']}' vs '{d['label']}'"
    missing = [f for f in a["features"] if f not in d["features"]]
    if missing:
        return f"feature '{missing[0]}' is not in the data"
    extra = [f for f in d["features"] if f not in a["features"]]
    if extra:
        return f"the data has feature '{extra[0]}' the arm was not trained on"
    for name, spec in a["features"].items():
        for key, value in spec.items():
            if d["features"][name].get(key) != value:
                what = "vocabulary contents (sha256)" if key == "vocab_file" else key
                return f"feature '{name}': {what} {_short(value)} vs {_short(d['features'][name].get(key))} in the data"
    return "feature order"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


# ----------------------------------------------------------------------------- id-frequency classes


def frequency_classes(counts: np.ndarray, head: float = HEAD, torso: float = TORSO) -> np.ndarray:
    """Class of each id (0 head, 1 torso, 2 tail) by training counts: head ids are the most frequent ones
    whose occurrences before them stay under ``head`` of all, torso up to ``torso``; ids counted 0 are tail.

    Example:
        >>> frequency_classes(np.array([0, 50, 30, 10, 6, 4])).tolist()
        [2, 0, 1, 1, 2, 2]
    """
    counts = np.asarray(counts, np.float64)
    order = np.argsort(-counts, kind="stable")
    total = counts.sum()
    before = (np.cumsum(counts[order]) - counts[order]) / total if total > 0 else np.ones(len(counts))
    cls = np.where(before < head, 0, np.where(before < torso, 1, 2)).astype(np.int8)
    out = np.empty(len(counts), np.int8)
    out[order] = cls
    out[counts == 0] = 2
    return out


def row_classes(id_class: np.ndarray, values: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
    """Each row's class for one feature: its id's class, or for multi-hot rows the rarest of their ids
    (an empty row is tail). Ids outside the table (unseen) are tail."""
    values = np.asarray(values, np.int64)
    inside = (values >= 0) & (values < len(id_class))
    per_id = np.where(inside, id_class[np.clip(values, 0, len(id_class) - 1)], 2).astype(np.int8)
    if lengths is None:
        return per_id
    lengths = np.asarray(lengths, np.int64)
    out = np.full(len(lengths), 2, np.int8)
    has = lengths > 0
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    if per_id.size:
        out[has] = np.maximum.reduceat(per_id, starts[has])
    return out


# ----------------------------------------------------------------------------- inputs and results


@dataclass
class Speed:
    """Scoring speed of one arm, measured on the same batches as the other arms, in one process."""

    rows_per_s: float
    p50_ms: float
    p99_ms: float
    batch_rows: int
    batches: int


@dataclass
class ArmScores:
    """One arm's scores keyed by row: logits (CTR) or anomaly scores (higher = more anomalous)."""

    name: str
    kind: str  # "run" or "bundle"
    source: str
    keys: np.ndarray
    scores: np.ndarray
    fingerprint: str
    embedding_bytes: int = 0
    speed: Speed | None = None
    task: str = "ctr"


@dataclass
class EvalRows:
    """The rows every arm scores: keys (sorted, unique), 0/1 labels (1 = click or anomaly), slices."""

    keys: np.ndarray
    labels: np.ndarray
    fingerprint: str
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # slice columns by name
    frequency: dict[str, np.ndarray] = field(default_factory=dict)  # feature -> class (0/1/2) per row
    group: np.ndarray | None = None


@dataclass
class Verdict:
    """A treatment's difference from control on one metric, after Holm's correction."""

    treatment: str
    metric: str
    delta: float
    low: float
    high: float
    p: float
    p_holm: float
    verdict: str  # "better", "worse" or "indistinguishable"
    test: str
    text: str


@dataclass
class ArmSummary:
    name: str
    kind: str
    source: str
    metrics: dict[str, float]
    embedding_bytes: int
    speed: Speed | None


@dataclass
class SliceDelta:
    """A treatment's difference from control on one metric within one slice.

    ``low``/``high``: the unadjusted interval at the comparison's level (DeLong for AUC, a
    paired normal interval for log loss); ``p_holm``: Holm-adjusted within the slice family
    (all slices, treatments and metrics together), which ``verdict`` is judged on.
    """

    delta: float
    low: float
    high: float
    p: float
    p_holm: float = math.nan
    verdict: str = "indistinguishable"


@dataclass
class SliceRow:
    """Metrics of every arm on the rows of one slice value, and each treatment's deltas with intervals."""

    slice: str
    value: str
    rows: int
    positives: int
    metrics: dict[str, dict[str, float]]
    deltas: dict[str, dict[str, SliceDelta]]  # treatment -> metric -> delta


@dataclass
class DataSummary:
    """Where the compared rows came from: a prepared split, or a raw file encoded through the control's
    feature map (``rows_in`` read, ``rejected`` by reason, ``unseen``: per feature the share of values
    that took the OOV id)."""

    path: str
    kind: str  # "prepared" or "raw"
    split: str
    rows_in: int
    rows: int
    rejected: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    unseen: dict[str, float] = field(default_factory=dict)
    dropped: int = 0  # rows without a label (anomaly data: label 0), left out of the comparison


@dataclass
class ABResult:
    control: str
    level: float
    task: str
    rows: int
    resamples: int
    bootstrap_seconds: float
    arms: list[ArmSummary]
    verdicts: list[Verdict]
    slices: list[SliceRow]
    curves: dict[str, dict[str, dict[str, list[float]]]]
    group: str | None = None
    slice_tests: int = 0  # size of the slices' Holm family
    data: DataSummary | None = None

    def arm(self, name: str) -> ArmSummary:
        return next(a for a in self.arms if a.name == name)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (NaN and inf become null)."""
        return _clean(asdict(self))


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


# ----------------------------------------------------------------------------- comparing


def _align(arms: Sequence[ArmScores], rows: EvalRows) -> np.ndarray:
    """``[arms, rows]`` scores in the order of ``rows.keys``; refuses arms that scored other rows."""
    keys = np.asarray(rows.keys)
    if len(keys) == 0:
        raise DataError("no rows to compare")
    if np.any(keys[1:] <= keys[:-1]):
        raise DataError("row keys of the data must be sorted and unique (bug?)")
    out = np.empty((len(arms), len(keys)))
    for i, arm in enumerate(arms):
        if arm.fingerprint != rows.fingerprint:
            raise DataError(f"arm '{arm.name}' ({arm.source}): its feature map (fingerprint {arm.fingerprint[:12]}) "
                            f"does not encode the data as the data's does ({rows.fingerprint[:12]})")
        order = np.argsort(arm.keys, kind="stable")
        got = np.asarray(arm.keys)[order]
        if len(got) != len(keys) or not np.array_equal(got, keys):
            missing = np.setdiff1d(keys, got)
            extra = np.setdiff1d(got, keys)
            first = missing[0] if len(missing) else extra[0] if len(extra) else got[np.flatnonzero(got[1:] == got[:-1])[0]]
            raise DataError(f"arm '{arm.name}' scored {len(got)} rows, the data has {len(keys)}: {len(missing)} rows "
                            f"missing, {len(extra)} extra or repeated (first: shard {int(first) >> SHARD_BITS}, "
                            f"row {int(first) & ((1 << SHARD_BITS) - 1)}); every arm must score the same rows")
        out[i] = np.asarray(arm.scores, np.float64)[order]
    return out


def _metrics(scores: np.ndarray, positive: np.ndarray, task: str) -> dict[str, float]:
    s, y = torch.from_numpy(scores), torch.from_numpy(positive.astype(np.float64))
    if task == "ctr":
        m = compute_metrics(s, y)
        return {k: m[k] for k in ("auc", "logloss", "ne", "calibration", "count", "label_rate")}
    return {"auc": exact_auc(s, y), "ap": average_precision(s, y), "count": float(len(scores)),
            "anomaly_rate": float(positive.mean())}


def _curves(scores: np.ndarray, positive: np.ndarray, task: str, points: int = 200) -> dict[str, dict[str, list[float]]]:
    """ROC (at most ``points`` points) and, for CTR, a 10-bin calibration curve (mean predicted vs observed);
    for anomaly scores the precision-recall curve instead."""
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(positive[order])
    fp = np.cumsum(~positive[order])
    pick = np.unique(np.linspace(0, len(order) - 1, min(points, len(order))).astype(np.int64))
    out = {"roc": {"fpr": [0.0, *(fp[pick] / max(fp[-1], 1)).tolist()],
                   "tpr": [0.0, *(tp[pick] / max(tp[-1], 1)).tolist()]}}
    if task == "anomaly":  # precision-recall at the same thresholds, the anomaly as positive
        seen = np.arange(1, len(order) + 1)[pick]
        out["pr"] = {"recall": (tp[pick] / max(tp[-1], 1)).tolist(), "precision": (tp[pick] / seen).tolist()}
    if task == "ctr":
        prob = 1 / (1 + np.exp(-np.clip(scores, -50, 50)))
        edges = np.quantile(prob, np.linspace(0, 1, 11))
        bins = np.clip(np.searchsorted(edges, prob, "right") - 1, 0, 9)
        count = np.bincount(bins, minlength=10)
        keep = count > 0
        out["calibration"] = {"predicted": (np.bincount(bins, prob, 10)[keep] / count[keep]).tolist(),
                              "observed": (np.bincount(bins, positive, 10)[keep] / count[keep]).tolist()}
    return out


def _paired_normal(d: np.ndarray, level: float) -> SliceDelta:
    """Mean of paired per-row differences with a normal interval and two-sided p (nan with one row)."""
    z = NormalDist().inv_cdf(0.5 + level / 2)
    mean = float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    if not se > 0:
        return SliceDelta(mean, mean, mean, 1.0 if mean == 0 or math.isnan(se) else 0.0)
    return SliceDelta(mean, mean - z * se, mean + z * se, math.erfc(abs(mean) / se / math.sqrt(2)))


def _slice_row(name: str, value: str, mask: np.ndarray, scores: np.ndarray, positive: np.ndarray,
               names: list[str], control: int, level: float, task: str) -> SliceRow:
    y = positive[mask]
    s = scores[:, mask]
    metrics = {n: _metrics(s[a], y, task) for a, n in enumerate(names)}
    deltas: dict[str, dict[str, SliceDelta]] = {}
    both = 2 <= y.sum() <= len(y) - 2
    dl = delong(s, y) if both else None
    for t, tname in enumerate(names):
        if t == control:
            continue
        d: dict[str, SliceDelta] = {}
        if dl is not None:
            d["auc"] = SliceDelta(*dl.diff(t, control, level))
        if task == "ctr":
            x = np.clip(s, -36.7, 36.7)
            loss = np.logaddexp(0, x) - y * x
            d["logloss"] = _paired_normal(loss[t] - loss[control], level)
        deltas[tname] = d
    return SliceRow(name, value, int(mask.sum()), int(y.sum()), metrics, deltas)


def _slices(rows: EvalRows, scores: np.ndarray, positive: np.ndarray, names: list[str], control: int,
            level: float, task: str, slices: Sequence[str]) -> list[SliceRow]:
    out = []
    for feature, cls in rows.frequency.items():
        for code, label in enumerate(CLASSES):
            mask = cls == code
            if mask.any():
                out.append(_slice_row(f"freq:{feature}", label, mask, scores, positive, names, control, level, task))
    for column in slices:
        if column not in rows.columns:
            raise DataError(f"slice column '{column}' is not in the data (have: {', '.join(rows.columns) or 'none'})")
        values = np.asarray(rows.columns[column])
        uniq, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
        top = np.argsort(-counts, kind="stable")[:MAX_SLICE_VALUES]
        for u in top:
            out.append(_slice_row(column, str(uniq[u]), inverse.reshape(-1) == u, scores, positive, names,
                                  control, level, task))
        if len(uniq) > MAX_SLICE_VALUES:
            rest = ~np.isin(inverse.reshape(-1), top)
            out.append(_slice_row(column, "other", rest, scores, positive, names, control, level, task))
    return out


def _slice_holm(slices: list[SliceRow], alpha: float) -> int:
    """Holm's correction over every slice delta (one family, apart from the headline one): fills each
    delta's ``p_holm`` and ``verdict``; returns the family's size."""
    found = [d for s in slices for per in s.deltas.values() for d in per.values()]
    metric_of = [m for s in slices for per in s.deltas.values() for m in per]
    for d, m, ph in zip(found, metric_of, holm([d.p for d in found]), strict=True):
        d.p_holm = float(ph)
        d.verdict = _judge(m, d.delta, None, d.p_holm, alpha)
    return len(found)


def _judge(metric: str, delta: float, distance: float | None, p_holm: float, alpha: float) -> str:
    if not p_holm < alpha:
        return "indistinguishable"
    direction = DIRECTION[metric]
    signed = -distance if direction == 0 and distance is not None else delta * direction
    return "better" if signed > 0 else "worse"


def compare(
    arms: Sequence[ArmScores], control: str, rows: EvalRows, level: float = 0.95, slices: Sequence[str] = (),
    group: str | None = None, resamples: int = 1000, seed: int = 0, data: DataSummary | None = None,
) -> ABResult:
    """Compare every arm with ``control`` on ``rows`` (see the module docstring); returns an ``ABResult``.

    ``data`` (where the rows came from) is passed through to the result for the report.
    """
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise DataError(f"arm names must differ (got {', '.join(names)})")
    if control not in names:
        raise DataError(f"control '{control}' is not one of the arms ({', '.join(names)})")
    if len(arms) < 2:
        raise DataError("an A/B comparison needs a control and at least one treatment")
    tasks = {a.task for a in arms}
    if len(tasks) != 1:
        which = ", ".join(f"{a.name} ({a.task})" for a in arms)
        raise DataError(f"arms of different model families cannot be compared: {which}; compare CTR models "
                        "with CTR models and anomaly models with anomaly models")
    task = tasks.pop()
    c = names.index(control)
    scores = _align(arms, rows)
    positive = np.asarray(rows.labels).astype(bool)
    boot = paired_bootstrap(positive, scores, control=c, resamples=resamples, level=level, seed=seed, task=task)
    dl = delong(scores, positive)
    tests: list[tuple[str, str, float, float, float, float, float | None, str]] = []
    for i, t in enumerate(boot.treatments):
        for m in boot.metrics:
            p = dl.diff(t, c, level)[3] if m == "auc" else boot.p[i][m]
            test = "DeLong" if m == "auc" else "paired bootstrap"
            # calibration is judged, and reported, as the change in its distance to 1 (negative: closer)
            key = "calibration_distance" if m == "calibration" else m
            distance = boot.deltas[i][key] if m == "calibration" else None
            tests.append((names[t], m, boot.deltas[i][key], boot.low[i][key], boot.high[i][key], p, distance, test))
    if group is not None:
        if rows.group is None:
            raise DataError(f"--group {group}: the data has no such column")
        per_arm = [group_auc(scores[a], positive, rows.group) for a in range(len(arms))]
        reps = group_auc_bootstrap(per_arm, c, resamples=resamples, seed=seed)
        tail = (1 - level) / 2
        for t in boot.treatments:
            r = reps[t]
            p = float(min(1.0, 2 * min((np.sum(r <= 0) + 1), (np.sum(r >= 0) + 1)) / (len(r) + 1)))
            lo, hi = np.quantile(r, [tail, 1 - tail])
            tests.append((names[t], "gauc", per_arm[t].value - per_arm[c].value, float(lo), float(hi), p, None,
                          "group bootstrap"))
    adjusted = holm([t[5] for t in tests])
    verdicts = []
    for (tname, m, d, lo, hi, p, distance, test), ph in zip(tests, adjusted, strict=True):
        v = _judge(m, d, distance, float(ph), 1 - level)
        label = "calibration (|pred/obs - 1|)" if m == "calibration" else m
        text = (f"{tname} vs {control}: {label} {v} at {level:.0%} (Holm), by {d:+.4g} (CI {lo:+.4g}..{hi:+.4g}; "
                f"{test} p={p:.2g}, Holm p={ph:.2g})")
        verdicts.append(Verdict(tname, m, d, lo, hi, p, float(ph), v, test, text))
    summaries = []
    for a, arm in enumerate(arms):
        metrics = _metrics(scores[a], positive, task)
        if group is not None:
            metrics["gauc"] = per_arm[a].value
        summaries.append(ArmSummary(arm.name, arm.kind, arm.source, metrics, arm.embedding_bytes, arm.speed))
    slice_rows = _slices(rows, scores, positive, names, c, level, task, slices)
    return ABResult(
        control=control, level=level, task=task, rows=len(positive), resamples=resamples,
        bootstrap_seconds=round(boot.seconds, 3), arms=summaries, verdicts=verdicts, slices=slice_rows,
        curves={n: _curves(scores[a], positive, task) for a, n in enumerate(names)}, group=group,
        slice_tests=_slice_holm(slice_rows, 1 - level), data=data,
    )


__all__ = ["CLASSES", "ABResult", "ArmScores", "ArmSummary", "DataSummary", "EvalRows", "SliceDelta", "SliceRow",
           "Speed", "Verdict", "compare",
           "feature_map_fingerprint", "fit_problem", "frequency_classes", "row_classes", "row_key"]
