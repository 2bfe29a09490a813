"""numpy twins of each variant, one file per variant (registered on import)."""
