"""Unigram noise for APE's noise-contrastive training: one distribution per entity type.

Type ``t``'s noise distribution is ``P_t(id) ∝ count_t(id) ** exponent`` over the training
counts of its ids (``FeatureMap.id_counts``: preparation counts every event ``count`` times,
so aggregated events weigh as the events they stand for). ``exponent`` 1 is the paper's
plain unigram; below 1 flattens it towards rare ids (word2vec's 0.75). Ids without a count
(the OOV id, rare values folded into it) are never drawn; in ``log_prob`` they count as
half an occurrence, so the NCE correction ``log(k·P)`` of an observed unseen entity stays
finite.

Draws are by inverse CDF over the types' CDFs laid end to end (type ``t``'s cumulative
probabilities shifted by ``t``): one ``searchsorted`` draws ids of mixed types in one call,
exactly from each ``P_t``, on any device.

Example:
    >>> import numpy as np, torch
    >>> noise = UnigramNoise([np.array([0, 3, 1]), np.array([0, 0, 5, 5])])
    >>> noise.probabilities(0).tolist()
    [0.0, 0.75, 0.25]
    >>> ids = noise.sample(torch.tensor([0, 1]), k=4, generator=torch.Generator().manual_seed(0))
    >>> ids.shape, bool((ids[0] > 0).all()), bool((ids[1] >= 2).all())
    (torch.Size([2, 4]), True, True)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# An id without training count enters log P as this many occurrences (before the exponent).
UNSEEN_COUNT = 0.5


class UnigramNoise(nn.Module):
    """Per-type unigram distributions (``counts[t][id]``) with draws and log-probabilities.

    The tables are non-persistent buffers made from the counts (kept as numpy) and refilled
    by ``reset_buffers``: a model built on the meta device and sharded by
    ``DistributedModelParallel`` gets them back, and checkpoints do not carry them.
    """

    def __init__(self, counts: list[np.ndarray], exponent: float = 1.0, device: torch.device | None = None) -> None:
        super().__init__()
        if not counts:
            raise ValueError("noise needs at least one entity type")
        if not exponent > 0:
            raise ValueError(f"noise exponent must be > 0, got {exponent}")
        self.exponent = exponent
        self.sizes = [len(c) for c in counts]
        cdf, log_prob = [], []
        for t, raw in enumerate(counts):
            c = np.asarray(raw, dtype=np.float64)
            if c.ndim != 1 or not len(c) or (c < 0).any() or not np.isfinite(c).all():
                raise ValueError(f"noise counts of type {t} must be a non-empty 1-d array of counts >= 0")
            if not c.sum() > 0:
                raise ValueError(f"noise counts of type {t} are all zero: no id to draw")
            mass = c ** exponent
            total = mass.sum()
            cum = np.cumsum(mass) / total
            cum[-1] = 1.0
            cdf.append(cum + t)
            log_prob.append(np.log(np.where(c > 0, mass, UNSEEN_COUNT ** exponent) / total))
        offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self._sources = {
            "cdf": np.concatenate(cdf),
            "log_probs": np.concatenate(log_prob).astype(np.float32),
            "offsets": offsets,
            "size": np.asarray(self.sizes, dtype=np.int64),
        }
        for name, source in self._sources.items():
            self.register_buffer(name, torch.empty(source.shape, dtype=torch.from_numpy(source[:0]).dtype,
                                                   device=device), persistent=False)
        if device is None or device.type != "meta":
            self.reset_buffers()

    def reset_buffers(self) -> None:
        """Refill the tables from the counts (after a meta-device build)."""
        for name, source in self._sources.items():
            buffer = getattr(self, name)
            if buffer.device.type != "meta":
                buffer.copy_(torch.from_numpy(source))

    @property
    def num_types(self) -> int:
        """Number of entity types."""
        return len(self.sizes)

    def probabilities(self, t: int) -> np.ndarray:
        """Type ``t``'s noise distribution (float64, sums to 1)."""
        start = int(self._sources["offsets"][t])
        cum = self._sources["cdf"][start:start + self.sizes[t]] - t
        return np.diff(cum, prepend=0.0)

    def sample(self, types: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``k`` ids drawn from ``P_t`` for each entry ``t`` of ``types``: shape ``[*types.shape, k]``."""
        types = types.to(self.cdf.device, torch.int64)
        u = torch.rand((*types.shape, k), dtype=torch.float64, device=self.cdf.device, generator=generator)
        target = types.unsqueeze(-1).to(torch.float64) + u
        index = torch.searchsorted(self.cdf, target.reshape(-1), right=True).reshape(target.shape)
        local = index - self.offsets[types].unsqueeze(-1)
        return torch.minimum(local, (self.size[types] - 1).unsqueeze(-1))

    def log_prob(self, types: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``log P_t(id)`` (float32) for ``types`` broadcast against ``ids``."""
        types = types.to(self.offsets.device, torch.int64)
        while types.dim() < ids.dim():
            types = types.unsqueeze(-1)
        return self.log_probs[self.offsets[types] + ids.to(torch.int64)]
