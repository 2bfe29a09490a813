"""Plans and numpy twins of the module variants ``tt``, ``dhe`` and ``lowprec`` (``twin_utils.check_twins``).

Each is checked single- and multi-hot, with and without a budget: the plan's JSON round
trip reassembles the same tensors, and the numpy lookup from the layer's state_dict
(TT cores contracted, DHE hashes + MLP, lowprec codes dequantised) equals the torch layer.
Also: the solved sizes are in the plan, and constants live in the plan, not in the state_dict.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
from twin_utils import VOCAB, as_kjt, check_twins, feature_map, random_ids

from recemb.config.experiment import EmbeddingConfig
from recemb.embeddings.base import GroupedEmbeddingLayer
from recemb.embeddings.dhe import DHEEmbeddingLayer
from recemb.embeddings.lowprec import LowPrecEmbeddingLayer
from recemb.embeddings.plan import VariantPlan
from recemb.embeddings.registry import assemble, build_embedding_layer
from recemb.embeddings.tt import TTEmbeddingLayer
from recemb.serving.lookup import lookup

CASES: list[tuple[str, dict[str, Any]]] = [
    ("tt", {"params": {"rank": 3}}),
    ("tt", {"budget": 0.2}),
    ("dhe", {"params": {"k": 12, "hidden": 16}}),
    ("dhe", {"params": {"k": 7, "hidden": 8, "shared": False, "encoding": "gaussian", "activation": "relu",
                        "layers": 3}}),
    ("dhe", {"budget": 0.05}),
    ("lowprec", {}),
    ("lowprec", {"params": {"bits": 16, "scale": "fixed", "scale_per": "table"}}),
    ("lowprec", {"budget": 0.5}),
]
IDS = ["tt", "tt-budget", "dhe-shared", "dhe-per-feature-gaussian", "dhe-budget", "lowprec", "lowprec16-table",
       "lowprec-budget"]


@pytest.mark.parametrize("multihot", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize(("kind", "kwargs"), CASES, ids=IDS)
def test_numpy_twins_equal_the_torch_layer(kind: str, kwargs: dict[str, Any], multihot: bool) -> None:
    layer = check_twins(kind, multihot, **kwargs)
    if kind == "tt":  # "small" (7 rows) is never smaller as TT: the layer is mixed
        assert isinstance(layer, GroupedEmbeddingLayer)
        assert layer.layers["dense"].plan.capabilities.storage == "tables"
        assert layer.layers["tt"].plan.capabilities.storage == "module"


def test_twins_after_training_steps() -> None:
    """Trained (not freshly initialised) weights: lowprec's codes and scales move, DHE's MLP too."""
    fm = feature_map(True)
    for kind in ("lowprec", "dhe", "tt"):
        torch.manual_seed(0)
        layer = build_embedding_layer(fm, EmbeddingConfig(kind=kind, dim=8, seed=1, lr=0.05))
        opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
        for step in range(3):
            out = layer(as_kjt(random_ids(fm, 32, seed=10 + step)))
            opt.zero_grad()
            (out.values() ** 2).sum().backward()
            opt.step()
        check_twins(kind, True, layer=layer)


def test_plans_record_solved_sizes_and_budget() -> None:
    fm = feature_map(False)
    full_bytes = sum(VOCAB.values()) * 8 * 4
    tt = build_embedding_layer(fm, EmbeddingConfig(kind="tt", dim=8, budget=0.2))
    plan = tt.layers["tt"].plan
    assert plan.capabilities.budget["solver"] == "tt_ranks"
    assert plan.capabilities.budget["target_bytes"] == int(0.2 * full_bytes)
    for f, t in plan.params["tables"].items():
        core = tt.layers["tt"].cores[f]
        assert (t["rank"], tuple(t["row_factors"]), tuple(t["dim_factors"])) == (core.rank, core.n, core.d)
    assert isinstance(tt.layers["tt"], TTEmbeddingLayer)
    assert plan.capabilities.achieved_bytes == tt.layers["tt"].parameter_bytes()
    assert tt.layers["dense"].plan.kind == "tt" and tt.layers["dense"].plan.capabilities.budget == \
        plan.capabilities.budget

    dhe = build_embedding_layer(fm, EmbeddingConfig(kind="dhe", dim=8, budget=0.05))
    assert isinstance(dhe, DHEEmbeddingLayer)
    p = dhe.plan.params
    assert p["decoders"]["shared"][0] == p["k"] == dhe.k and p["decoders"]["shared"][-1] == 8
    assert dhe.plan.capabilities.achieved_bytes <= int(0.05 * full_bytes)
    assert all(len(s) == p["hashes"] for s in p["seeds"].values())

    low = build_embedding_layer(fm, EmbeddingConfig(kind="lowprec", dim=8, params={"bits": 16}))
    assert isinstance(low, LowPrecEmbeddingLayer)
    assert low.plan.params["bits"] == 16 and low.plan.params["offsets"] == low.offsets
    assert low.plan.capabilities.achieved_bytes == low.parameter_bytes()


def test_dhe_hash_keys_are_a_non_persistent_buffer_refilled_from_the_plan() -> None:
    fm = feature_map(False)
    cpu = build_embedding_layer(fm, EmbeddingConfig(kind="dhe", dim=8, seed=4))
    assert not any("hash_keys" in k for k in cpu.state_dict())
    meta = assemble(VariantPlan.from_dict(json.loads(json.dumps(cpu.plan.to_dict()))), torch.device("meta"))
    meta.to_empty(device=torch.device("cpu"))  # what DMP does: garbage, then reset_buffers
    meta.reset_buffers()
    assert torch.equal(meta.hash_keys, cpu.hash_keys)
    meta.load_state_dict(cpu.state_dict())
    kjt = as_kjt(random_ids(fm, 16, seed=2))
    with torch.no_grad():
        torch.testing.assert_close(meta(kjt).values(), cpu(kjt).values(), rtol=0, atol=0)
    assert cpu.parameter_bytes() == sum(p.numel() * 4 for p in cpu.parameters())


def test_tt_rows_twin_is_the_full_reconstruction() -> None:
    from recemb.serving.variants.tt import tt_rows

    layer = build_embedding_layer(feature_map(False), EmbeddingConfig(kind="tt", dim=8, params={"rank": 3}))
    table = layer.layers["tt"].cores["big"]
    n1, n2, n3 = table.n
    with torch.no_grad():
        full = torch.einsum("iar,jrbs,ksc->ijkabc", table.g1, table.g2, table.g3).reshape(n1 * n2 * n3, 8)
    ids = np.arange(VOCAB["big"])
    got = tt_rows(table.g1.detach().numpy(), table.g2.detach().numpy(), table.g3.detach().numpy(), ids)
    np.testing.assert_allclose(got, full[: VOCAB["big"]].numpy(), rtol=1e-5, atol=1e-7)
    with pytest.raises(IndexError):
        tt_rows(table.g1.detach().numpy(), table.g2.detach().numpy(), table.g3.detach().numpy(),
                np.array([n1 * n2 * n3]))


def test_module_twins_import_without_torch() -> None:
    """The serving side of these variants must not need torch."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from recemb.serving.variants import dhe, lowprec, tt\n"
        "from recemb.export import format\n"
        "print(dhe.encode_np(np.arange(3), [1, 2], 2, 'gaussian').shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(3, 2)"


def test_lookup_of_a_module_plan_needs_its_weights() -> None:
    layer = build_embedding_layer(feature_map(False), EmbeddingConfig(kind="lowprec", dim=8))
    with pytest.raises(KeyError):
        lookup(layer.plan, {}, {}, "mid", np.array([1]), np.array([1]))
