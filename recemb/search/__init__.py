"""Architecture search for embeddings: OptEmbed's evolutionary search over per-field dims.

``recemb.search.evolution`` holds the search as plain, seeded functions;
``pipelines/search.py`` runs supernet training, the search and the retraining.
"""

from recemb.search.evolution import EvolutionResult, EvolutionSettings, Generation, crossover, evolve, mutate

__all__ = ["EvolutionResult", "EvolutionSettings", "Generation", "crossover", "evolve", "mutate"]
