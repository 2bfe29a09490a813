"""The twin check every variant's tests call: its plan and numpy twins against its torch layer.

For each variant (single-hot, and multi-hot where the variant allows bags):
- the plan is JSON: ``to_dict`` -> JSON -> ``from_dict`` gives the same plan, and the
  layer assembled from the round-tripped plan has the same tensors;
- the numpy transform gives the torch transform's physical ids, key for key, id for id;
- the numpy lookup (transform twin, gather, pool, combiner twin) gives the torch layer's
  pooled vectors (exactly where the maths is a gather, else within float rounding).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recemb.config.experiment import EmbeddingConfig
from recemb.data.schema import FeatureInfo, FeatureMap
from recemb.embeddings.base import EmbeddingLayer, TableEmbeddingLayer
from recemb.embeddings.plan import VariantPlan
from recemb.embeddings.registry import assemble, build_embedding_layer
from recemb.serving.lookup import lookup
from recemb.serving.transforms import apply_transform

VOCAB = {"small": 7, "mid": 300, "big": 5000}
MULTI = "tags"  # a multi-hot feature, added for variants that take bags


def feature_map(multihot: bool) -> FeatureMap:
    feats = [FeatureInfo(name=n, kind="sparse", source=n, num_embeddings=v) for n, v in VOCAB.items()]
    if multihot:
        feats.append(FeatureInfo(name=MULTI, kind="multihot", source=MULTI, num_embeddings=900))
    return FeatureMap(dataset_id="twins", label="label", features=feats)


def random_ids(fm: FeatureMap, batch: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for f in fm.sparse_features:
        info = fm.feature(f)
        lengths = rng.integers(0, 4, batch) if info.kind == "multihot" else np.ones(batch, dtype=np.int64)
        values = rng.integers(0, info.num_embeddings, int(lengths.sum()))
        out[f] = (values.astype(np.int64), lengths.astype(np.int64))
    return out


def as_kjt(ids: dict[str, tuple[np.ndarray, np.ndarray]]) -> KeyedJaggedTensor:
    keys = list(ids)
    return KeyedJaggedTensor(
        keys=keys, values=torch.from_numpy(np.concatenate([ids[k][0] for k in keys])),
        lengths=torch.from_numpy(np.concatenate([ids[k][1] for k in keys])).to(torch.int32),
    )


def weights(layer: EmbeddingLayer) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(physical tables by name, the layer's other tensors by state_dict key) as numpy."""
    tables, dense = {}, {}
    for key, value in layer.state_dict().items():
        if key.startswith("ebc.embedding_bags.") and key.endswith(".weight"):
            tables[key[len("ebc.embedding_bags."):-len(".weight")]] = value.detach().numpy()
        else:
            dense[key] = value.detach().numpy()
    return tables, dense


def layers_of(layer: EmbeddingLayer) -> list[EmbeddingLayer]:
    """The planned layers inside ``layer`` (one, or a grouped layer's)."""
    if layer.plan is not None:
        return [layer]
    inner = getattr(layer, "layers", None)
    assert inner is not None, f"{type(layer).__name__} has no plan"
    return list(inner.values())


def check_twins(kind: str, multihot: bool, dim: int = 8, layer: EmbeddingLayer | None = None,
                **kwargs: Any) -> EmbeddingLayer:
    """Build ``kind`` (``EmbeddingConfig`` ``kwargs``) over the twin feature map (with a multi-hot
    feature when ``multihot``), or take ``layer`` built over ``feature_map(multihot)``, and assert
    the plan round trip, the transform twin and the lookup twin. Returns the layer."""
    torch.manual_seed(0)
    fm = feature_map(multihot)
    if layer is None:
        layer = build_embedding_layer(fm, EmbeddingConfig(kind=kind, dim=dim, seed=3, **kwargs))
    layer.eval()
    ids = random_ids(fm, batch=64, seed=1)
    with torch.no_grad():
        out = layer(as_kjt(ids)).to_dict()
    for sub in layers_of(layer):
        plan = sub.plan
        assert plan is not None and plan.kind == kind
        # The plan is JSON, and reassembles to the same tensors.
        again = VariantPlan.from_dict(json.loads(json.dumps(plan.to_dict())), plan.arrays)
        assert again == plan
        rebuilt = assemble(again, torch.device("meta"))
        assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == \
               {k: tuple(v.shape) for k, v in sub.state_dict().items()}
        tables, dense = weights(sub)
        sub_ids = {f: ids[f] for f in plan.features}
        if isinstance(sub, TableEmbeddingLayer):
            physical = sub.transform(as_kjt(sub_ids)).to_dict()
            for f in plan.features:
                for p in apply_transform(plan, f, *sub_ids[f]):
                    got = physical[p.key]
                    assert np.array_equal(got.values().numpy(), p.values), (kind, f, p.key)
                    assert np.array_equal(got.lengths().numpy(), p.lengths), (kind, f, p.key)
                    if p.weights is not None:
                        assert np.allclose(got.weights().numpy(), p.weights), (kind, f, p.key)
        for f in plan.features:
            expected = out[f].numpy()
            got = lookup(plan, tables, dense, f, *sub_ids[f])
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=f"{kind} {f}")
    return layer


_TORCH_FREE = """
import json, sys
sys.modules["torch"] = None  # any import of torch now fails
import numpy as np
from recemb.embeddings.plan import VariantPlan
from recemb.serving.lookup import lookup
folder = sys.argv[1]
load = lambda name: dict(np.load(f"{folder}/{name}.npz"))
plan = VariantPlan.from_dict(json.load(open(folder + "/plan.json")), load("arrays"))
tables, dense, ids = load("tables"), load("dense"), load("ids")
out = {f: lookup(plan, tables, dense, f, ids[f + ".values"], ids[f + ".lengths"]) for f in plan.features}
np.savez(folder + "/out.npz", **out)
"""


def check_lookup_without_torch(layer: EmbeddingLayer, fm: FeatureMap, folder: Path, kind: str = "") -> None:
    """``layer``'s plan as JSON + arrays, looked up in a process where ``import torch`` fails: the
    vectors equal the torch layer's (``layer`` built over ``fm``; files go to ``folder``)."""
    import subprocess
    import sys

    layer.eval()
    ids = random_ids(fm, batch=16, seed=7)
    with torch.no_grad():
        want = layer(as_kjt(ids)).to_dict()
    tables, dense = weights(layer)
    (folder / "plan.json").write_text(json.dumps(layer.plan.to_dict()))
    np.savez(folder / "arrays.npz", **layer.plan.arrays)
    np.savez(folder / "tables.npz", **tables)
    np.savez(folder / "dense.npz", **dense)
    np.savez(folder / "ids.npz", **{f"{f}.{part}": a for f, (v, n) in ids.items()
                                    for part, a in (("values", v), ("lengths", n))})
    subprocess.run([sys.executable, "-c", _TORCH_FREE, str(folder)], check=True, timeout=120)
    got = np.load(folder / "out.npz")
    for f in layer.features:
        np.testing.assert_allclose(got[f], want[f].numpy(), rtol=1e-5, atol=1e-6, err_msg=f"{kind} {f}")
