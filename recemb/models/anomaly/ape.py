"""APE (Chen et al., IJCAI 2016): anomaly detection over heterogeneous categorical events.

An event is one entity of each type (user, host, port, ...). Entities share one latent
space through our embedding layer (any variant; tables shard through torchrec), and an
event scores ``S(e) = sum_{i<j} w_ij <v_{a_i}, v_{a_j}>`` with non-negative type-pair
weights ``w_ij = softplus(r_ij)``. Training is noise-contrastive estimation with
context-dependent noise: for each observed event one entity type ``t`` is picked
uniformly and its entity replaced by ``k`` draws from type ``t``'s unigram distribution
(``UnigramNoise``); the logistic loss is taken on ``S(e) - log(k P_t(a_t))`` for the
observed event (label 1) and on ``S(e') - log(k P_t(a'_t))`` for each noise event (label 0).
The anomaly score is ``-S(e)``.

All noise events of a batch are scored from one lookup: the observed entities and every
replacing entity go into one ``KeyedJaggedTensor`` (each noise id is a bag of its own
type's key, keys padded to one stride), and a noise event's score is its observed event's score with the replaced
entity's pair terms swapped: ``S(e') = S(e) - <v_t, c_t> + <u, c_t>``, ``c_t = sum_j w_tj v_j``.

Example:
    >>> model = build_model(ModelConfig(name="ape"), fm, EmbeddingConfig(dim=16))  # doctest: +SKIP
    >>> out = model(batch); loss = model.loss(batch, out)                           # doctest: +SKIP
    >>> model.anomaly_scores(batch).shape                                           # doctest: +SKIP
    torch.Size([4096])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recemb.data.batch import Batch
from recemb.embeddings.base import EmbeddingLayer
from recemb.errors import DataError
from recemb.eval.metrics import ANOMALY_METRICS, AnomalyLabels, anomaly_metrics
from recemb.models.anomaly.noise import UnigramNoise

# What APE.metrics returns that train.monitor may weight.
APE_METRICS = (*ANOMALY_METRICS, "nce_loss")


@dataclass
class APEParams:
    """APE's settings (``model.params``).

    ``noise_samples``: ``k`` noise events per replaced type. ``noise_exponent``: the unigram
    counts are raised to it (1 = the paper). ``pair_weight_init``: every ``w_ij`` at start.
    Beyond the paper, both off by default: ``noise_types`` replaces that many distinct types
    per event (each with its own ``k`` draws and its own NCE term; 1 = the paper), ``unary``
    adds a learned scalar per entity to ``S(e)`` (for data where rare values alone are the
    anomaly). ``top_k``: the ``k`` of precision@k and recall@k. ``normal_label`` and
    ``anomaly_label``: the labels' convention (event data: 1 normal, -1 anomaly); a split
    whose labels are all 0 has none (the prepared training data of events) and reports only
    ``nce_loss`` and ``unseen_share``.
    """

    noise_samples: int = 5
    noise_exponent: float = 1.0
    pair_weight_init: float = 1.0
    noise_types: int = 1
    unary: bool = False
    top_k: int = 100
    normal_label: float = 1.0
    anomaly_label: float = -1.0

    def __post_init__(self) -> None:
        if self.noise_samples < 1 or self.noise_types < 1 or self.top_k < 1:
            raise ValueError("noise_samples, noise_types and top_k must be >= 1")
        if not (self.noise_exponent > 0 and self.pair_weight_init > 0):
            raise ValueError("noise_exponent and pair_weight_init must be > 0")
        if self.normal_label == self.anomaly_label or 0.0 in (self.normal_label, self.anomaly_label):
            raise ValueError("normal_label and anomaly_label must differ and not be 0 (0 marks unlabelled rows)")

    @property
    def labels(self) -> AnomalyLabels:
        """The label convention."""
        return AnomalyLabels(normal=self.normal_label, anomaly=self.anomaly_label)


@dataclass
class APEOutput:
    """One forward pass: observed scores and the noise events drawn for them.

    ``score`` ``[B]`` is ``S(e)``; ``types`` ``[B, m]`` the replaced types; ``noise_score``
    ``[B, m, k]``; ``log_kp_observed`` ``[B, m]`` and ``log_kp_noise`` ``[B, m, k]`` are
    ``log(k P_t(entity))``; ``unseen`` ``[B]`` marks events with an entity at its type's OOV id.
    """

    score: torch.Tensor
    types: torch.Tensor
    noise_score: torch.Tensor
    log_kp_observed: torch.Tensor
    log_kp_noise: torch.Tensor
    unseen: torch.Tensor

    def nce_losses(self) -> torch.Tensor:
        """Per-event NCE loss ``[B]``: over its replaced types, the mean of
        ``-log σ(S(e) - log kP) - sum_k log σ(-(S(e') - log kP'))``."""
        positive = self.score.unsqueeze(1) - self.log_kp_observed
        negative = self.noise_score - self.log_kp_noise
        return (F.softplus(-positive) + F.softplus(negative).sum(-1)).mean(-1)


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class APE(nn.Module):
    """``S(e) = sum_{i<j} w_ij <v_i, v_j>`` (+ unary terms), trained by NCE with context-dependent noise.

    ``embedding`` gives every feature (entity type) one ``dim``-wide vector; ``unary`` (or
    ``None``) a 4-wide layer whose columns sum to one scalar per entity; ``noise`` the
    per-type unigram noise over the same features in the same order; ``oov_ids`` each
    type's OOV id.

    Example:
        >>> model = APE(embedding, None, noise, oov_ids=[0] * 3, params=APEParams())  # doctest: +SKIP
        >>> model.pair_weights().shape                                                # doctest: +SKIP
        torch.Size([3, 3])
    """

    def __init__(self, embedding: EmbeddingLayer, unary: EmbeddingLayer | None, noise: UnigramNoise,
                 oov_ids: list[int], params: APEParams) -> None:
        super().__init__()
        self.params = params
        self.embedding = embedding
        self.unary = unary
        self.noise = noise
        self.features = list(embedding.features)
        self.oov_ids = list(oov_ids)
        n = len(self.features)
        if n < 2 or noise.num_types != n or len(self.oov_ids) != n:
            raise ValueError(f"APE needs >= 2 entity types with one noise distribution and OOV id each, got "
                             f"{n} types, {noise.num_types} distributions, {len(self.oov_ids)} OOV ids")
        if params.noise_types > n:
            raise ValueError(f"noise_types={params.noise_types} but events have only {n} entity types")
        self.pair_raw = nn.Parameter(torch.empty(n * (n - 1) // 2))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every pair weight back to ``pair_weight_init``."""
        nn.init.constant_(self.pair_raw, _softplus_inverse(self.params.pair_weight_init))

    def pair_weights(self) -> torch.Tensor:
        """Symmetric ``[F, F]`` matrix of ``w_ij = softplus(r_ij) >= 0``, zero diagonal."""
        n = len(self.features)
        rows, cols = torch.triu_indices(n, n, 1, device=self.pair_raw.device)
        upper = torch.zeros(n, n, dtype=self.pair_raw.dtype, device=self.pair_raw.device)
        upper = upper.index_put((rows, cols), F.softplus(self.pair_raw))
        return upper + upper.T

    def _observed(self, batch: Batch) -> torch.Tensor:
        """Entity ids ``[B, F]``; each event must hold exactly one entity of each type."""
        kjt = batch.sparse
        n, b = len(self.features), batch.batch_size
        if kjt.keys() != self.features:
            raise DataError(f"APE expects entity types {self.features}, the batch has {kjt.keys()}")
        values = kjt.values()
        if values.numel() != n * b or not bool((kjt.lengths() == 1).all()):
            raise DataError("APE needs exactly one entity of each type per event (no missing or multi-valued "
                            "entity types)")
        return values.view(n, b).T.to(torch.int64)

    def _lookup(self, observed: torch.Tensor, types: torch.Tensor, noise: torch.Tensor) -> tuple[
            torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """One lookup of the observed entities ``[B, F]`` and the noise ids ``[N]`` of types ``[N]``.

        Key ``t`` holds the ``B`` observed bags, then one bag per noise id of type ``t``, then
        empty bags up to one stride ``S = B + max_t n_t`` for all keys (a KJT has one stride):
        ``F * S`` bags rather than ``F * (B + N)``, which is what a CPU lookup's cost follows.
        Returns vectors ``[S, F, d]``, with unary terms scalars ``[S, F]``, and per noise id
        its row in them (its column is its type).
        """
        b, n = observed.shape
        device = observed.device
        total = noise.numel()
        per_type = torch.bincount(types, minlength=n)
        stride = b + int(per_type.max())
        order = torch.argsort(types, stable=True)
        before = torch.cumsum(per_type, 0) - per_type  # noise ids of earlier types
        rank = torch.empty_like(order)
        rank[order] = torch.arange(total, device=device) - before[types[order]]  # place within its type
        rows = b + rank
        key_start = torch.arange(n, device=device) * b + before
        values = torch.empty(n * b + total, dtype=torch.int64, device=device)
        values[(key_start.unsqueeze(1) + torch.arange(b, device=device)).reshape(-1)] = observed.T.reshape(-1)
        values[key_start[types] + b + rank] = noise
        lengths = torch.zeros(n, stride, dtype=torch.int64, device=device)
        lengths[:, :b] = 1
        lengths[types, rows] = 1
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=self.features, values=values, lengths=lengths.reshape(-1))
        vectors = self.embedding.stack(self.embedding(kjt))
        scalars = None
        if self.unary is not None:
            pooled = self.unary(kjt).values()
            scalars = pooled.view(pooled.shape[0], n, -1).sum(-1)
        return vectors, scalars, rows

    def _generator(self, observed: torch.Tensor) -> torch.Generator | None:
        """Training draws from torch's global RNG; evaluation from a generator seeded by the
        batch's ids, so a validation loss is the same at every evaluation and on any rank layout."""
        if self.training:
            return None
        gen = torch.Generator(device=observed.device)
        gen.manual_seed(int(observed.sum()) * 1_000_003 + observed.shape[0])
        return gen

    def forward(self, batch: Batch) -> APEOutput:
        observed = self._observed(batch)
        b, n = observed.shape
        m, k = self.params.noise_types, self.params.noise_samples
        gen = self._generator(observed)
        device = observed.device
        if m == 1:
            types = torch.randint(n, (b, 1), device=device, generator=gen)
        else:
            types = torch.rand(b, n, device=device, generator=gen).argsort(dim=1)[:, :m]
        noise = self.noise.sample(types, k, generator=gen)  # [B, m, k]
        flat_types = types.unsqueeze(-1).expand(b, m, k).reshape(-1)
        vectors, scalars, noise_rows = self._lookup(observed, flat_types, noise.reshape(-1))
        v = vectors[:b]
        context = torch.einsum("ij,bjd->bid", self.pair_weights(), v)  # c_i = sum_j w_ij v_j
        score = 0.5 * (v * context).sum((1, 2))
        rows = torch.arange(b, device=device).unsqueeze(1)
        c_t = context[rows, types]  # [B, m, d]
        swapped_out = score.unsqueeze(1) - (v[rows, types] * c_t).sum(-1)  # S(e) without type t's pair terms
        u = vectors[noise_rows, flat_types].view(b, m, k, -1)
        noise_score = swapped_out.unsqueeze(-1) + torch.einsum("bmkd,bmd->bmk", u, c_t)
        if scalars is not None:
            own = scalars[:b]
            score = score + own.sum(1)
            noise_score = (noise_score + own.sum(1).view(b, 1, 1) - own[rows, types].unsqueeze(-1)
                           + scalars[noise_rows, flat_types].view(b, m, k))
        log_k = math.log(k)
        observed_t = observed[rows, types]
        oov = torch.tensor(self.oov_ids, dtype=torch.int64, device=device)
        return APEOutput(
            score=score, types=types, noise_score=noise_score,
            log_kp_observed=log_k + self.noise.log_prob(types, observed_t),
            log_kp_noise=log_k + self.noise.log_prob(types, noise),
            unseen=(observed == oov).any(1),
        )

    def loss(self, batch: Batch, output: APEOutput) -> torch.Tensor:
        """Mean NCE loss per observed event, weighted by the events' ``count`` when the data has one."""
        losses = output.nce_losses()
        if batch.weights is None:
            return losses.mean()
        return (losses * batch.weights).sum() / batch.weights.sum()

    def eval_rows(self, batch: Batch, output: APEOutput) -> torch.Tensor:
        """``[B, 3]``: anomaly score ``-S(e)``, unseen-entity flag, NCE loss of the event."""
        return torch.stack([-output.score, output.unseen.to(output.score.dtype), output.nce_losses()], 1).detach()

    def metrics(self, rows: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Anomaly metrics of ``-S(e)`` (anomaly positive), ``nce_loss`` and ``unseen_share``.

        Rows whose labels are all 0 (a split without labels) get ``nan`` for the anomaly metrics.
        """
        rows = rows.reshape(labels.numel(), -1).to(torch.float64)
        if rows.shape[0] and bool((labels == 0).all()):
            out = dict.fromkeys(ANOMALY_METRICS, math.nan) | {"count": float(rows.shape[0])}
        else:
            out = anomaly_metrics(rows[:, 0], labels, self.params.labels, k=self.params.top_k)
        out["nce_loss"] = float(rows[:, 2].mean())
        out["unseen_share"] = float(rows[:, 1].mean())
        return out

    def scores(self, batch: Batch) -> torch.Tensor:
        """``S(e)`` of each event ``[B]`` from one plain lookup (no noise)."""
        v = self.embedding.stack(self.embedding(batch.sparse))
        score = 0.5 * (v * torch.einsum("ij,bjd->bid", self.pair_weights(), v)).sum((1, 2))
        if self.unary is not None:
            pooled = self.unary(batch.sparse).values()
            score = score + pooled.sum(1)
        return score

    def anomaly_scores(self, batch: Batch) -> torch.Tensor:
        """The anomaly score ``-S(e)`` of each event ``[B]`` (higher = more anomalous)."""
        return -self.scores(batch)

    def predict(self, batch: Batch) -> torch.Tensor:
        """What APE serves per event: the anomaly score ``-S(e)`` (``anomaly_scores``)."""
        return self.anomaly_scores(batch)

    def explain(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Per event, why it scores as it does: ``top_pair_a``/``top_pair_b`` (feature indices)
        and ``top_pair_term`` from ``top_pairs`` (what ``recemb score`` writes next to the score)."""
        pairs, terms = self.top_pairs(batch)
        return {"top_pair_a": pairs[:, 0], "top_pair_b": pairs[:, 1], "top_pair_term": terms}

    def top_pairs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per event, the type pair ``(i, j)``, ``i < j``, whose term ``w_ij <v_i, v_j>`` adds most to
        ``-S(e)`` (the smallest term): why the event looks anomalous.

        Returns ``pairs`` ``[B, 2]`` (feature indices into ``self.features``) and the terms ``[B]``.
        """
        v = self.embedding.stack(self.embedding(batch.sparse))
        n = len(self.features)
        terms = self.pair_weights() * torch.einsum("bid,bjd->bij", v, v)
        rows, cols = torch.triu_indices(n, n, 1, device=v.device)
        upper = terms[:, rows, cols]
        value, best = upper.min(dim=1)
        return torch.stack([rows[best], cols[best]], 1), value
