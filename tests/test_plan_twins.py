"""Every variant's plan and numpy twins against its torch layer (``twin_utils.check_twins``).

This file covers ``full`` and ``hashed``; each other variant's test file calls the same check.
"""

from __future__ import annotations

import pytest
from twin_utils import check_twins


@pytest.mark.parametrize("multihot", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize(("kind", "kwargs"), [("full", {}), ("hashed", {"budget": 0.05})], ids=["full", "hashed"])
def test_numpy_twins_equal_the_torch_layer(kind: str, kwargs: dict[str, object], multihot: bool) -> None:
    check_twins(kind, multihot, **kwargs)
