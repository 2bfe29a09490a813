"""Synthetic data with a known answer: Criteo-like CTR logs and categorical event logs.

Labels come from a planted model whose true click probability (or anomaly flag) is written
next to the data, so tests and benchmarks can compare any trained model to the oracle.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recemb.errors import ConfigError

GENERATOR_VERSION = 1

# Seed-sequence tags: every stream is keyed [seed, tag, a, b] (fixed length, so keys never alias).
_TAG_PLANTED, _TAG_EFFECTS, _TAG_PAIRS, _TAG_CALIB, _TAG_CHUNK = 1, 2, 3, 4, 5
_TAG_EV_STRUCT, _TAG_EV_TRAIN, _TAG_EV_TEST, _TAG_EV_ANOM = 11, 12, 13, 14
_CALIBRATION_ROWS = 100_000

# Two lowercase hex chars per byte value, packed as uint16 so one gather formats a whole byte.
_HEX_PAIRS = np.frombuffer(b"".join(f"{b:02x}".encode() for b in range(256)), dtype=np.uint16)


@dataclass
class CtrSynthConfig:
    """Shape and strength of the planted CTR model (defaults: Criteo-like, oracle AUC ~0.8).

    ``vocab_sizes`` empty means a geometric spread from 10 to 1e6 over ``num_sparse`` fields;
    ``vocab_scale`` multiplies every size (use e.g. 0.01 for tests). Only the
    ``signal_head_ids`` most frequent ids of a signal field carry an effect; the tail and
    the ``num_noise_fields`` noise fields carry none.
    """

    rows: int = 1_000_000
    num_dense: int = 13
    num_sparse: int = 26
    vocab_sizes: tuple[int, ...] = ()
    vocab_scale: float = 1.0
    zipf_exponent: float = 1.15
    num_noise_fields: int = 4
    signal_head_ids: int = 1000
    effect_std: float = 0.3
    num_interactions: int = 8
    interaction_rank: int = 4
    interaction_std: float = 0.4
    num_dense_signal: int = 2
    num_dense_correlated: int = 3
    dense_effect: float = 0.35
    dense_missing_rate: float = 0.07
    sparse_missing_fields: int = 6
    sparse_missing_rate: float = 0.05
    target_click_rate: float = 0.25
    chunk_rows: int = 200_000
    seed: int = 0

    def __post_init__(self) -> None:
        self.vocab_sizes = tuple(int(v) for v in self.vocab_sizes)
        if self.rows < 1 or self.chunk_rows < 1:
            raise ConfigError(f"rows ({self.rows}) and chunk_rows ({self.chunk_rows}) must be >= 1")
        if self.num_sparse < 1 or self.num_dense < 0:
            raise ConfigError("num_sparse must be >= 1 and num_dense >= 0")
        if self.vocab_sizes and len(self.vocab_sizes) != self.num_sparse:
            raise ConfigError(
                f"vocab_sizes has {len(self.vocab_sizes)} entries but num_sparse is {self.num_sparse}; "
                "give one size per sparse field or leave vocab_sizes empty"
            )
        if any(v < 1 for v in self.vocab_sizes) or self.vocab_scale <= 0:
            raise ConfigError("vocab sizes and vocab_scale must be positive")
        if not 0 <= self.num_noise_fields <= self.num_sparse:
            raise ConfigError(f"num_noise_fields must be in [0, {self.num_sparse}]")
        if not 0 <= self.sparse_missing_fields <= self.num_sparse:
            raise ConfigError(f"sparse_missing_fields must be in [0, {self.num_sparse}]")
        if self.num_dense_signal + self.num_dense_correlated > self.num_dense:
            raise ConfigError("num_dense_signal + num_dense_correlated must not exceed num_dense")
        if not 0.0 < self.target_click_rate < 1.0:
            raise ConfigError(f"target_click_rate must be in (0, 1), got {self.target_click_rate}")
        for name in ("dense_missing_rate", "sparse_missing_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1)")
        if self.zipf_exponent <= 0 or self.signal_head_ids < 0 or self.interaction_rank < 1:
            raise ConfigError("zipf_exponent must be > 0, signal_head_ids >= 0, interaction_rank >= 1")
        if self.num_interactions < 0:
            raise ConfigError("num_interactions must be >= 0")

    def resolved_vocab_sizes(self) -> list[int]:
        """Vocabulary size of each sparse field after the default spread and ``vocab_scale``.

        Example: ``CtrSynthConfig(vocab_scale=0.01).resolved_vocab_sizes()[:3]``.
        """
        if self.vocab_sizes:
            base = np.asarray(self.vocab_sizes, dtype=np.float64)
        else:
            spread = np.geomspace(10.0, 1e6, self.num_sparse) if self.num_sparse > 1 else np.array([1e3])
            # Interleave small and large fields (as in Criteo) with a fixed coprime stride.
            step = next(s for s in (7, 5, 3, 11, 13, 1) if math.gcd(s, self.num_sparse) == 1)
            base = spread[(np.arange(self.num_sparse) * step) % self.num_sparse]
        return [max(2, int(round(v * self.vocab_scale))) for v in base]


@dataclass
class EventSynthConfig:
    """Entity types and latent-group structure of the categorical event generator.

    The first entity type (users) is assigned to ``num_groups`` latent groups; each group uses
    ``values_per_group`` values of every other entity type, with Zipf preferences among them.
    Anomalies pair a user with a value outside its group's set for one or two entity types.
    """

    entity_types: tuple[str, ...] = ("user", "host", "process", "port", "action")
    cardinalities: tuple[int, ...] = (2000, 400, 200, 120, 8)
    num_groups: int = 20
    values_per_group: int = 6
    zipf_exponent: float = 1.2
    train_events: int = 100_000
    test_events: int = 20_000
    anomaly_rate: float = 0.07
    aggregate_counts: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self.entity_types = tuple(str(e) for e in self.entity_types)
        self.cardinalities = tuple(int(c) for c in self.cardinalities)
        if len(self.entity_types) != len(self.cardinalities) or len(self.entity_types) < 2:
            raise ConfigError("entity_types and cardinalities need the same length, at least 2")
        if len(set(self.entity_types)) != len(self.entity_types) or {"count", "label"} & set(
            self.entity_types
        ):
            raise ConfigError("entity_types must be distinct and must not be named 'count' or 'label'")
        if any(c < 1 for c in self.cardinalities):
            raise ConfigError("every cardinality must be >= 1")
        if self.num_groups < 1 or self.values_per_group < 1:
            raise ConfigError("num_groups and values_per_group must be >= 1")
        if self.train_events < 1 or self.test_events < 1:
            raise ConfigError("train_events and test_events must be >= 1")
        if not 0.0 <= self.anomaly_rate < 1.0:
            raise ConfigError(f"anomaly_rate must be in [0, 1), got {self.anomaly_rate}")
        if (
            not any(c > min(self.values_per_group, c) for c in self.cardinalities[1:])
            and self.anomaly_rate > 0
        ):
            raise ConfigError(
                "no entity type has more values than values_per_group: anomalies cannot be planted"
            )


@dataclass
class SynthReport:
    """What a generator wrote and how well the planted oracle does on it."""

    kind: str
    rows: int
    seconds: float
    files: list[str]
    label_rate: float
    oracle_auc: float | None = None
    oracle_logloss: float | None = None
    anomaly_rate: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict. Example: ``json.dumps(report.to_dict())``."""
        return asdict(self)


@dataclass
class PlantedCtrModel:
    """The planted CTR model: per-field effects of head ids, pair interactions, dense terms."""

    vocab_sizes: list[int]
    noise_fields: list[int]
    head_sizes: list[int]
    effects: list[np.ndarray]
    pairs: list[tuple[int, int]]
    pair_u: list[np.ndarray]
    pair_v: list[np.ndarray]
    dense_mu: np.ndarray
    dense_sigma: np.ndarray
    dense_rho: np.ndarray
    dense_beta: np.ndarray
    dense_missing: np.ndarray
    sparse_missing: np.ndarray
    bias: float = 0.0
    sparse_mean: float = 0.0
    sparse_std: float = 1.0


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _rng(seed: int, tag: int, a: int = 0, b: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, tag, a, b])


def _zipf_cdf(n: int, exponent: float) -> np.ndarray:
    """Cumulative Zipf weights over ranks 0..n-1 (rank 0 most frequent), last entry 1."""
    cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -exponent)
    return cdf / cdf[-1]


def _sample_cdf(rng: np.random.Generator, cdf: np.ndarray, n: int) -> np.ndarray:
    idx = np.searchsorted(cdf, rng.random(n), side="right")
    return np.minimum(idx, len(cdf) - 1).astype(np.int64)


def _mix32(x: np.ndarray) -> np.ndarray:
    """murmur3's finalizer: a bijection on uint32, so distinct ids never share a string."""
    x = x.astype(np.uint32, copy=True)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x85EBCA6B)
    x ^= x >> np.uint32(13)
    x *= np.uint32(0xC2B2AE35)
    x ^= x >> np.uint32(16)
    return x


def hex_ids(ids: np.ndarray, field_index: int) -> np.ndarray:
    """The 8-char lowercase hex token of each id of a sparse field, as an ``(n, 8)`` uint8 array.

    Example: ``bytes(hex_ids(np.array([0]), 0)[0]).decode()`` is the token of C1's top id.
    """
    salt = np.uint32((0x9E3779B9 * (field_index + 1)) & 0xFFFFFFFF)
    codes = _mix32(ids.astype(np.uint32) + salt)
    big_endian = codes.astype(">u4").view(np.uint8).reshape(-1, 4)
    return _HEX_PAIRS[big_endian].view(np.uint8).reshape(-1, 8)


def _string_column(chars: np.ndarray, missing: np.ndarray) -> pa.Array:
    """Arrow string column from fixed 8-byte tokens, with empty strings where ``missing``."""
    lengths = np.where(missing, 0, chars.shape[1]).astype(np.int32)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    data = np.ascontiguousarray(chars[~missing])
    return pa.StringArray.from_buffers(len(lengths), pa.py_buffer(offsets), pa.py_buffer(data))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC from mid-ranks (ties count one half); numpy only.

    Example: ``roc_auc(np.array([0.1, 0.9]), np.array([0, 1]))`` is ``1.0``.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(labels).ravel() > 0
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], sorted_scores.size]
    mid_ranks = (starts + ends + 1) / 2.0  # 1-based average rank of each tie group
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = np.repeat(mid_ranks, ends - starts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_logloss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log likelihood of 0/1 labels. Example: ``binary_logloss(p, y)``."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-15, 1.0 - 1e-15)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def _atomic_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _tmp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


# ---------------------------------------------------------------------------------------------
# CTR generator


def build_planted_model(cfg: CtrSynthConfig) -> PlantedCtrModel:
    """Draw the planted model of ``cfg`` (deterministic in ``cfg.seed``), bias calibrated.

    Example: ``m = build_planted_model(CtrSynthConfig(vocab_scale=0.01)); m.noise_fields``.
    """
    rng = _rng(cfg.seed, _TAG_PLANTED)
    vocab = cfg.resolved_vocab_sizes()
    n_sparse, n_dense = cfg.num_sparse, cfg.num_dense
    noise = sorted(int(f) for f in rng.choice(n_sparse, size=cfg.num_noise_fields, replace=False))
    signal = [f for f in range(n_sparse) if f not in set(noise)]
    head = [0 if f in noise else min(cfg.signal_head_ids, vocab[f]) for f in range(n_sparse)]
    strength = rng.uniform(0.4, 1.0, size=n_sparse)
    effects = [
        _rng(cfg.seed, _TAG_EFFECTS, f).normal(0.0, cfg.effect_std * strength[f], size=head[f])
        for f in range(n_sparse)
    ]

    all_pairs = [(a, b) for i, a in enumerate(signal) for b in signal[i + 1 :] if head[a] and head[b]]
    n_pairs = min(cfg.num_interactions, len(all_pairs))
    chosen = (
        sorted(int(i) for i in rng.choice(len(all_pairs), size=n_pairs, replace=False)) if n_pairs else []
    )
    pairs = [all_pairs[i] for i in chosen]
    entry_std = math.sqrt(cfg.interaction_std) * cfg.interaction_rank**-0.25
    pair_u, pair_v = [], []
    for k, (a, b) in enumerate(pairs):
        prng = _rng(cfg.seed, _TAG_PAIRS, k)
        pair_u.append(prng.normal(0.0, entry_std, size=(head[a], cfg.interaction_rank)))
        pair_v.append(prng.normal(0.0, entry_std, size=(head[b], cfg.interaction_rank)))

    # Dense j: log-normal count driven by latent n_j; the first ones enter the logit, the next
    # ones are correlated with the sparse part of the logit, the rest are noise.
    n_sig, n_cor = cfg.num_dense_signal, cfg.num_dense_correlated
    dense_rho = np.zeros(n_dense)
    dense_rho[n_sig : n_sig + n_cor] = rng.uniform(0.3, 0.7, size=n_cor)
    dense_beta = np.zeros(n_dense)
    dense_beta[:n_sig] = cfg.dense_effect * rng.choice([-1.0, 1.0], size=n_sig)
    missing_fields = rng.choice(n_sparse, size=cfg.sparse_missing_fields, replace=False)
    sparse_missing = np.zeros(n_sparse)
    sparse_missing[missing_fields] = cfg.sparse_missing_rate
    model = PlantedCtrModel(
        vocab_sizes=vocab,
        noise_fields=noise,
        head_sizes=head,
        effects=effects,
        pairs=pairs,
        pair_u=pair_u,
        pair_v=pair_v,
        dense_mu=rng.uniform(0.0, 4.0, size=n_dense),
        dense_sigma=rng.uniform(0.5, 1.5, size=n_dense),
        dense_rho=dense_rho,
        dense_beta=dense_beta,
        dense_missing=cfg.dense_missing_rate * rng.uniform(0.7, 1.3, size=n_dense),
        sparse_missing=sparse_missing,
    )
    _calibrate(cfg, model)
    return model


class _CtrSampler:
    """Draws chunks of rows from a planted model; holds one Zipf CDF per field."""

    def __init__(self, cfg: CtrSynthConfig, model: PlantedCtrModel) -> None:
        self.cfg, self.model = cfg, model
        self.cdfs = [_zipf_cdf(v, cfg.zipf_exponent) for v in model.vocab_sizes]
        self.effects = [np.r_[e, 0.0] for e in model.effects]
        self.pair_u = [np.vstack([u, np.zeros((1, u.shape[1]))]) for u in model.pair_u]
        self.pair_v = [np.vstack([v, np.zeros((1, v.shape[1]))]) for v in model.pair_v]

    def sparse(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ids (n, F), missing mask (n, F) and the sparse part of the logit (n,)."""
        m = self.model
        n_fields = len(self.cdfs)
        ids = np.empty((n, n_fields), dtype=np.int64)
        for f, cdf in enumerate(self.cdfs):
            ids[:, f] = _sample_cdf(rng, cdf, n)
        missing = rng.random((n, n_fields)) < m.sparse_missing
        # Tail and missing ids index the zero row appended to each table: a gather, no compaction.
        head = np.asarray(m.head_sizes)
        slot = np.where((ids < head) & ~missing, ids, head)
        logit = np.zeros(n)
        for f in range(n_fields):
            if m.head_sizes[f]:
                logit += self.effects[f][slot[:, f]]
        for (a, b), u, v in zip(m.pairs, self.pair_u, self.pair_v, strict=True):
            logit += np.einsum("ij,ij->i", u[slot[:, a]], v[slot[:, b]])
        return ids, missing, logit

    def dense(
        self, rng: np.random.Generator, n: int, zs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Counts (n, D), missing mask (n, D) and the dense part of the logit (n,)."""
        m = self.model
        eps = rng.standard_normal((n, len(m.dense_mu)))
        latent = m.dense_rho * zs[:, None] + np.sqrt(1.0 - m.dense_rho**2) * eps
        counts = np.floor(np.exp(m.dense_mu + m.dense_sigma * latent)).astype(np.int64)
        missing = rng.random(counts.shape) < m.dense_missing
        return counts, missing, latent @ m.dense_beta

    def chunk(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        ids, sparse_missing, sparse_logit = self.sparse(rng, n)
        zs = (sparse_logit - self.model.sparse_mean) / self.model.sparse_std
        counts, dense_missing, dense_logit = self.dense(rng, n, zs)
        p = 1.0 / (1.0 + np.exp(-(self.model.bias + sparse_logit + dense_logit)))
        label = (rng.random(n) < p).astype(np.int8)
        return {
            "ids": ids,
            "sparse_missing": sparse_missing,
            "sparse_logit": sparse_logit,
            "counts": counts,
            "dense_missing": dense_missing,
            "p": p,
            "label": label,
        }


def _calibrate(cfg: CtrSynthConfig, model: PlantedCtrModel) -> None:
    """Set the sparse-logit standardisation and the bias that hits ``target_click_rate``."""
    sampler = _CtrSampler(cfg, model)
    rng = _rng(cfg.seed, _TAG_CALIB)
    _, _, sparse_logit = sampler.sparse(rng, _CALIBRATION_ROWS)
    model.sparse_mean = float(sparse_logit.mean())
    model.sparse_std = float(sparse_logit.std()) or 1.0
    zs = (sparse_logit - model.sparse_mean) / model.sparse_std
    _, _, dense_logit = sampler.dense(rng, _CALIBRATION_ROWS, zs)
    x = sparse_logit + dense_logit
    lo, hi = -30.0, 30.0
    for _ in range(60):  # the mean click rate is increasing in the bias
        mid = (lo + hi) / 2.0
        if np.mean(1.0 / (1.0 + np.exp(-(mid + x)))) < cfg.target_click_rate:
            lo = mid
        else:
            hi = mid
    model.bias = (lo + hi) / 2.0


def iter_ctr_chunks(cfg: CtrSynthConfig, model: PlantedCtrModel | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The rows ``generate_ctr`` writes, as arrays, chunk by chunk in file order.

    Each chunk has ``ids`` (n, F) (id ranks, 0 most frequent), ``sparse_missing``,
    ``sparse_logit``, ``counts`` (n, D), ``dense_missing``, ``p`` (true click
    probability) and ``label``. For analyses that need the generator's latent state.

    Example: ``next(iter_ctr_chunks(CtrSynthConfig(rows=10, vocab_scale=0.01)))["p"]``.
    """
    model = model or build_planted_model(cfg)
    sampler = _CtrSampler(cfg, model)
    for index, row0 in enumerate(range(0, cfg.rows, cfg.chunk_rows)):
        yield sampler.chunk(_rng(cfg.seed, _TAG_CHUNK, index), min(cfg.chunk_rows, cfg.rows - row0))


def observable_oracle_p(model: PlantedCtrModel, chunk: dict[str, np.ndarray], grid: int = 24) -> np.ndarray:
    """``E[p | what a model sees]``: the click probability given the observed row only.

    The oracle ``p`` uses the dense latents, but the data carry ``floor(exp(.))``
    counts (or nothing, when missing). The signal latents are independent standard
    normals, so each is integrated over the interval its count leaves open
    (midpoint rule on ``grid`` quantiles per field). The sparse part is seen exactly.
    """
    import torch  # for the normal CDF and its inverse in float64 (numpy has neither)

    def ndtr(x: np.ndarray) -> np.ndarray:
        return torch.special.ndtr(torch.from_numpy(x)).numpy()

    def ndtri(x: np.ndarray) -> np.ndarray:
        return torch.special.ndtri(torch.from_numpy(x)).numpy()

    signal = np.flatnonzero(model.dense_beta)
    if np.any(model.dense_rho[signal]):
        raise ValueError("observable_oracle_p assumes the signal latents are uncorrelated with the ids")
    q = (np.arange(grid) + 0.5) / grid
    out = np.empty(len(chunk["sparse_logit"]))
    block = max(1, (1 << 22) // grid ** max(1, len(signal)))  # rows per block: ~32 MB of grid points
    for start in range(0, len(out), block):
        rows = slice(start, start + block)
        total = (model.bias + chunk["sparse_logit"][rows])[:, None]
        for j in signal:  # the product grid of each field's conditional quantiles
            c = chunk["counts"][rows, j].astype(np.float64)
            missing = chunk["dense_missing"][rows, j]
            lo = np.where(c > 0, (np.log(np.maximum(c, 1.0)) - model.dense_mu[j]) / model.dense_sigma[j], -np.inf)
            hi = (np.log(c + 1.0) - model.dense_mu[j]) / model.dense_sigma[j]
            a = np.where(missing, 0.0, ndtr(lo))
            b = np.where(missing, 1.0, ndtr(hi))
            u = np.clip(a[:, None] + (b - a)[:, None] * q[None, :], 1e-12, 1 - 1e-12)
            term = model.dense_beta[j] * ndtri(u)
            total = (total[:, :, None] + term[:, None, :]).reshape(total.shape[0], -1)
        out[rows] = (1.0 / (1.0 + np.exp(-total))).mean(axis=1)
    return out


def _ctr_table(chunk: dict[str, np.ndarray], with_p: bool) -> pa.Table:
    cols: dict[str, pa.Array] = {"label": pa.array(chunk["label"], type=pa.int8())}
    counts, dmiss = chunk["counts"], chunk["dense_missing"]
    for j in range(counts.shape[1]):
        cols[f"I{j + 1}"] = pa.array(counts[:, j], type=pa.int64(), mask=dmiss[:, j])
    ids, smiss = chunk["ids"], chunk["sparse_missing"]
    for f in range(ids.shape[1]):
        cols[f"C{f + 1}"] = _string_column(hex_ids(ids[:, f], f), smiss[:, f])
    if with_p:
        cols["_p"] = pa.array(chunk["p"], type=pa.float64())
    return pa.table(cols)


def generate_ctr(cfg: CtrSynthConfig, out_path: str | os.PathLike[str], fmt: str = "tsv") -> SynthReport:
    """Write ``cfg.rows`` Criteo-like rows to ``out_path`` plus ``<out_path>.json`` (oracle metrics).

    TSV is exactly Criteo's layout (label, I1..I13, C1..C26; no header) with the true click
    probability in ``<out_path>.oracle.parquet`` (column ``p``); Parquet carries it as ``_p``.
    Rows are drawn in chunks of ``cfg.chunk_rows``, so memory stays bounded and the bytes
    depend only on the config.

    Example::

        report = generate_ctr(CtrSynthConfig(rows=20_000, vocab_scale=0.01), "train.tsv")
        print(report.oracle_auc)
    """
    if fmt not in ("tsv", "parquet"):
        raise ConfigError(f"unknown format {fmt!r}: use 'tsv' or 'parquet'")
    start = time.perf_counter()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = build_planted_model(cfg)
    tmp = _tmp_for(out)
    probs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    writer: pacsv.CSVWriter | pq.ParquetWriter | None = None
    try:
        for chunk in iter_ctr_chunks(cfg, model):
            table = _ctr_table(chunk, with_p=fmt == "parquet")
            if writer is None:
                if fmt == "tsv":
                    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
                    writer = pacsv.CSVWriter(str(tmp), table.schema, write_options=options)
                else:
                    writer = pq.ParquetWriter(str(tmp), table.schema)
            writer.write_table(table)
            probs.append(chunk["p"])
            labels.append(chunk["label"])
        assert writer is not None
        writer.close()
        writer = None
        os.replace(tmp, out)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)

    p, y = np.concatenate(probs), np.concatenate(labels)
    files = [str(out)]
    if fmt == "tsv":
        oracle = Path(f"{out}.oracle.parquet")
        tmp_oracle = _tmp_for(oracle)
        pq.write_table(pa.table({"p": pa.array(p, type=pa.float64())}), str(tmp_oracle))
        os.replace(tmp_oracle, oracle)
        files.append(str(oracle))
    names = [f"C{f + 1}" for f in range(cfg.num_sparse)]
    details: dict[str, Any] = {
        "format": fmt,
        "vocab_sizes": dict(zip(names, model.vocab_sizes, strict=True)),
        "noise_fields": [names[f] for f in model.noise_fields],
        "signal_head_ids": dict(zip(names, model.head_sizes, strict=True)),
        "interactions": [[names[a], names[b]] for a, b in model.pairs],
        "signal_dense": [f"I{j + 1}" for j in np.flatnonzero(model.dense_beta)],
        "correlated_dense": [f"I{j + 1}" for j in np.flatnonzero(model.dense_rho)],
        "sparse_missing_fields": [names[f] for f in np.flatnonzero(model.sparse_missing)],
        "bias": model.bias,
        "mean_p": float(p.mean()),
    }
    report = SynthReport(
        kind="ctr",
        rows=int(y.size),
        seconds=0.0,
        files=files,
        label_rate=float(y.mean()),
        oracle_auc=roc_auc(p, y),
        oracle_logloss=binary_logloss(p, y),
        details=details,
    )
    meta = Path(f"{out}.json")
    files.append(str(meta))
    payload = report.to_dict()
    payload.pop("seconds")  # keeps the manifest a pure function of the config
    payload["files"] = [Path(f).name for f in files]  # relocatable: names next to the manifest
    payload.update(
        generator="recemb.data.synthetic.generate_ctr", version=GENERATOR_VERSION, config=asdict(cfg)
    )
    _atomic_json(meta, payload)
    report.seconds = time.perf_counter() - start
    return report


# ---------------------------------------------------------------------------------------------
# Categorical event generator


@dataclass
class _EventStructure:
    user_group: np.ndarray
    user_cdf: np.ndarray
    group_values: list[np.ndarray]  # per other entity type: (num_groups, k) value ids, Zipf order
    value_cdfs: list[np.ndarray]
    user_order: np.ndarray  # activity rank -> user id


def _event_structure(cfg: EventSynthConfig) -> _EventStructure:
    rng = _rng(cfg.seed, _TAG_EV_STRUCT)
    n_users = cfg.cardinalities[0]
    user_group = rng.integers(0, cfg.num_groups, size=n_users)
    group_values, value_cdfs = [], []
    for card in cfg.cardinalities[1:]:
        k = min(cfg.values_per_group, card)
        group_values.append(
            np.stack([rng.choice(card, size=k, replace=False) for _ in range(cfg.num_groups)])
        )
        value_cdfs.append(_zipf_cdf(k, cfg.zipf_exponent))
    # User activity is Zipf over a random order of users.
    user_cdf = _zipf_cdf(n_users, cfg.zipf_exponent)
    return _EventStructure(user_group, user_cdf, group_values, value_cdfs, rng.permutation(n_users))


def _normal_events(rng: np.random.Generator, n: int, st: _EventStructure) -> np.ndarray:
    users = st.user_order[_sample_cdf(rng, st.user_cdf, n)]
    groups = st.user_group[users]
    cols = [users]
    for values, cdf in zip(st.group_values, st.value_cdfs, strict=True):
        cols.append(values[groups, _sample_cdf(rng, cdf, n)])
    return np.stack(cols, axis=1)


def _anomalous_events(
    rng: np.random.Generator, n: int, st: _EventStructure, cfg: EventSynthConfig
) -> np.ndarray:
    """Normal events with one or two entities swapped for values outside the user's group set."""
    events = _normal_events(rng, n, st)
    groups = st.user_group[events[:, 0]]
    breakable = [e for e, card in enumerate(cfg.cardinalities[1:]) if card > st.group_values[e].shape[1]]
    for i in range(n):
        n_broken = 1 if len(breakable) == 1 or rng.random() < 0.7 else 2
        for e in rng.choice(breakable, size=n_broken, replace=False):
            own = st.group_values[e][groups[i]]
            while True:  # rejection: the group set is a small part of the cardinality
                value = int(rng.integers(0, cfg.cardinalities[e + 1]))
                if value not in own:
                    break
            events[i, e + 1] = value
    return events


def _aggregate(
    events: np.ndarray, aggregate: bool, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    if aggregate:
        rows, counts = np.unique(events, axis=0, return_counts=True)
    else:
        rows, counts = events, np.ones(len(events), dtype=np.int64)
    order = rng.permutation(len(rows))
    return rows[order], counts[order].astype(np.int64)


def _event_table(
    cfg: EventSynthConfig, rows: np.ndarray, counts: np.ndarray, labels: np.ndarray | None
) -> pa.Table:
    cols: dict[str, Any] = {}
    for e, name in enumerate(cfg.entity_types):
        cols[name] = pa.array(np.char.add(f"{name}_", rows[:, e].astype(str)).tolist(), type=pa.string())
    cols["count"] = pa.array(counts, type=pa.int64())
    if labels is not None:
        cols["label"] = pa.array(labels, type=pa.int64())
    return pa.table(cols)


def _write_csv(table: pa.Table, path: Path) -> None:
    tmp = _tmp_for(path)
    pacsv.write_csv(
        table, str(tmp), write_options=pacsv.WriteOptions(quoting_style="none", quoting_header="none")
    )
    os.replace(tmp, path)


def generate_events(cfg: EventSynthConfig, out_dir: str | os.PathLike[str]) -> SynthReport:
    """Write ``train.csv``, ``test.csv`` and ``synth.json`` of categorical events into ``out_dir``.

    Train holds normal events only; test holds normal rows (label 1) and injected anomalies
    (label -1, about ``cfg.anomaly_rate`` of the test rows) whose entity combination breaks the
    planted user-group structure. Values are strings like ``host_17``; ``count`` is the number
    of identical events aggregated into the row.

    Example::

        report = generate_events(EventSynthConfig(train_events=5_000), "data/events")
        print(report.anomaly_rate)
    """
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    structure = _event_structure(cfg)

    train_rows, train_counts = _aggregate(
        _normal_events(_rng(cfg.seed, _TAG_EV_TRAIN), cfg.train_events, structure),
        cfg.aggregate_counts,
        _rng(cfg.seed, _TAG_EV_TRAIN, 1),
    )
    test_rng = _rng(cfg.seed, _TAG_EV_TEST)
    normal_rows, normal_counts = _aggregate(
        _normal_events(test_rng, cfg.test_events, structure), cfg.aggregate_counts, test_rng
    )
    # Anomalies are sized against the test rows (after aggregation) so the row rate matches the config.
    n_anom = int(round(cfg.anomaly_rate / (1.0 - cfg.anomaly_rate) * len(normal_rows)))
    anom_rng = _rng(cfg.seed, _TAG_EV_ANOM)
    anom_rows, anom_counts = _aggregate(
        _anomalous_events(anom_rng, n_anom, structure, cfg), cfg.aggregate_counts, anom_rng
    )
    test_rows = np.concatenate([normal_rows, anom_rows]) if n_anom else normal_rows
    test_counts = np.concatenate([normal_counts, anom_counts]) if n_anom else normal_counts
    test_labels = np.r_[np.ones(len(normal_rows), np.int64), -np.ones(len(anom_rows), np.int64)]
    order = test_rng.permutation(len(test_rows))
    test_rows, test_counts, test_labels = test_rows[order], test_counts[order], test_labels[order]

    train_path, test_path, meta_path = out / "train.csv", out / "test.csv", out / "synth.json"
    _write_csv(_event_table(cfg, train_rows, train_counts, None), train_path)
    _write_csv(_event_table(cfg, test_rows, test_counts, test_labels), test_path)
    anomaly_rate = float(np.mean(test_labels == -1))
    report = SynthReport(
        kind="events",
        rows=int(len(train_rows)),
        seconds=0.0,
        files=[str(train_path), str(test_path), str(meta_path)],
        label_rate=float(np.mean(test_labels == 1)),
        anomaly_rate=anomaly_rate,
        details={
            "train_rows": int(len(train_rows)),
            "train_events": int(train_counts.sum()),
            "test_rows": int(len(test_rows)),
            "test_events": int(test_counts.sum()),
            "test_anomalies": int(len(anom_rows)),
            "columns": [*cfg.entity_types, "count"],
        },
    )
    payload = report.to_dict()
    payload.pop("seconds")
    payload["files"] = [Path(f).name for f in report.files]
    payload.update(
        generator="recemb.data.synthetic.generate_events", version=GENERATOR_VERSION, config=asdict(cfg)
    )
    _atomic_json(meta_path, payload)
    report.seconds = time.perf_counter() - start
    return report
