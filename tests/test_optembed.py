"""Tests for OptEmbed: the ``optembed`` supernet, the compact ``pruned`` variant, the
evolutionary search and ``recemb search`` end to end on the tiny session dataset.

The layer tests run unsharded torchrec modules on CPU; the end-to-end test runs the
three stages through ``train()`` (sharded, one gloo rank) with a few steps each.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS, SMALL_MODEL_PARAMS, SMALL_RUN

from recemb.config.experiment import EmbeddingConfig, ModelConfig, load_experiment
from recemb.data.batch import Batch, ParquetSource
from recemb.data.schema import FeatureInfo, FeatureMap
from recemb.embeddings.base import TableEmbeddingLayer
from recemb.embeddings.optembed import (
    OptEmbedMask,
    OptEmbedParams,
    candidate_dims,
    row_keep_mask,
)
from recemb.embeddings.pruned import (
    FeaturePruning,
    PrunedLayer,
    PruningPlan,
    load_pruning,
    remap_from_mask,
    save_pruning,
)
from recemb.embeddings.registry import VariantSpec, build_embedding_layer, build_variant
from recemb.errors import ConfigError
from recemb.models.registry import build_model
from recemb.search.evolution import EvolutionSettings, crossover, evolve, mutate
from recemb.train.checkpoint import read_meta

DIM = 8


pytestmark = pytest.mark.usefixtures("no_process_group", "one_thread")  # no group before or after; 1 thread


def _fm(prepared: Path) -> FeatureMap:
    return FeatureMap.load(prepared / "feature_map.json")


def _batch(prepared: Path, size: int = 256) -> Batch:
    return next(iter(ParquetSource(_fm(prepared), prepared).batches("valid", size, 0)))


def _supernet(prepared: Path, **params: object) -> TableEmbeddingLayer:
    torch.manual_seed(0)
    cfg = EmbeddingConfig(kind="optembed", dim=DIM, init_std=0.05, params=dict(params))
    layer = build_embedding_layer(_fm(prepared), cfg)
    assert isinstance(layer, TableEmbeddingLayer) and isinstance(layer.combiner, OptEmbedMask)
    return layer


def _table(layer: TableEmbeddingLayer, feature: str) -> torch.Tensor:
    return layer.ebc.embedding_bags[f"t_{feature}"].weight


# ----------------------------------------------------------------------------- supernet


def test_candidate_dims_and_bad_step() -> None:
    assert candidate_dims(16, 4) == [4, 8, 12, 16]
    with pytest.raises(ConfigError, match="multiple"):
        candidate_dims(10, 4)


def test_ste_gradient_reaches_thresholds_and_rows(prepared_ctr: Path) -> None:
    layer = _supernet(prepared_ctr)
    mask = layer.combiner
    with torch.no_grad():
        mask.thresholds.fill_(0.3)  # inside the norms' range (L1 of 8 N(0, 0.05) values ~ 0.32)
    out = layer(_batch(prepared_ctr).sparse).values()
    (out ** 2).sum().backward()
    grad = mask.thresholds.grad
    assert grad is not None and grad.shape == (len(mask.features),)
    assert (grad != 0).sum() >= len(mask.features) // 2, grad
    # The step's forward is hard: some rows are pruned and return exact zeros.
    assert 0 < int((out.view(out.shape[0], -1, DIM).abs().sum(-1) == 0).sum()) < out.numel() // DIM
    # The prior alone pushes every threshold up (gradient -alpha * exp(-t)).
    mask.thresholds.grad = None
    mask.regularization().backward()
    expected = -mask.params.alpha * torch.exp(-mask.thresholds.detach())
    torch.testing.assert_close(mask.thresholds.grad, expected)
    assert mask.optimizer_groups()[0]["lr"] == mask.params.threshold_lr


def test_random_dims_in_training_full_dims_at_eval(prepared_ctr: Path) -> None:
    layer = _supernet(prepared_ctr, threshold_init=-1.0)  # nothing pruned
    kjt = _batch(prepared_ctr).sparse
    torch.manual_seed(1)
    out = layer(kjt).values().view(-1, len(layer.features), DIM)
    widths = (out != 0).sum(-1)
    assert set(widths.unique().tolist()) == {4, 8}  # random prefixes from the candidates
    layer.eval()
    full = layer(kjt).values().view(-1, len(layer.features), DIM)
    assert bool((full != 0).all())
    layer.combiner.set_eval_dims({f: 4 for f in layer.features})
    cut = layer(kjt).values().view(-1, len(layer.features), DIM)
    torch.testing.assert_close(cut[..., :4], full[..., :4])
    assert bool((cut[..., 4:] == 0).all())


@pytest.mark.parametrize("pruned_vector", ["zero", "oov"])
def test_threshold_above_every_norm_prunes_everything(prepared_ctr: Path, pruned_vector: str) -> None:
    fm = _fm(prepared_ctr)
    emb = EmbeddingConfig(kind="optembed", dim=DIM, params={"pruned_vector": pruned_vector})
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="dcnv2", params={"mlp": [16], "cross_layers": 1}), fm, emb)
    model.eval()
    mask = model.embedding.combiner
    with torch.no_grad():
        mask.thresholds.fill_(1e6)
    batch = _batch(prepared_ctr)
    out = model.embedding(batch.sparse).values().view(batch.batch_size, -1, DIM)
    if pruned_vector == "zero":
        assert bool((out == 0).all())
    else:
        torch.testing.assert_close(out, mask.oov.detach().unsqueeze(0).expand_as(out))
    logits = model(batch)
    assert logits.shape == (batch.batch_size,) and bool(torch.isfinite(logits).all())


def test_optembed_refuses_budget_and_multi_hot(prepared_ctr: Path) -> None:
    with pytest.raises(ConfigError, match="budget"):
        build_embedding_layer(_fm(prepared_ctr), EmbeddingConfig(kind="optembed", dim=DIM, budget=0.1))
    tags = FeatureInfo(name="tags", kind="multihot", source="tags", num_embeddings=10, max_len=3)
    with pytest.raises(ConfigError, match="multi-hot"):
        build_variant("optembed", VariantSpec(features=[tags], dim=DIM, budget=None, params=OptEmbedParams()))


# ----------------------------------------------------------------------------- compact tables


@pytest.mark.parametrize("pruned_vector", ["zero", "oov"])
def test_compact_lookup_equals_masked_full_lookup(prepared_ctr: Path, tmp_path: Path, pruned_vector: str) -> None:
    layer = _supernet(prepared_ctr, pruned_vector=pruned_vector)
    mask = layer.combiner
    with torch.no_grad():
        mask.thresholds.copy_(torch.linspace(0.2, 0.45, len(layer.features)))
    rng = random.Random(0)
    dims = {f: rng.choice(mask.candidates) for f in layer.features}
    thresholds = mask.threshold_of()
    keep = {f: row_keep_mask(_table(layer, f).detach(), thresholds[f]).numpy() for f in layer.features}
    assert 0 < sum(int(k.sum()) for k in keep.values()) < sum(k.size for k in keep.values())
    plan = PruningPlan(full_dim=DIM, features={f: FeaturePruning(remap_from_mask(keep[f]), dims[f])
                                               for f in layer.features})
    save_pruning(tmp_path / "pruned", plan)
    again = load_pruning(tmp_path / "pruned")
    assert {f: (p.dim, p.kept_rows) for f, p in again.features.items()} == \
        {f: (p.dim, p.kept_rows) for f, p in plan.features.items()}

    compact = build_embedding_layer(_fm(prepared_ctr), EmbeddingConfig(
        kind="pruned", dim=DIM, params={"path": str(tmp_path / "pruned"), "pruned_vector": pruned_vector}))
    assert isinstance(compact, PrunedLayer) and compact.dims == dims
    with torch.no_grad():
        for f in compact.table_features:
            compact.ebc.embedding_bags[f"p_{f}"].weight.copy_(
                _table(layer, f).detach()[torch.from_numpy(keep[f])][:, : dims[f]])
        if pruned_vector == "oov":
            for i, f in enumerate(compact.features):
                lo, hi = compact._oov_at[f]
                compact.oov[lo:hi].copy_(mask.oov.detach()[i, : dims[f]])
    layer.eval()
    mask.set_eval_dims(dims)
    kjt = _batch(prepared_ctr, 1024).sparse
    full = layer(kjt).to_dict()
    small = compact(kjt).to_dict()
    for f in layer.features:
        torch.testing.assert_close(small[f], full[f][:, : dims[f]], rtol=0, atol=0)
        assert bool((full[f][:, dims[f]:] == 0).all())
    assert compact.parameter_bytes() < compact.full_bytes() == layer.full_bytes()


def test_remap_from_mask_and_bad_folder(tmp_path: Path) -> None:
    np.testing.assert_array_equal(remap_from_mask(np.array([0, 1, 1, 0, 1], dtype=bool)), [-1, 0, 1, -1, 2])
    with pytest.raises(Exception, match="not a pruning folder"):
        load_pruning(tmp_path)


# ----------------------------------------------------------------------------- search


def test_mutate_and_crossover() -> None:
    rng = random.Random(0)
    choices = [[4, 8, 12]] * 6
    cand = (4,) * 6
    assert mutate(cand, choices, 0.0, rng) == cand
    assert all(v in (4, 8, 12) for v in mutate(cand, choices, 1.0, rng))
    child = crossover((4,) * 6, (12,) * 6, rng)
    assert set(child) <= {4, 12} and len(child) == 6


def test_search_reproducible_with_seed() -> None:
    choices = [[4, 8, 12, 16]] * 5
    target = (8, 16, 4, 12, 8)

    def fitness(c: tuple[int, ...]) -> float:
        return -sum(abs(a - b) for a, b in zip(c, target, strict=True)) + 0.01 * math.sin(sum(c))

    settings = EvolutionSettings(population=10, generations=12, parents=3, mutation_prob=0.3, seed=7)
    a = evolve(choices, fitness, settings)
    b = evolve(choices, fitness, settings)
    assert a.best == b.best and a.fitness == b.fitness
    assert [g.to_dict() for g in a.history] == [g.to_dict() for g in b.history]
    assert len(a.history) == 12
    assert all(later.best >= earlier.best for earlier, later in zip(a.history, a.history[1:], strict=False))
    assert a.best == target
    other = evolve(choices, fitness, EvolutionSettings(population=10, generations=12, parents=3,
                                                      mutation_prob=0.3, seed=8))
    assert [g.mean for g in other.history] != [g.mean for g in a.history]


# ----------------------------------------------------------------------------- end to end


def test_search_end_to_end_resumes(prepared_ctr: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.search as search
    from recemb.tracking import resolve_run

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = load_experiment(CONFIGS / "experiments" / "optembed_synthetic_ctr.yaml", [
        f"data_dir={prepared_ctr}", f"train.output_dir={tmp_path / 'runs'}", *SMALL_RUN,
        f"model.params={SMALL_MODEL_PARAMS['dcnv2']}", "train.eval_every_steps=5",
        "embedding.params.threshold_init=0.02", "embedding.params.threshold_lr=0.001",
        "search.supernet_max_steps=10", "search.retrain_max_steps=10", "search.population=4",
        "search.generations=2", "search.valid_rows=1000", "search.bytes_penalty=1.0", f"cluster.mlflow_uri={uri}",
    ])
    summary = search.run_search(cfg)
    root = tmp_path / "runs" / "dcnv2_synthetic_ctr_optembed" / "search"
    assert (root / "stage").read_text().strip() == "retrain"
    for name in ("supernet.json", "search.json", "retrain.json", "summary.json", "initial_tables.safetensors",
                 "pruned/pruning.json", "pruned/remaps.safetensors", "pruned_initial.safetensors"):
        assert (root / name).is_file(), name
    found = summary["search"]
    assert len(found["history"]) == 2 and set(found["dims"].values()) <= {4, 8}
    assert 0 < found["kept_rows_total"] < found["rows_total"]
    assert found["kept_rows_total"] == sum(found["kept_rows"].values())
    assert any(t != 0.02 for t in found["thresholds"].values())  # the aux optimizer moved them
    assert "aux" in read_meta(root / "supernet" / "checkpoints" / "last")["param_groups"]  # and is checkpointed
    plan = load_pruning(root / "pruned")
    assert {f: p.kept_rows for f, p in plan.features.items()} == found["kept_rows"]
    retrain = summary["retrain"]
    assert retrain["test"]["auc"] > 0.5 and retrain["steps"] == 10
    assert retrain["embedding_bytes"] < retrain["full_bytes"]
    assert "kind: pruned" in (root / "retrain" / "config.yaml").read_text()
    metrics = resolve_run(uri, summary["run_id"])["metrics"]
    for key in ("supernet_valid_auc", "supernet_test_auc", "search_best_fitness", "search_mean_fitness",
                "retrain_valid_auc", "retrain_test_auc", "retrain_test_logloss"):
        assert key in metrics, key

    # Stopped after the search: a rerun redoes only the retraining, in the same MLflow run.
    (root / "stage").write_text("search\n")
    before = {n: (root / n).stat().st_mtime_ns for n in ("supernet.json", "search.json")}
    retrain_before = (root / "retrain.json").stat().st_mtime_ns
    import shutil

    shutil.rmtree(root / "retrain")
    again = search.run_search(cfg)
    assert again["run_id"] == summary["run_id"]
    assert {n: (root / n).stat().st_mtime_ns for n in before} == before
    assert (root / "retrain.json").stat().st_mtime_ns != retrain_before
    assert again["retrain"]["embedding_bytes"] == retrain["embedding_bytes"]

    # Everything done: a rerun trains nothing.
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(search, "train", no_training)
    assert search.run_search(cfg)["search"]["dims"] == found["dims"]
