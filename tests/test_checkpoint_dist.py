"""Checkpoints of a model sharded over two gloo ranks: table-wise tables live on one
rank only, so every rank must record the shapes of what it holds; a save/load round
trip restores weights and fused-optimizer state exactly on every rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from dist_utils import run_ranks
from test_sharding import MODEL, feature_map, local_batch

from recemb.config.experiment import EmbeddingConfig
from recemb.embeddings.sharding import local_pieces, shard_model
from recemb.models.ctr.registry import build_model
from recemb.train.checkpoint import TrainState, assemble_full, load_checkpoint, save_checkpoint


def _sharded_state(seed: int, cfg: EmbeddingConfig) -> TrainState:
    torch.manual_seed(seed)
    meta = build_model(MODEL, feature_map(), cfg, device=torch.device("meta"))
    dmp = shard_model(meta, cfg, torch.device("cpu")).model
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    dense = torch.optim.Adam([p for _, p in in_backward_optimizer_filter(dmp.named_parameters())], lr=1e-2)
    return TrainState(model=dmp, dense_optimizer=dense, fused_optimizer=dmp.fused_optimizer)


def _pieces(state: TrainState) -> dict[str, list[torch.Tensor]]:
    return {k: [t.detach().clone() for _, t in local_pieces(v)] for k, v in state.tensors().items()}


def checkpoint_worker(rank: int, world_size: int, folder: str) -> dict[str, Any]:
    cfg = EmbeddingConfig(dim=8, sharding="table_wise", optimizer="exact_rowwise_adagrad", lr=0.1)
    trained = _sharded_state(0, cfg)
    for step in range(2):
        batch = local_batch(step, rank)
        F.binary_cross_entropy_with_logits(trained.model(batch), batch.labels).backward()
        trained.dense_optimizer.step()
        trained.dense_optimizer.zero_grad()
    save_checkpoint(folder, trained, step=2, epoch=0, config={})
    fresh = _sharded_state(1, cfg)
    load_checkpoint(folder, fresh)
    want, got = _pieces(trained), _pieces(fresh)
    diff = max(
        (float((a - b).abs().max()) for k in want for a, b in zip(want[k], got[k], strict=True) if a.numel()),
        default=0.0,
    )
    return {"keys": sorted(want), "diff": diff, "held": sum(len(v) for v in want.values())}


def test_table_wise_checkpoint_round_trip_on_two_ranks(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    results = run_ranks(checkpoint_worker, 2, str(folder))
    for rank, result in enumerate(results):
        assert result["diff"] == 0.0, f"rank {rank} restored different values"
    full = assemble_full(folder)
    momentum = [k for k in full if k.startswith("fused/") and "momentum1" in k]
    tables = [k for k in full if k.startswith("model/") and "embedding_bags" in k]
    assert len(momentum) == len(tables) > 0  # every table's row-wise Adagrad state, from whichever rank
    for key in tables:
        rows = full[key].shape[0]
        state_key = next(k for k in momentum if key.split("/", 1)[1] in k)
        assert full[state_key].shape[0] == rows
