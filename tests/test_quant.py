"""Low-precision embeddings: post-training quantisation (``quant``) and low-precision training (``lowprec``).

Quantised lookups are checked element by element against the fp32 rows with
``row_error_bound``; bytes against what FBGEMM allocates. ``lowprec`` is checked
for its update (in backward, stochastic rounding), its step-size gradient, its
meta-device materialisation, an end-to-end run, and bit-identical tables on two ranks.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_ranks
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recemb.config.experiment import EmbeddingConfig, EmbeddingGroup
from recemb.data.schema import FeatureInfo, FeatureMap
from recemb.embeddings.base import EmbeddingLayer, GroupedEmbeddingLayer, ProjectedLayer
from recemb.embeddings.budget import BudgetError
from recemb.embeddings.lowprec import LowPrecEmbeddingLayer, lowprec_bytes, stochastic_round
from recemb.embeddings.quant import (
    QuantizedTableLayer,
    quantize_layer,
    quantized_table_bytes,
    row_bytes,
    row_error_bound,
)
from recemb.embeddings.registry import build_embedding_layer, variant_kinds
from recemb.errors import ConfigError

SPARSE = {"user": 300, "item": 500, "site": 40}
DIM = 16


def feature_map(sparse: dict[str, int] = SPARSE) -> FeatureMap:
    feats = [FeatureInfo(name="d0", kind="dense", source="d0")]
    feats += [FeatureInfo(name=n, kind="sparse", source=n, num_embeddings=r) for n, r in sparse.items()]
    return FeatureMap(dataset_id="toy", label="label", features=feats)


def every_row(sparse: dict[str, int] = SPARSE) -> KeyedJaggedTensor:
    """One single-id bag per row of every feature (bags padded with empty ones to a common batch)."""
    batch = max(sparse.values())
    values, lengths = [], []
    for rows in sparse.values():
        values.append(torch.arange(rows))
        lengths.append(torch.cat([torch.ones(rows, dtype=torch.long), torch.zeros(batch - rows, dtype=torch.long)]))
    return KeyedJaggedTensor.from_lengths_sync(keys=list(sparse), values=torch.cat(values), lengths=torch.cat(lengths))


def random_batch(seed: int, batch: int = 16, sparse: dict[str, int] = SPARSE) -> KeyedJaggedTensor:
    """Bags of 0-3 ids per feature."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(sparse) * batch,), generator=gen)
    values = []
    for i, rows in enumerate(sparse.values()):
        n = int(lengths[i * batch:(i + 1) * batch].sum())
        values.append(torch.randint(0, rows, (n,), generator=gen))
    return KeyedJaggedTensor.from_lengths_sync(keys=list(sparse), values=torch.cat(values), lengths=lengths)


def full_layer(init: str = "normal") -> EmbeddingLayer:
    """A ``full`` layer with N(0, 0.01) rows; ``init="hard"`` adds offset, tiny and huge rows."""
    torch.manual_seed(0)
    layer = build_embedding_layer(feature_map(), EmbeddingConfig(kind="full", dim=DIM, init_std=0.01))
    if init == "hard":
        with torch.no_grad():
            w = layer.ebc.embedding_bags["t_item"].weight
            w[:100] = 1.0 + 1e-3 * torch.rand(100, DIM)     # large offset, small spread
            w[100:200] *= 1e4                                 # huge values
            w[200:300] *= 1e-3                                # fp16-subnormal scales
    return layer


def table_weights(layer: EmbeddingLayer) -> dict[str, torch.Tensor]:
    return {f: layer.ebc.embedding_bags[f"t_{f}"].weight.detach() for f in layer.features}


# ---------------------------------------------------------------- post-training quantisation


def test_quant_is_not_a_training_variant() -> None:
    assert "quant" not in variant_kinds() and "lowprec" in variant_kinds()


def test_row_bytes() -> None:
    assert [row_bytes(16, d) for d in ("int8", "int4", "fp16")] == [20, 12, 32]
    assert row_bytes(16, "int8", row_alignment=16) == 32
    assert quantized_table_bytes(3, 16, "int8") == 128  # 60 bytes, one 128-byte line
    with pytest.raises(ConfigError, match="unknown"):
        row_bytes(16, "int2")  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", ["int8", "int4", "fp16"])
@pytest.mark.parametrize("init", ["normal", "hard"])
def test_quantized_lookup_within_error_bound(dtype: str, init: str) -> None:
    layer = full_layer(init)
    q = quantize_layer(layer, dtype)  # type: ignore[arg-type]
    kjt = every_row()
    with torch.no_grad():
        out = q(kjt).to_dict()
    nominal = {"int8": 1 / 255 / 2, "int4": 1 / 15 / 2}
    for f, w in table_weights(layer).items():
        got = out[f][: w.shape[0]]
        err = (got - w).abs()
        bound = row_error_bound(w, dtype)  # type: ignore[arg-type]
        assert (err <= bound.unsqueeze(1)).all(), (f, float((err / bound.unsqueeze(1)).max()))
        if init == "normal":
            assert float(err.max()) > 0  # it really is quantised
            # On ordinary rows the bound is tight: the worst error is close to it.
            assert float((err.amax(1) / bound).max()) > 0.5
            if dtype in nominal:  # and close to the textbook scale / 2
                span = w.amax(1) - w.amin(1)
                assert float((err.amax(1) / (span * nominal[dtype])).max()) < 1.01


@pytest.mark.parametrize("row_alignment", [1, 16])
@pytest.mark.parametrize("dtype", ["int8", "int4", "fp16"])
def test_numpy_dequantisation_is_fbgemms_bit_for_bit(dtype: str, row_alignment: int) -> None:
    """``table_arrays`` + ``dequantize_rows`` (the bundles' dequantiser) give exactly the quantised layer's rows;
    the plan is the source's."""
    from recemb.export.format import dequantize_rows

    layer = full_layer("hard")
    q = quantize_layer(layer, dtype, row_alignment)  # type: ignore[arg-type]
    assert isinstance(q, QuantizedTableLayer) and q.plan is layer.plan
    assert q.manifest()["plan"] == layer.plan.to_dict()
    with torch.no_grad():
        out = q(every_row()).to_dict()
    arrays = q.table_arrays()
    assert sorted(arrays) == sorted(f"t_{f}" for f in SPARSE)
    for f, rows in SPARSE.items():
        got = dequantize_rows(arrays[f"t_{f}"], dtype, DIM)
        assert got.shape == (rows, DIM)
        np.testing.assert_array_equal(got, out[f][:rows].numpy(), err_msg=f"{dtype} {f}")
        picked = np.array([rows - 1, 0])
        np.testing.assert_array_equal(dequantize_rows(arrays[f"t_{f}"], dtype, DIM, picked), got[picked])


def test_quantized_bytes_match_storage() -> None:
    layer = full_layer()
    full = layer.bytes().full
    for dtype, per_row in (("int8", DIM + 4), ("int4", DIM // 2 + 4), ("fp16", 2 * DIM)):
        q = quantize_layer(layer, dtype)  # type: ignore[arg-type]
        allocated = sum(m.weights_host.numel() * m.weights_host.element_size() for m in q.ebc._emb_modules)
        assert q.parameter_bytes() == allocated
        assert q.bytes().full == full == sum(SPARSE.values()) * DIM * 4
        # rows * bytes per row, each table padded to at most one 128-byte line
        assert 0 <= q.parameter_bytes() - sum(SPARSE.values()) * per_row < 128 * len(SPARSE)


def test_quantized_layer_keeps_the_forward_contract() -> None:
    """Groups (with shared tables) and projections: same keys, order, shapes; values within fp16 error."""
    torch.manual_seed(0)
    cfg = EmbeddingConfig(
        kind="full", dim=DIM, init_std=0.01, params={"shared": [["user", "site"]]},
        groups=[EmbeddingGroup(features=["item"], dim=8, params={"shared": []})],
    )
    layer = build_embedding_layer(feature_map(), cfg, project_to=DIM)
    assert isinstance(layer, ProjectedLayer) and isinstance(layer.inner, GroupedEmbeddingLayer)
    q = quantize_layer(layer, "fp16")
    assert isinstance(q, ProjectedLayer) and isinstance(q.inner, GroupedEmbeddingLayer)
    assert all(isinstance(inner, QuantizedTableLayer) for inner in q.inner.layers.values())
    kjt = random_batch(3)
    with torch.no_grad():
        want, got = layer(kjt), q(kjt)
    assert got.keys() == want.keys() == list(SPARSE)
    assert got.length_per_key() == want.length_per_key()
    assert got.values().shape == want.values().shape
    torch.testing.assert_close(got.values(), want.values(), atol=1e-4, rtol=0)
    assert q.features == layer.features and q.dims == layer.dims and q.full_rows == layer.full_rows
    # the projection is kept and counted; the tables are halved
    proj = sum(p.numel() * 4 for p in layer.proj.parameters())
    assert proj > 0 and q.parameter_bytes() - proj < (layer.parameter_bytes() - proj) / 2 + 128 * 3


def test_quantize_refuses_what_it_cannot_do() -> None:
    odd = build_embedding_layer(feature_map(), EmbeddingConfig(kind="full", dim=6))
    quantize_layer(odd, "int8")  # 6 bytes + scale/bias is fine
    with pytest.raises(ConfigError, match="multiple of 4"):
        quantize_layer(odd, "int4")
    meta = build_embedding_layer(feature_map(), EmbeddingConfig(kind="full", dim=DIM), device=torch.device("meta"))
    with pytest.raises(ConfigError, match="meta"):
        quantize_layer(meta, "int8")
    lowprec = build_embedding_layer(feature_map(), EmbeddingConfig(kind="lowprec", dim=DIM))
    with pytest.raises(ConfigError, match="table-backed"):
        quantize_layer(lowprec, "int8")


# ---------------------------------------------------------------- low-precision training


def test_stochastic_round_is_unbiased() -> None:
    x = torch.tensor([-2.75, -0.5, -0.01, 0.0, 0.3, 1.999, 7.125])
    gen = torch.Generator().manual_seed(0)
    draws = stochastic_round(x.expand(20000, -1), gen)
    assert ((draws == torch.floor(x)) | (draws == torch.floor(x) + 1)).all()
    # std of the mean is at most 0.5 / sqrt(20000) = 0.0035
    torch.testing.assert_close(draws.mean(0), x, atol=0.015, rtol=0)


def lowprec(device: torch.device | None = None, **params: Any) -> LowPrecEmbeddingLayer:
    cfg = EmbeddingConfig(kind="lowprec", dim=DIM, lr=0.05, params=params)
    layer = build_embedding_layer(feature_map(), cfg, device=device)
    assert isinstance(layer, LowPrecEmbeddingLayer)
    return layer


def test_lowprec_bytes_and_budget() -> None:
    rows = sum(SPARSE.values())
    assert lowprec(bits=8).parameter_bytes() == rows * (DIM + 4)
    assert lowprec(bits=16, scale_per="table").parameter_bytes() == rows * DIM * 2 + 4
    assert lowprec(bits=8).table.dtype == torch.int8 and lowprec(bits=16).table.dtype == torch.int16
    assert lowprec_bytes([100, 50], 16, 8, per_row=False) == 150 * 16 + 4
    fm = feature_map()
    build_embedding_layer(fm, EmbeddingConfig(kind="lowprec", dim=DIM, budget=0.32))  # 20/64 = 0.3125 fits
    build_embedding_layer(fm, EmbeddingConfig(kind="lowprec", dim=DIM, budget=0.25, params={"scale_per": "table"}))
    with pytest.raises(BudgetError, match="fixed by bits"):
        build_embedding_layer(fm, EmbeddingConfig(kind="lowprec", dim=DIM, budget=0.25))
    with pytest.raises(ConfigError, match="bits"):
        lowprec(bits=4)


def test_lowprec_forward_pools_dequantised_rows() -> None:
    layer = lowprec()
    kjt = random_batch(1)
    out = layer(kjt)
    assert out.keys() == list(SPARSE) and out.values().shape == (16, DIM * len(SPARSE))
    rows = layer.dequantized()
    for f, jt in kjt.to_dict().items():
        base = layer.offsets[f]
        want = torch.stack([rows[base + ids].sum(0) for ids in jt.to_dense()])
        torch.testing.assert_close(out[f], want)


@pytest.mark.parametrize("scale", ["learned", "fixed"])
def test_lowprec_step_updates_table_and_scale(scale: str) -> None:
    layer = lowprec(scale=scale)
    before = layer.table.clone()
    kjt = random_batch(2)
    out = layer(kjt)
    (out.values() * torch.randn_like(out.values())).sum().backward()
    touched = torch.zeros(layer.total_rows, dtype=torch.bool)
    for f, jt in kjt.to_dict().items():
        touched[layer.offsets[f] + jt.values()] = True
    changed = (layer.table != before).any(dim=1)
    assert changed[touched].float().mean() > 0.9  # Adagrad's first step moves every touched row
    assert not changed[~touched].any()
    assert int(layer.updates) == 1
    if scale == "learned":
        grad = layer.log_scale.grad
        assert grad is not None and (grad[touched] != 0).all() and (grad[~touched] == 0).all()
    else:
        assert not any(p.requires_grad for p in layer.parameters())


def test_lowprec_update_is_the_fp32_step_within_a_quantum() -> None:
    """SGD at 16 bits: the new dequantised rows are ``w - lr * g`` to within one step size."""
    layer = lowprec(bits=16, optimizer="sgd", lr=0.1, max_abs=4.0)
    kjt = random_batch(4)
    w0 = layer.dequantized()
    out = layer(kjt)
    weights = torch.randn_like(out.values())
    (out.values() * weights).sum().backward()
    # the exact fp32 gradient of the same loss w.r.t. the dequantised table
    w = w0.clone().requires_grad_(True)
    ref = torch.cat([
        torch.stack([w[layer.offsets[f] + ids].sum(0) for ids in jt.to_dense()])
        for f, jt in kjt.to_dict().items()
    ], dim=1)
    (ref * weights).sum().backward()
    assert w.grad is not None
    expected = w0 - 0.1 * w.grad
    step = math.exp(float(layer.log_scale.detach()[0]))
    assert float((layer.dequantized() - expected).abs().max()) <= step * 1.001
    assert float((layer.dequantized() - w0).abs().max()) > 10 * step  # and the step did move rows


def test_lowprec_meta_build_materialises_deterministically() -> None:
    cpu = lowprec()
    meta = lowprec(device=torch.device("meta"))
    meta.to_empty(device=torch.device("cpu"))  # what DMP does: zeros/garbage, then the resets
    meta.reset_parameters()
    meta.reset_buffers()
    assert torch.equal(meta.table, cpu.table) and torch.equal(meta.log_scale, cpu.log_scale)
    assert (cpu.table != 0).float().mean() > 0.5  # N(0, 0.01) rows at step 0.1/127 are mostly non-zero


def test_lowprec_learns_end_to_end(make_experiment: Any) -> None:
    from recemb.train.loop import train

    cfg = make_experiment("dcnv2", "embedding.kind=lowprec", "train.epochs=1")
    result = train(cfg)
    assert result.test["auc"] > 0.55, result.test  # the planted signal; chance is 0.5
    assert result.embedding_bytes / result.full_bytes == pytest.approx(12 / 32)  # int8 codes + fp32 scale, dim 8


# ---------------------------------------------------------------- two ranks


class _Tiny(nn.Module):
    def __init__(self, emb: EmbeddingLayer) -> None:
        super().__init__()
        self.emb = emb
        self.head = nn.Linear(DIM * len(SPARSE), 1)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(self.emb(kjt).values()).squeeze(1)


def _two_rank_steps(rank: int, world_size: int) -> dict[str, Any]:
    from recemb.embeddings.sharding import shard_model

    cfg = EmbeddingConfig(kind="lowprec", dim=DIM, lr=0.05)
    torch.manual_seed(0)
    model = _Tiny(build_embedding_layer(feature_map(), cfg, device=torch.device("meta")))
    dmp = shard_model(model, cfg, torch.device("cpu")).model
    emb = next(m for m in dmp.modules() if isinstance(m, LowPrecEmbeddingLayer))
    start = emb.table.clone().numpy()
    opt = torch.optim.Adam([p for p in dmp.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        kjt = random_batch(100 * step + rank)  # each rank its own ids
        labels = torch.randint(0, 2, (kjt.stride(),), generator=torch.Generator().manual_seed(step + 7 * rank))
        loss = F.binary_cross_entropy_with_logits(dmp(kjt), labels.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"start": start, "table": emb.table.clone().numpy(), "scale": emb.log_scale.detach().clone().numpy(),
            "updates": int(emb.updates)}


def test_lowprec_two_ranks_stay_bit_identical() -> None:
    r0, r1 = run_ranks(_two_rank_steps, 2)
    assert np.array_equal(r0["start"], r1["start"]) and (r0["start"] != 0).any()
    assert r0["updates"] == r1["updates"] == 3
    assert (r0["table"] != r0["start"]).any()
    assert np.array_equal(r0["table"], r1["table"])
    assert np.array_equal(r0["scale"], r1["scale"]) and (r0["scale"] != r0["scale"][0]).any()


def test_dense_weight_decay_spares_lowprec_step_sizes() -> None:
    from recemb.config.experiment import TrainConfig
    from recemb.train.loop import dense_optimizer

    feats = [FeatureInfo(name=n, kind="sparse", source=n, num_embeddings=v) for n, v in {"a": 50, "b": 9}.items()]
    fm = FeatureMap(dataset_id="toy", label="label", features=feats)
    layer = build_embedding_layer(fm, EmbeddingConfig(kind="lowprec", dim=8))
    head = nn.Linear(8, 1)
    model = nn.ModuleDict({"emb": layer, "head": head})
    opt = dense_optimizer(model, TrainConfig(dense_weight_decay=0.1))
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(layer.log_scale)] == 0.0
    assert decay[id(head.weight)] == 0.1
