"""Export bundles: a trained run's tables, plans, dense weights and vocabularies for serving.

``recemb.export.format`` is the bundle's layout and the row-wise quantisation codec (numpy
only: the serving runtime reads it); ``recemb.export.writer`` writes bundles from a
checkpoint, shard by shard (it uses torch to rebuild the model's description on the meta
device); ``recemb.export.materialize`` precomputes TT/DHE rows (``--materialize``);
``recemb.export.record`` logs a bundle's manifest to its source MLflow run. The writer's
entry points are importable from here without importing torch until they are used.

Example:
    >>> from recemb.export import export_bundle                            # doctest: +SKIP
    >>> export_bundle("runs/deepfm_synthetic_ctr", "bundles/deepfm", dtype="int8")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

_WRITER_NAMES = ("export_bundle", "export_rank_pieces", "finish_bundle", "staging_dir", "RankPieces")


def __getattr__(name: str) -> Any:
    # Lazy: importing recemb.export.format (serving does) must not import torch.
    if name in _WRITER_NAMES:
        from recemb.export import writer

        return getattr(writer, name)
    raise AttributeError(f"module 'recemb.export' has no attribute '{name}'")


__all__ = list(_WRITER_NAMES)
