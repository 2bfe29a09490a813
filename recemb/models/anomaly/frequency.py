"""The per-entity frequency baseline every anomaly model must beat.

An event's score is the sum over its entity types of ``-log`` the add-one smoothed unigram
probability of its entity in the (count-weighted) training events: rare values make an
event anomalous, pairs do not matter. APE is worth its cost only where it beats this.

Example:
    >>> import numpy as np
    >>> train = np.array([[0, 1], [0, 1], [1, 0]]); test = np.array([[0, 1], [1, 1]])
    >>> s = frequency_scores(train, np.ones(3), [2, 2], test)
    >>> bool(s[1] > s[0])
    True
"""

from __future__ import annotations

import numpy as np


def type_counts(ids: np.ndarray, counts: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """Per entity type, the count-weighted occurrences of each id (``ids`` ``[N, F]``)."""
    return [np.bincount(ids[:, t], weights=counts, minlength=s) for t, s in enumerate(sizes)]


def frequency_scores(train: np.ndarray, counts: np.ndarray, sizes: list[int], test: np.ndarray) -> np.ndarray:
    """Anomaly scores of ``test`` events ``[M, F]``: ``sum_t -log((count_t(id) + 1) / (total_t + V_t))``."""
    score = np.zeros(len(test))
    for t, c in enumerate(type_counts(train, counts, sizes)):
        p = (c + 1.0) / (c.sum() + len(c))
        score -= np.log(p[test[:, t]])
    return score


__all__ = ["frequency_scores", "type_counts"]
