"""recemb: feature embeddings for recommendation/CTR and categorical-event models."""

__version__ = "0.1.0"
