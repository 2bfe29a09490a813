"""Checkpoints of a model sharded over two gloo ranks: table-wise tables live on one
rank only, so every rank must record the shapes of what it holds; a save/load round
trip restores weights and fused-optimizer state exactly on every rank; every rank's
file is recorded with its sha256; a resumed two-rank run counts its place in the
epoch in rows of both ranks, and goes on from there on one rank with the same global batch."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_ranks
from test_sharding import MODEL, feature_map, local_batch

from recemb.config.experiment import EmbeddingConfig, ExperimentConfig
from recemb.config.loader import from_dict
from recemb.embeddings.sharding import local_pieces, shard_model
from recemb.errors import ConfigError, DataError
from recemb.models.registry import build_model
from recemb.train.checkpoint import TrainState, assemble_full, load_checkpoint, read_meta, save_checkpoint
from recemb.train.loop import train

MakeExperiment = Callable[..., ExperimentConfig]  # the conftest fixture


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

    # Both ranks' files are recorded, each as its writer left it; a flipped byte in rank 1's is named.
    files = read_meta(folder)["files"]
    assert sorted(files) == ["rank-0.safetensors", "rank-1.safetensors"]
    for name, digest in files.items():
        data = (folder / name).read_bytes()
        assert digest == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "meta.json.sha256", *sorted(files)]
    part = folder / "rank-1.safetensors"
    data = bytearray(part.read_bytes())
    data[-1] ^= 0x01
    part.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"ckpt/rank-1\.safetensors: checksum mismatch"):
        assemble_full(folder)


# ----------------------------------------------------------------------------- resuming a two-rank run


def train_worker(rank: int, world_size: int, cfg_data: dict[str, Any], resume: str | None,
                 stop: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    cfg = from_dict(ExperimentConfig, cfg_data)
    result = train(cfg, resume=resume, stop_after_steps=stop)
    return {"steps": result.steps, "history": result.history, "test": result.test}


@pytest.mark.usefixtures("no_process_group")
def test_two_rank_run_resumes_at_its_row_on_two_ranks_and_on_one(make_experiment: MakeExperiment,
                                                                 tmp_path: Path) -> None:
    """2 ranks x 512 rows a step = 1024-row global batches, 16 an epoch (the last 670 rows); stopped after 6.

    Dropout draws differ by rank, so an exact resume needs each rank's own RNG state back
    (the checkpoint used to keep rank 0's only, and every metric after the resume drifted).
    """
    settings = ("train.eval_every_steps=4", "model.params={mlp: [32, 16], dropout: 0.2}")
    full = run_ranks(train_worker, 2, make_experiment("deepfm", *settings, output_dir=tmp_path / "a").to_dict(),
                     None, 0)[0]
    assert full["steps"] == 16  # 15 global batches of 1024 and one of the last 670 rows (335 a rank)
    cfg = make_experiment("deepfm", *settings, output_dir=tmp_path / "b")
    run_dir = tmp_path / "b" / cfg.expid
    run_ranks(train_worker, 2, cfg.to_dict(), None, 6)
    meta = read_meta(run_dir / "checkpoints" / "last")
    assert (meta["step"], meta["world_size"], meta["extra"]["rows_in_epoch"]) == (6, 2, 6 * 512 * 2)
    shutil.copytree(tmp_path / "b", tmp_path / "c")

    resumed = run_ranks(train_worker, 2, cfg.to_dict(), str(run_dir), 0)[0]
    assert resumed["steps"] == full["steps"]
    assert [h["step"] for h in resumed["history"]] == [h["step"] for h in full["history"]]
    for mine, theirs in zip(resumed["history"], full["history"], strict=True):
        assert mine == pytest.approx(theirs, abs=1e-6)
    assert resumed["test"] == pytest.approx(full["test"], abs=1e-6)

    # One rank: the global batch must stay 1024 rows; then exactly the 10 remaining batches train.
    one_rank = tmp_path / "c" / cfg.expid
    try:
        with pytest.raises(ConfigError, match=r"train\.batch_size: 512 -> 512; ranks: 2 -> 1"):
            train(make_experiment("deepfm", *settings, output_dir=tmp_path / "c"), resume=one_rank)
        rows: list[int] = []
        result = train(make_experiment("deepfm", *settings, "train.batch_size=1024", output_dir=tmp_path / "c"),
                       resume=one_rank, on_epoch_end=lambda e, s, p, metrics: rows.append(metrics["train_rows"]))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert result.steps == full["steps"]
    assert rows == [16030 - 6 * 1024]  # every row after the first 6 global batches
