"""Two gloo ranks on CPU against the unsharded model, for every sharding type.

One spawned pair of ranks builds, for each sharding type, the embedding layer
(forward: pooled output equals the unsharded layer's) and a DeepFM model
(training: logits after a few steps with the fused sparse optimizer equal an
unsharded reference trained on the global batch); the parent asserts on what the
ranks send back. Findings these tests pin down:

* torchrec divides the embedding gradients by the world size in the backward
  all-to-all (``torchrec.distributed.comm_ops.GRADIENT_DIVISION``), as DDP does for
  dense ones: two ranks on their halves equal one process on the global batch's
  mean loss.
* Row-wise Adagrad keeps one accumulator per row *of each column shard*, so the
  column-wise reference steps each shard's columns separately.
* ``data_parallel`` tables (dense kernel) get no fused optimizer: their weights
  come out of ``in_backward_optimizer_filter`` as ordinary parameters, so the
  sparse optimizer for them comes from ``table_optimizer`` (unfused) and the
  dense optimizer must leave them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_ranks
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recemb.config.experiment import EmbeddingConfig, ModelConfig
from recemb.data.batch import Batch
from recemb.data.schema import FeatureInfo, FeatureMap
from recemb.embeddings.registry import build_embedding_layer
from recemb.embeddings.sharding import (
    check_sparse_optimizer,
    ensure_process_group,
    load_full_state,
    plan_to_dict,
    shard_model,
    table_optimizer,
    unfused_table_params,
)
from recemb.errors import ConfigError

WORLD_SIZE = 2
DIM = 8
SPARSE = {"user": 37, "item": 64, "tags": 101, "site": 16}
MULTI_HOT = "tags"
NUM_DENSE = 2
LOCAL_BATCH = 8
STEPS = 4
SPARSE_LR = 0.1
DENSE_LR = 1e-2
EPS = 1e-8
ATOL = 1e-5
SHARDINGS = ["auto", "table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"]
EXPLICIT = [s for s in SHARDINGS if s != "auto"]
# SGD shows any gradient scaling error (Adagrad is nearly scale-free); row-wise Adagrad
# where its state is laid out differently (row and column shards).
TRAIN_RUNS = [(s, "exact_sgd") for s in SHARDINGS] + [
    (s, "exact_rowwise_adagrad") for s in ["table_wise", "row_wise", "column_wise", "table_row_wise"]
]
MODEL = ModelConfig(name="deepfm", params={"mlp": [16]})


# ---------------------------------------------------------------- data and references


def feature_map() -> FeatureMap:
    """Dense features plus four sparse features of different sizes, one multi-hot."""
    feats = [FeatureInfo(name=f"d{i}", kind="dense", source=f"d{i}") for i in range(NUM_DENSE)]
    for name, rows in SPARSE.items():
        kind = "multihot" if name == MULTI_HOT else "sparse"
        feats.append(FeatureInfo(name=name, kind=kind, source=name, num_embeddings=rows))
    return FeatureMap(dataset_id="toy", label="label", features=feats)


def local_batch(step: int, rank: int) -> Batch:
    """Rank ``rank``'s half of step ``step``'s global batch; the multi-hot bags hold 0-3 ids."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    lengths, values = [], []
    for name, rows in SPARSE.items():
        if name == MULTI_HOT:
            length = torch.randint(0, 4, (LOCAL_BATCH,), generator=gen)
            length[0] = 0  # always at least one empty bag
        else:
            length = torch.ones(LOCAL_BATCH, dtype=torch.long)
        lengths.append(length)
        values.append(torch.randint(0, rows, (int(length.sum()),), generator=gen))
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=list(SPARSE), values=torch.cat(values), lengths=torch.cat(lengths)
    )
    dense = torch.randn(LOCAL_BATCH, NUM_DENSE, generator=gen)
    labels = torch.randint(0, 2, (LOCAL_BATCH,), generator=gen).float()
    return Batch(dense=dense, sparse=sparse, labels=labels)


def embedding_tables(model: nn.Module) -> dict[tuple[str, str], nn.Parameter]:
    """Every table weight of the model's EmbeddingBagCollections, keyed by (module path, table)."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    out: dict[tuple[str, str], nn.Parameter] = {}
    for path, module in model.named_modules():
        if isinstance(module, EmbeddingBagCollection):
            for table, bag in module.embedding_bags.items():
                out[(path, table)] = bag.weight
    return out


def column_blocks(plan: dict[str, Any], path: str, table: str, dim: int) -> list[tuple[int, int]]:
    """The column ranges a table is split into by the plan (one range unless column-wise)."""
    shards = plan[path][table]["shards"] or []
    starts = sorted({(s["offsets"][1], s["offsets"][1] + s["sizes"][1]) for s in shards})
    return starts or [(0, dim)]


class ColumnShardRowWiseAdagrad:
    """Row-wise Adagrad with one accumulator per row of each column block (FBGEMM per shard)."""

    def __init__(self, weight: nn.Parameter, blocks: list[tuple[int, int]], lr: float, eps: float) -> None:
        from torchrec.optim import RowWiseAdagrad

        self.weight = weight
        self.blocks = [(lo, hi, nn.Parameter(weight.detach()[:, lo:hi].clone())) for lo, hi in blocks]
        self.optimizer = RowWiseAdagrad([p for _, _, p in self.blocks], lr=lr, eps=eps)

    def step(self) -> None:
        assert self.weight.grad is not None
        for lo, hi, part in self.blocks:
            part.grad = self.weight.grad[:, lo:hi].clone()
        self.optimizer.step()
        with torch.no_grad():
            for lo, hi, part in self.blocks:
                self.weight[:, lo:hi] = part


@dataclass
class Reference:
    """The unsharded model trained on the mean loss of the global batch (all ranks' halves).

    ``sparse_grad_scale`` multiplies the tables' gradients before their step: 1
    is what torchrec does (averaged), ``WORLD_SIZE`` the summed alternative.
    """

    model: nn.Module
    dense: torch.optim.Optimizer
    sparse: list[Any]
    tables: list[nn.Parameter]
    sparse_grad_scale: float = 1.0

    @classmethod
    def build(
        cls, model: nn.Module, cfg: EmbeddingConfig, plan: dict[str, Any], sparse_grad_scale: float = 1.0
    ) -> Reference:
        from torchrec.optim import RowWiseAdagrad

        tables = embedding_tables(model)
        table_ids = {id(w) for w in tables.values()}
        dense = torch.optim.Adam([p for p in model.parameters() if id(p) not in table_ids], lr=DENSE_LR)
        sparse: list[Any]
        if cfg.optimizer == "exact_sgd":
            sparse = [torch.optim.SGD(list(tables.values()), lr=cfg.lr)]
        elif cfg.optimizer == "exact_rowwise_adagrad":
            whole, split = [], []
            for (path, table), weight in tables.items():
                blocks = column_blocks(plan, path, table, weight.shape[1])
                if len(blocks) == 1:
                    whole.append(weight)
                else:
                    split.append(ColumnShardRowWiseAdagrad(weight, blocks, lr=cfg.lr, eps=cfg.eps))
            sparse = [RowWiseAdagrad(whole, lr=cfg.lr, eps=cfg.eps)] if whole else []
            sparse += split
        else:
            raise ValueError(f"no reference for {cfg.optimizer}")
        return cls(model, dense, sparse, list(tables.values()), sparse_grad_scale)

    def step(self, batches: list[Batch]) -> list[torch.Tensor]:
        """One step on the global batch; returns each rank's logits before the update."""
        logits = [self.model(b) for b in batches]
        losses = [F.binary_cross_entropy_with_logits(x, b.labels) for x, b in zip(logits, batches, strict=True)]
        (sum(losses) / len(losses)).backward()
        for weight in self.tables:
            assert weight.grad is not None
            weight.grad.mul_(self.sparse_grad_scale)
        self.dense.step()
        for opt in self.sparse:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        return [x.detach() for x in logits]


# ---------------------------------------------------------------- what each rank runs


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def _sharding_types(plan: dict[str, Any]) -> list[str]:
    return sorted({t["sharding_type"] for tables in plan.values() for t in tables.values()})


def _forward(rank: int, kind: str) -> dict[str, Any]:
    fm = feature_map()
    cfg = EmbeddingConfig(dim=DIM, sharding=kind)
    torch.manual_seed(0)
    reference = build_embedding_layer(fm, cfg)
    sharded = shard_model(build_embedding_layer(fm, cfg, device=torch.device("meta")), cfg, torch.device("cpu"))
    load_full_state(sharded.model, reference.state_dict())
    batch = local_batch(0, rank)
    with torch.no_grad():
        out = sharded.model(batch.sparse)
        expected = reference(batch.sparse)
    return {
        "keys": list(out.keys()),
        "out": _array(out.values()),
        "expected": _array(expected.values()),
        "plan": plan_to_dict(sharded.plan),
    }


def _train(rank: int, world_size: int, kind: str, optimizer: str, summed_too: bool) -> dict[str, Any]:
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from recemb.models.registry import build_model

    fm = feature_map()
    cfg = EmbeddingConfig(dim=DIM, sharding=kind, optimizer=optimizer, lr=SPARSE_LR, eps=EPS)
    torch.manual_seed(0)
    model = build_model(MODEL, fm, cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sharded = shard_model(build_model(MODEL, fm, cfg, device=torch.device("meta")), cfg, torch.device("cpu"))
    load_full_state(sharded.model, state)
    plan = plan_to_dict(sharded.plan)
    tables = {id(p) for p in unfused_table_params(sharded.model)}
    dense_params = [
        p for _, p in in_backward_optimizer_filter(sharded.model.named_parameters()) if id(p) not in tables
    ]
    dense = torch.optim.Adam(dense_params, lr=DENSE_LR)
    table_opt = table_optimizer(sharded.model, cfg)
    references = [Reference.build(model, cfg, plan)]
    if summed_too:
        twin = build_model(MODEL, fm, cfg)
        twin.load_state_dict(state)
        references.append(Reference.build(twin, cfg, plan, sparse_grad_scale=float(world_size)))

    logits, expected = [], []
    for step in range(STEPS):
        mine = local_batch(step, rank)
        out = sharded.model(mine)
        F.binary_cross_entropy_with_logits(out, mine.labels).backward()
        dense.step()
        dense.zero_grad(set_to_none=True)
        if table_opt is not None:
            table_opt.step()
            table_opt.zero_grad(set_to_none=True)
        logits.append(_array(out))
        global_batch = [local_batch(step, r) for r in range(world_size)]
        per_ref = [ref.step(global_batch)[rank] for ref in references]
        expected.append(_array(per_ref[0]))
    held_out = local_batch(STEPS, rank)
    with torch.no_grad():
        final = _array(sharded.model(held_out))
        finals = [_array(ref.model(held_out)) for ref in references]
    return {
        "planned": _sharding_types(plan),
        "logits": logits,
        "expected": expected,
        "final": final,
        "final_expected": finals[0],
        "final_summed": finals[1] if summed_too else None,
    }


def sharding_worker(rank: int, world_size: int) -> dict[str, Any]:
    """Everything the tests check, for every sharding type, in one process pair.

    Last, each rank leaves the two-rank group and runs the one-rank check (a
    spawn of its own would add 5-10 s of start-up).
    """
    torch.set_num_threads(1)
    forward = {kind: _forward(rank, kind) for kind in SHARDINGS}
    train = {
        f"{kind}/{opt}": _train(rank, world_size, kind, opt, summed_too=(kind, opt) == ("table_wise", "exact_sgd"))
        for kind, opt in TRAIN_RUNS
    }
    dist.destroy_process_group()
    return {"forward": forward, "train": train, "single_rank": single_rank_worker(0, 1)}


def single_rank_worker(rank: int, world_size: int) -> dict[str, Any]:
    """A one-rank group from ``ensure_process_group``; ``shard_model`` must refuse fused Adam on CPU."""
    assert not dist.is_initialized()
    group = ensure_process_group()
    again = ensure_process_group()
    cfg = EmbeddingConfig(dim=DIM, optimizer="adam")
    layer = build_embedding_layer(feature_map(), cfg, device=torch.device("meta"))
    error: tuple[str, str] | None = None
    try:
        shard_model(layer, cfg, torch.device("cpu"))
    except ConfigError as exc:
        error = (type(exc).__name__, str(exc))
    return {"world_size": dist.get_world_size(group), "same_group": again is group, "error": error}


# ---------------------------------------------------------------- the tests (parent side)


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    """Both ranks' results (spawned once for the whole module)."""
    return run_ranks(sharding_worker, WORLD_SIZE)


def _close(actual: np.ndarray, expected: np.ndarray, what: str, atol: float = ATOL) -> None:
    diff = float(np.abs(actual - expected).max()) if actual.size else 0.0
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.allclose(actual, expected, atol=atol, rtol=atol), f"{what}: max |diff| {diff:.3g} > {atol}"


@pytest.mark.parametrize("kind", SHARDINGS)
def test_forward_matches_unsharded(ranks: list[dict[str, Any]], kind: str) -> None:
    for rank, result in enumerate(ranks):
        run = result["forward"][kind]
        assert run["keys"] == list(SPARSE), f"rank {rank}: keys {run['keys']} not in logical feature order"
        assert run["out"].shape == (LOCAL_BATCH, DIM * len(SPARSE))
        _close(run["out"], run["expected"], f"{kind} forward, rank {rank}", atol=1e-6)


@pytest.mark.parametrize("kind", EXPLICIT)
def test_plan_names_requested_sharding_on_every_rank(ranks: list[dict[str, Any]], kind: str) -> None:
    plans = [r["forward"][kind]["plan"] for r in ranks]
    assert plans[0] == plans[1], f"{kind}: the ranks disagree on the plan"
    tables = plans[0]["ebc"]
    assert sorted(tables) == sorted(f"t_{n}" for n in SPARSE)
    for table, entry in tables.items():
        assert entry["sharding_type"] == kind, f"{kind}: table {table} planned as {entry['sharding_type']}"
        kernel = "dense" if kind == "data_parallel" else "fused"
        assert entry["compute_kernel"] == kernel, f"{kind}: table {table} uses kernel {entry['compute_kernel']}"


def test_auto_plan_is_one_plan_for_all_ranks(ranks: list[dict[str, Any]]) -> None:
    plans = [r["forward"]["auto"]["plan"] for r in ranks]
    assert plans[0] == plans[1], "auto: the ranks disagree on the plan"
    assert set(_sharding_types(plans[0])) <= set(EXPLICIT)
    assert sorted(plans[0]["ebc"]) == sorted(f"t_{n}" for n in SPARSE)


@pytest.mark.parametrize("kind", ["row_wise", "table_row_wise", "column_wise"])
def test_split_tables_have_shards_on_both_ranks(ranks: list[dict[str, Any]], kind: str) -> None:
    for table, entry in ranks[0]["forward"][kind]["plan"]["ebc"].items():
        holders = {s["rank"] for s in entry["shards"]}
        assert holders == set(range(WORLD_SIZE)), f"{kind}: table {table} has shards only on ranks {holders}"


@pytest.mark.parametrize(("kind", "optimizer"), TRAIN_RUNS, ids=[f"{s}-{o}" for s, o in TRAIN_RUNS])
def test_training_matches_unsharded(ranks: list[dict[str, Any]], kind: str, optimizer: str) -> None:
    for rank, result in enumerate(ranks):
        run = result["train"][f"{kind}/{optimizer}"]
        for step, (got, want) in enumerate(zip(run["logits"], run["expected"], strict=True)):
            _close(got, want, f"{kind}/{optimizer}, rank {rank}, logits at step {step}")
        _close(run["final"], run["final_expected"], f"{kind}/{optimizer}, rank {rank}, after {STEPS} steps")


def test_sparse_gradients_are_averaged_across_ranks(ranks: list[dict[str, Any]]) -> None:
    """With SGD the summed-gradient reference is off by far more than float noise; the mean is exact."""
    for rank, result in enumerate(ranks):
        run = result["train"]["table_wise/exact_sgd"]
        _close(run["final"], run["final_expected"], f"rank {rank}: averaged-gradient reference")
        gap = float(np.abs(run["final"] - run["final_summed"]).max())
        assert gap > 10 * ATOL, f"rank {rank}: the summed-gradient reference is also within {gap:.3g}"


def test_check_sparse_optimizer_refuses_adam_on_cpu() -> None:
    with pytest.raises(ConfigError, match=r"adam.*GPU only.*exact_rowwise_adagrad"):
        check_sparse_optimizer("adam", torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"'rmsprop' is unknown"):
        check_sparse_optimizer("rmsprop", torch.device("cpu"))
    check_sparse_optimizer("exact_rowwise_adagrad", torch.device("cpu"))
    check_sparse_optimizer("adam", torch.device("cpu"), "data_parallel")  # unfused torch Adam: fine on CPU


@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_single_rank_shard_model_refuses_adam_on_cpu(ranks: list[dict[str, Any]], rank: int) -> None:
    result = ranks[rank]["single_rank"]
    assert result["world_size"] == 1
    assert result["same_group"], "ensure_process_group started a second group"
    assert result["error"] is not None, "shard_model accepted embedding.optimizer=adam on CPU"
    name, message = result["error"]
    assert name == "ConfigError"
    assert "adam" in message and "exact_rowwise_adagrad" in message, message


def test_one_rank_places_auto_tables_table_wise(no_process_group: None) -> None:
    """On one rank ``auto`` means table_wise (no bucketize, no splits exchange); explicit kinds stay."""
    from recemb.config.experiment import EmbeddingGroup
    from recemb.embeddings.sharding import make_plan
    from recemb.models.registry import build_model

    cfg = EmbeddingConfig(dim=DIM, groups=[EmbeddingGroup(features=["item"], sharding="row_wise")])
    model = build_model(MODEL, feature_map(), cfg, device=torch.device("meta"))
    kinds = {table: t["sharding_type"] for tables in plan_to_dict(
        make_plan(model, torch.device("cpu"), ensure_process_group())).values() for table, t in tables.items()}
    assert kinds and {k for t, k in kinds.items() if "item" not in t} == {"table_wise"}, kinds
    assert {k for t, k in kinds.items() if "item" in t} == {"row_wise"}, kinds
