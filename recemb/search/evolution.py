"""Evolutionary search over one choice per field (OptEmbed's dimension search), as plain functions.

A candidate is a tuple with one value per field, each from that field's choices.
Every generation keeps the ``parents`` fittest candidates and fills the population
with children from crossover (each field from either parent) and mutation (each
field redrawn with probability ``mutation_prob``). Fitness values are cached per
candidate (the supernet is frozen, so re-scoring a candidate gives the same value).
All randomness comes from one ``random.Random(seed)``: same seed, same search.

Example:
    >>> settings = EvolutionSettings(population=8, generations=10, mutation_prob=0.5)
    >>> evolve([[4, 8]] * 3, lambda c: -sum(c), settings).best
    (4, 4, 4)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from recemb.errors import ConfigError

Candidate = tuple[int, ...]
_RETRIES = 10


@dataclass
class EvolutionSettings:
    """``population`` per generation, ``generations`` evaluated, ``parents`` kept each time,
    ``mutation_prob`` per field, ``crossover_share`` of the children made by crossover
    (``parents`` is capped at ``population - 1`` so every generation has a child)."""

    population: int = 20
    generations: int = 10
    parents: int = 5
    mutation_prob: float = 0.1
    crossover_share: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.population < 2 or self.generations < 1 or self.parents < 1:
            raise ConfigError("search: need population >= 2, generations >= 1 and parents >= 1")
        if not 0.0 <= self.mutation_prob <= 1.0 or not 0.0 <= self.crossover_share <= 1.0:
            raise ConfigError("search: mutation_prob and crossover_share must be in [0, 1]")


@dataclass
class Generation:
    """One generation's population fitness: best, mean, and the best candidate."""

    index: int
    best: float
    mean: float
    best_candidate: Candidate

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {"generation": self.index, "best": self.best, "mean": self.mean,
                "best_candidate": list(self.best_candidate)}


@dataclass
class EvolutionResult:
    """The fittest candidate seen, its fitness, the per-generation history, candidates scored."""

    best: Candidate
    fitness: float
    history: list[Generation] = field(default_factory=list)
    evaluated: int = 0


def mutate(cand: Candidate, choices: Sequence[Sequence[int]], prob: float, rng: random.Random) -> Candidate:
    """Redraw each field with probability ``prob`` (uniform over its choices)."""
    return tuple(rng.choice(list(choices[i])) if rng.random() < prob else v for i, v in enumerate(cand))


def crossover(a: Candidate, b: Candidate, rng: random.Random) -> Candidate:
    """Each field from ``a`` or ``b`` with equal probability."""
    return tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b, strict=True))


def _rank(pop: list[Candidate], score: dict[Candidate, float]) -> list[Candidate]:
    # Ties broken by the candidate itself, so the order never depends on set/dict iteration.
    return sorted(pop, key=lambda c: (-score[c], c))


def evolve(
    choices: Sequence[Sequence[int]],
    fitness: Callable[[Candidate], float],
    settings: EvolutionSettings,
    on_generation: Callable[[Generation], None] | None = None,
) -> EvolutionResult:
    """Search ``choices`` (one list per field) for the candidate of highest ``fitness``.

    The first population holds the all-largest candidate and random ones.
    """
    if not choices or any(len(c) == 0 for c in choices):
        raise ConfigError("search: every field needs at least one choice")
    rng = random.Random(settings.seed)
    score: dict[Candidate, float] = {}

    def scored(c: Candidate) -> float:
        if c not in score:
            score[c] = float(fitness(c))
        return score[c]

    pop: list[Candidate] = [tuple(max(c) for c in choices)]
    while len(pop) < settings.population:
        pop.append(tuple(rng.choice(list(c)) for c in choices))
    history: list[Generation] = []
    for gen in range(settings.generations):
        values = [scored(c) for c in pop]
        ranked = _rank(pop, score)
        g = Generation(gen, score[ranked[0]], sum(values) / len(values), ranked[0])
        history.append(g)
        if on_generation is not None:
            on_generation(g)
        if gen == settings.generations - 1:
            break
        parents = ranked[: min(settings.parents, settings.population - 1)]
        children = settings.population - len(parents)
        n_cross = round(children * settings.crossover_share)
        nxt = list(parents)
        for i in range(children):
            for _ in range(_RETRIES):  # prefer a child not in the population yet (more of the space seen)
                if i < n_cross and len(parents) > 1:
                    a, b = rng.sample(parents, 2)
                    child = crossover(a, b, rng)
                else:
                    child = mutate(rng.choice(parents), choices, settings.mutation_prob, rng)
                if child not in nxt:
                    break
            nxt.append(child)
        pop = nxt
    best = _rank(list(score), score)[0]
    return EvolutionResult(best=best, fitness=score[best], history=history, evaluated=len(score))
