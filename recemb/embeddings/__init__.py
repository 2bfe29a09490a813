"""Embedding layers: one interface (id transform, physical tables, combiner), one file per variant."""
