"""Data layer: schema, readers, preparation, synthetic generators, batches."""
