"""The examples in the embedding, serving, training-loop and tune modules' docstrings run and give
what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [f"recemb.embeddings.{name}" for name in (
    "budget", "hashing", "idhash", "plan", "hashed", "qr", "unified", "robe", "mde", "hybrid", "tt", "dhe", "lowprec",
    "quant", "optembed", "pruned")] + ["recemb.integrity", "recemb.export.format", "recemb.export.materialize", "recemb.export.record",
                                     "recemb.serving.transforms",
                                     "recemb.serving.lookup"] + [
    f"recemb.serving.variants.{name}" for name in (
        "hashed", "qr", "unified", "robe", "mde", "hybrid", "tt", "dhe", "lowprec", "optembed", "pruned")] + [
    "recemb.train.loop", "pipelines.tune"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {module.__name__} failed"
