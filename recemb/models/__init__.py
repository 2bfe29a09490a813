"""Models over the embedding layer: CTR interaction architectures (``ctr``) and anomaly models (``anomaly``)."""
