"""The one-pass transforms and the unsharded lookup give what the per-key forms gave, bit for bit.

``hash_segments`` against ``hash_ids`` key by key; ``pooled_blocks`` against torchrec's collection
(values and gradients); every table variant's layer against its transform -> collection ->
combiner path, single- and multi-hot, with and without autograd.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from twin_utils import as_kjt, feature_map, random_ids

from recemb.config.experiment import EmbeddingConfig
from recemb.embeddings.base import in_order, pooled_blocks, regroup
from recemb.embeddings.hashing import hash64, hash64_segments, hash_ids, hash_segments, signed_key
from recemb.embeddings.registry import build_embedding_layer


@pytest.mark.parametrize("lengths", [[4, 4, 4], [3, 0, 6]], ids=["equal", "jagged"])
def test_hash_segments_equal_hash_ids_key_by_key(lengths: list[int]) -> None:
    ids = torch.randint(0, 1 << 40, (sum(lengths),))
    seeds, rows = [3, 4, 5], [7, 1, 1000]
    keys = torch.tensor([signed_key(s) for s in seeds])
    got = hash_segments(ids, keys, torch.tensor(rows), lengths, keep=[1])
    got64 = hash64_segments(ids, keys, lengths)
    parts = ids.split(lengths)
    want = [hash_ids(parts[0], 3, 7), parts[1], hash_ids(parts[2], 5, 1000)]
    assert torch.equal(got, torch.cat(want))
    assert torch.equal(got64, torch.cat([hash64(p, s) for p, s in zip(parts, seeds, strict=True)]))
    assert torch.equal(hash_segments(ids, keys, 97, lengths), torch.cat([hash_ids(p, s, 97) for p, s in
                                                                         zip(parts, seeds, strict=True)]))


def test_regroup_copies_keys() -> None:
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([1, 1, 1, 0]))
    values, lengths, per_key = regroup(kjt, [1, 0, 0])
    assert values.tolist() == [3, 1, 2, 1, 2]
    assert lengths.tolist() == [1, 0, 1, 1, 1, 1]
    assert per_key == [1, 2, 2]


@pytest.mark.parametrize("keys", [["a", "c", "b"], ["a", "b", "c"]], ids=["split-table", "adjacent"])
def test_pooled_blocks_equal_the_collection(keys: list[str]) -> None:
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name="t", num_embeddings=50, embedding_dim=4, feature_names=["a", "b"]),
              EmbeddingBagConfig(name="u", num_embeddings=30, embedding_dim=8, feature_names=["c"])]
    ebc = EmbeddingBagCollection(tables=tables, is_weighted=True)
    lengths = torch.tensor([0, 2, 1, 3, 1, 0, 2, 2, 1, 1, 0, 4, 1, 1, 2])
    n = int(lengths.sum())
    kjt = KeyedJaggedTensor(keys=keys, values=torch.randint(0, 30, (n,)), lengths=lengths, weights=torch.randn(n))
    want = ebc(kjt).to_dict()
    with torch.no_grad():
        fast = pooled_blocks(ebc, kjt)
    assert fast is not None and [b.shape[1] for b in fast] == [want[k].shape[1] for k in keys]
    for k, block in zip(keys, fast, strict=True):
        assert torch.equal(block, want[k]), k
    # The same gradients reach the tables.
    sum(v.square().sum() for v in want.values()).backward()
    grads = {name: bag.weight.grad.clone() for name, bag in ebc.embedding_bags.items()}
    ebc.zero_grad()
    blocks = pooled_blocks(ebc, kjt)
    assert blocks is not None
    sum(b.square().sum() for b in blocks).backward()
    for name, bag in ebc.embedding_bags.items():
        assert torch.equal(bag.weight.grad, grads[name]), name


VARIANTS: list[tuple[str, dict[str, Any], bool]] = [
    ("full", {}, True),
    ("hashed", {"budget": 0.2}, True),
    ("unified", {"budget": 0.05, "params": {"tables": 2, "chunk": 4}}, True),
    ("qr", {"budget": 0.2}, False),
    ("qr", {"budget": 0.2, "params": {"op": "add"}}, True),
    ("robe", {"budget": 0.05, "params": {"block": 4}}, True),
    ("hybrid", {"budget": 0.1}, True),
    ("mde", {"budget": 0.05}, True),
]


@pytest.mark.parametrize(("kind", "settings", "bags"), VARIANTS,
                         ids=[f"{k}{s.get('params', {}).get('op', '')}" for k, s, _ in VARIANTS])
@pytest.mark.parametrize("multihot", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("grad", [False, True], ids=["eval", "train"])
def test_layer_equals_the_collection_path(kind: str, settings: dict[str, Any], bags: bool, multihot: bool,
                                          grad: bool) -> None:
    """Single-hot batches take the broadcast paths (every key as many ids), multi-hot the gathered ones."""
    if multihot and not bags:
        pytest.skip(f"{kind} refuses multi-hot features")
    torch.manual_seed(0)
    fm = feature_map(multihot)
    layer = build_embedding_layer(fm, EmbeddingConfig(kind=kind, dim=8, seed=3, **settings))
    kjt = as_kjt(random_ids(fm, batch=32, seed=2))
    with torch.set_grad_enabled(grad):
        got = layer(kjt)
        want = in_order(layer.combiner(layer.ebc(layer.transform(kjt))), layer.features)
    assert got.keys() == want.keys() and got.length_per_key() == want.length_per_key()
    assert torch.equal(got.values(), want.values()), kind
