"""Tests for recemb.models.ctr: every model over the real ``full`` embedding layer.

Shapes and dtypes, gradients into every parameter (tables included), seeded
determinism, params validation, exact FM / DLRM interaction arithmetic, DCN-V2
variants, a meta-device build, and a small planted problem each model must learn.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torchrec.distributed.utils import init_parameters
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recemb.config.experiment import EmbeddingConfig, EmbeddingGroup, ModelConfig
from recemb.data.batch import Batch
from recemb.data.schema import FeatureInfo, FeatureMap
from recemb.errors import ConfigError
from recemb.models.ctr import MODELS, build_model, embedding_layers, model_needs
from recemb.models.ctr.dcnv2 import DCNv2
from recemb.models.ctr.dlrm import DLRM, DotInteraction
from recemb.models.ctr.layers import MLP, CrossLayer, FieldFirstOrder, fm_second_order
from recemb.models.ctr.registry import LINEAR_DIM, takes_linear_layer

DIM = 8
SMALL: dict[str, dict[str, object]] = {
    "lr": {},
    "fm": {},
    "deepfm": {"mlp": [32, 16]},
    "dcnv2": {"mlp": [32, 16], "cross_layers": 2},
    "dlrm": {"bottom_mlp": [16], "top_mlp": [32, 16]},
    "wdl": {"mlp": [32, 16]},
}
SPARSE = {"c0": 10, "c1": 10, "c2": 50, "c3": 1000, "tags": 30}


def feature_map(num_dense: int = 3) -> FeatureMap:
    """4 one-hot features, one multi-hot feature, ``num_dense`` dense features."""
    feats = [FeatureInfo(name=f"d{i}", kind="dense", source=f"d{i}") for i in range(num_dense)]
    for name, rows in SPARSE.items():
        kind = "multihot" if name == "tags" else "sparse"
        feats.append(FeatureInfo(name=name, kind=kind, source=name, num_embeddings=rows))
    return FeatureMap(dataset_id="toy", label="label", features=feats)


def ids(batch_size: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One id per sample for one-hot features."""
    return {n: torch.randint(0, r, (batch_size,), generator=gen) for n, r in SPARSE.items() if n != "tags"}


def make_batch(
    batch_size: int, gen: torch.Generator, num_dense: int = 3, onehot: dict[str, torch.Tensor] | None = None
) -> Batch:
    """Random batch; the multi-hot feature has 0 to 3 ids per sample (empty bags included)."""
    onehot = onehot if onehot is not None else ids(batch_size, gen)
    tag_len = torch.randint(0, 4, (batch_size,), generator=gen)
    tag_ids = torch.randint(0, SPARSE["tags"], (int(tag_len.sum()),), generator=gen)
    keys = list(SPARSE)
    values = torch.cat([onehot[k] for k in keys if k != "tags"] + [tag_ids])
    lengths = torch.cat([torch.ones(batch_size, dtype=torch.long)] * (len(keys) - 1) + [tag_len])
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)
    dense = torch.randn(batch_size, num_dense, generator=gen)
    labels = torch.randint(0, 2, (batch_size,), generator=gen).float()
    return Batch(dense=dense, sparse=sparse, labels=labels)


def build(name: str, params: dict[str, object] | None = None, num_dense: int = 3, seed: int = 0,
          embedding: EmbeddingConfig | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(name=name, params=SMALL[name] if params is None else params)
    return build_model(cfg, feature_map(num_dense), embedding or EmbeddingConfig(kind="full", dim=DIM))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_shape_and_dtype(name: str) -> None:
    model = build(name)
    out = model(make_batch(16, torch.Generator().manual_seed(1)))
    assert out.shape == (16,)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_no_dense_features(name: str) -> None:
    model = build(name, num_dense=0)
    out = model(make_batch(8, torch.Generator().manual_seed(1), num_dense=0))
    assert out.shape == (8,)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradient_reaches_every_parameter(name: str) -> None:
    model = build(name)
    batch = make_batch(64, torch.Generator().manual_seed(2))
    F.binary_cross_entropy_with_logits(model(batch), batch.labels).backward()
    tables = 0
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        grad = p.grad.to_dense() if p.grad.is_sparse else p.grad
        assert grad.abs().sum() > 0, f"{pname} has an all-zero gradient"
        tables += "embedding_bags" in pname
    layers = embedding_layers(model)
    needs = model_needs(name)
    linear = takes_linear_layer(needs, model.params)
    expect = {n for n, wanted in (("embedding", needs.embedding), ("linear", linear)) if wanted}
    assert set(layers) == expect
    assert tables == len(SPARSE) * (needs.embedding + linear)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_seeded_build_is_deterministic(name: str) -> None:
    batch = make_batch(16, torch.Generator().manual_seed(3))
    a, b, c = build(name, seed=7), build(name, seed=7), build(name, seed=8)
    torch.testing.assert_close(a(batch), b(batch), rtol=0, atol=0)
    assert not torch.equal(a(batch), c(batch))


def test_first_order_layer_is_narrow_full() -> None:
    emb = EmbeddingConfig(kind="full", dim=DIM, groups=[EmbeddingGroup(features=["c3"], dim=4)])
    model = build("deepfm", params={**SMALL["deepfm"], "first_order": "table"}, embedding=emb)
    # FBGEMM's fused kernels need widths divisible by 4: first-order tables are LINEAR_DIM wide.
    assert all(d == LINEAR_DIM for d in model.linear.dims.values())
    assert all(t.name.startswith("lin_") for t in model.linear.tables)
    # DeepFM needs one dim: the 4-dim group is projected to 8.
    assert set(model.embedding.dims.values()) == {DIM}
    wdl = build("wdl", embedding=emb)
    assert wdl.embedding.dims["c3"] == 4
    assert wdl(make_batch(4, torch.Generator().manual_seed(0))).shape == (4,)
    # first_order: embedding takes the term from the main embeddings: no first-order tables,
    # one vector per field as wide as the field's embedding (WDL keeps the 4-dim group).
    for name in ("deepfm", "fm", "wdl"):
        fwfm = build(name, params={**SMALL[name], "first_order": "embedding"}, embedding=emb)
        assert fwfm.linear is None and set(embedding_layers(fwfm)) == {"embedding"}
        assert fwfm.field_weights.dims == [fwfm.embedding.dims[f] for f in fwfm.embedding.features]
    # In the order of the pooled values (feature order), not of the groups.
    assert build("wdl", params={**SMALL["wdl"], "first_order": "embedding"}, embedding=emb).field_weights.dims == [
        DIM, DIM, DIM, 4, DIM]


@pytest.mark.parametrize("name", ["deepfm", "fm", "wdl"])
def test_first_order_from_embeddings_is_field_dot_products(name: str) -> None:
    # The logit's first-order part is sum_f <w_f, e_f> + dense linear + bias: the table form's
    # logit minus its table term, plus the dot products (same seed: same embeddings and dense part).
    batch = make_batch(16, torch.Generator().manual_seed(5))
    fwfm = build(name, params={**SMALL[name], "first_order": "embedding"})
    vecs = fwfm.embedding(batch.sparse).values().split(fwfm.field_weights.dims, dim=1)
    weights = fwfm.field_weights.weight.split(fwfm.field_weights.dims)
    dots = sum((v * w).sum(1) for v, w in zip(vecs, weights, strict=True))
    table = build(name, params={**SMALL[name], "first_order": "table"})
    table.load_state_dict(fwfm.state_dict(), strict=False)  # the same embeddings and dense part
    torch.testing.assert_close(fwfm(batch), table(batch) - table.linear(batch.sparse).values().sum(1) + dots,
                               rtol=1e-5, atol=1e-5)


def test_field_vectors_start_at_the_table_step_scale() -> None:
    # N(0, (LINEAR_DIM / d_f)^2) per field: <w_f, e> then moves as fast as a LINEAR_DIM-wide table row.
    torch.manual_seed(0)
    term = FieldFirstOrder([16] * 200 + [4] * 200)
    wide, narrow = term.weight.split([3200, 800])
    assert wide.std().item() == pytest.approx(LINEAR_DIM / 16, rel=0.05)
    assert narrow.std().item() == pytest.approx(LINEAR_DIM / 4, rel=0.1)


def test_budget_goes_to_the_main_tables_without_first_order_tables() -> None:
    emb = EmbeddingConfig(kind="hashed", dim=DIM, budget=4000)
    table = embedding_layers(build("deepfm", params={**SMALL["deepfm"], "first_order": "table"}, embedding=emb))
    fwfm = embedding_layers(build("deepfm", params={**SMALL["deepfm"], "first_order": "embedding"}, embedding=emb))
    assert set(fwfm) == {"embedding"}
    assert fwfm["embedding"].parameter_bytes() > table["embedding"].parameter_bytes()
    assert fwfm["embedding"].parameter_bytes() <= 4000


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ConfigError, match="known: dcnv2, deepfm, dlrm, fm, lr, wdl"):
        build_model(ModelConfig(name="xdeepfm"), feature_map(), EmbeddingConfig(dim=DIM))
    with pytest.raises(ConfigError, match="xdeepfm"):
        model_needs("xdeepfm")


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("deepfm", {"mlp": [8], "hiden": 3}, r"model.params: unknown key 'hiden'"),
        ("lr", {"mlp": [8]}, r"unknown key 'mlp'"),
        ("deepfm", {"mlp": "400,400"}, r"'mlp' expects a list"),
        ("deepfm", {"dropout": "0.1"}, r"'dropout' expects float"),
        ("dcnv2", {"structure": "sideways"}, r"'structure' must be one of"),
        ("dcnv2", {"low_rank": -1}, r"low_rank must be >= 0"),
        ("dlrm", {"top_mlp": [0]}, r"top_mlp sizes must be >= 1"),
        ("wdl", {"dropout": 1.0}, r"dropout must be in"),
    ],
)
def test_params_validation(name: str, params: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_model(ModelConfig(name=name, params=params), feature_map(), EmbeddingConfig(dim=DIM))


def test_fm_second_order_equals_pairwise_sum() -> None:
    emb = torch.randn(5, 6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    brute = sum((emb[:, i] * emb[:, j]).sum(-1) for i in range(6) for j in range(i + 1, 6))
    torch.testing.assert_close(fm_second_order(emb), brute, rtol=0, atol=1e-12)


def test_fm_logit_is_first_plus_pairwise() -> None:
    model = build("fm", params={"first_order": "table"})  # the embedding form: test_first_order_from_embeddings_...
    batch = make_batch(32, torch.Generator().manual_seed(4))
    vecs = model.embedding.stack(model.embedding(batch.sparse))
    feats = vecs.shape[1]
    pairwise = sum((vecs[:, i] * vecs[:, j]).sum(-1) for i in range(feats) for j in range(i + 1, feats))
    first = model.linear(batch.sparse).values().sum(1) + model.first_order.dense(batch.dense).squeeze(-1)
    first = first + model.first_order.bias
    torch.testing.assert_close(model(batch), first + pairwise, rtol=1e-5, atol=1e-5)


def test_dot_interaction_pairs() -> None:
    vecs = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    out = DotInteraction(5)(vecs)
    expect = [(vecs[:, i] * vecs[:, j]).sum(-1) for i in range(5) for j in range(i + 1, 5)]
    assert out.shape == (3, 10)
    torch.testing.assert_close(out, torch.stack(expect, dim=1))


def test_dlrm_interaction_size() -> None:
    model = build("dlrm")
    assert isinstance(model, DLRM)
    feats = len(SPARSE)  # F sparse vectors + 1 dense vector -> F (F + 1) / 2 distinct pairs
    assert model.interaction.num_pairs == feats * (feats + 1) // 2 == 15
    assert model.top.layers[0].in_features == 15 + DIM
    captured: list[torch.Tensor] = []
    model.interaction.register_forward_hook(lambda _m, _i, out: captured.append(out))
    model(make_batch(4, torch.Generator().manual_seed(0)))
    assert captured[0].shape == (4, 15)
    assert build("dlrm", num_dense=0).interaction.num_pairs == feats * (feats - 1) // 2


@pytest.mark.parametrize("structure", ["stacked", "parallel"])
@pytest.mark.parametrize("low_rank", [0, 4])
def test_dcnv2_variants(structure: str, low_rank: int) -> None:
    params = {"mlp": [16], "cross_layers": 3, "low_rank": low_rank, "structure": structure,
              "batch_norm": True, "dropout": 0.1}
    model = build("dcnv2", params=params)
    assert isinstance(model, DCNv2)
    width = len(SPARSE) * DIM + 3
    layer = model.cross.layers[0]
    assert len(model.cross.layers) == 3
    if low_rank:
        assert layer.v.weight.shape == (low_rank, width) and layer.u.weight.shape == (width, low_rank)
    else:
        assert layer.v is None and layer.u.weight.shape == (width, width)
    assert model(make_batch(8, torch.Generator().manual_seed(0))).shape == (8,)


def test_cross_layer_low_rank_is_u_v_transpose() -> None:
    layer = CrossLayer(dim=6, low_rank=2)
    x0, x = torch.randn(3, 6), torch.randn(3, 6)
    w = layer.u.weight @ layer.v.weight  # U V^T as a [D, D] matrix
    torch.testing.assert_close(layer(x0, x), x0 * (x @ w.T + layer.u.bias) + x)


def test_mlp_output_bias_starts_at_zero() -> None:
    mlp = MLP(5, [4], out_dim=1)
    mlp.output.bias.data.fill_(3.0)
    mlp.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    assert mlp.output.bias.item() == 0.0
    assert MLP(5, [], out_dim=None)(torch.ones(2, 5)).shape == (2, 5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_meta_build_materialises(name: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, params=SMALL[name])
    model = build_model(cfg, feature_map(), EmbeddingConfig(kind="full", dim=DIM), device=torch.device("meta"))
    assert all(p.is_meta for p in model.parameters())
    init_parameters(model, torch.device("cpu"))  # what DistributedModelParallel does for meta modules
    out = model(make_batch(8, torch.Generator().manual_seed(0)))
    assert out.shape == (8,) and torch.isfinite(out).all()
    for module in model.modules():
        if isinstance(module, MLP) and module.output is not None:
            assert torch.count_nonzero(module.output.bias) == 0
    if isinstance(model, DLRM):
        expect = torch.triu_indices(model.interaction.num_vectors, model.interaction.num_vectors, 1)
        assert torch.equal(model.interaction.pairs, expect)


def planted_batches(steps: int, batch_size: int) -> list[Batch]:
    """Labels from an interaction (parity of c0 xor parity of c1), a first-order effect of c2 and d0."""
    gen = torch.Generator().manual_seed(123)
    effect = torch.randn(SPARSE["c2"], generator=gen)
    out = []
    for _ in range(steps):
        onehot = ids(batch_size, gen)
        batch = make_batch(batch_size, gen, onehot=onehot)
        sign = (1 - 2 * (onehot["c0"] % 2)) * (1 - 2 * (onehot["c1"] % 2))
        logit = 2.0 * sign + 2.0 * effect[onehot["c2"]] + batch.dense[:, 0]
        batch.labels = torch.bernoulli(torch.sigmoid(logit), generator=gen)
        out.append(batch)
    return out


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from threads, and on a busy machine their spin-waits cost seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_models_learn_planted_problem() -> None:
    train = planted_batches(steps=200, batch_size=256)
    held_out = planted_batches(steps=2, batch_size=2048)[1]
    rate = float(torch.cat([b.labels for b in train]).mean())
    base = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    losses: dict[str, float] = {}
    for name in sorted(MODELS):
        model = build(name)
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        for batch in train:
            loss = F.binary_cross_entropy_with_logits(model(batch), batch.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            losses[name] = float(F.binary_cross_entropy_with_logits(model(held_out), held_out.labels))
    # LR sees only the first-order effects; the others also learn the c0 x c1 interaction.
    assert losses["lr"] < base - 0.05, (losses, base)
    for name in ("fm", "deepfm", "dcnv2", "dlrm", "wdl"):
        assert losses[name] < losses["lr"] - 0.1, (losses, base)
